"""Item-KNN (E-IKNN), ALS (E-ALS), BPR (E-BPR) and Rel-MF (E-IPS) policies."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from pydantic import ValidationError

from recloop.recommenders.base import TrainingData
from recloop.recommenders.knn import ItemKNN, topk_item_similarity
from recloop.recommenders.mf import ALS, BPR, RelMF, als_half_step, relmf_propensity
from recloop.registry import _REGISTRY
from recloop.sim.state import History, Items, Users, World


def make_world(n_users: int, n_items: int, d: int = 4, seed: int = 0) -> World:
    rng = np.random.default_rng(seed)
    users = Users.create(rng.normal(size=(n_users, d)))
    genres = rng.dirichlet(np.ones(3), size=n_items)
    items = Items.create(rng.normal(size=(n_items, d)), genres, [f"i{j}" for j in range(n_items)])
    return World(users, items)


def grow_world(world: World, add_users: int, add_items: int) -> None:
    d = world.users.dim
    if add_users:
        world.users.append(np.ones((add_users, d), np.float32), step=1)
    if add_items:
        g = np.full((add_items, world.items.genres.shape[1]), 1.0 / world.items.genres.shape[1])
        world.items.append(np.ones((add_items, d), np.float32), g, [f"new{j}" for j in range(add_items)],
                           np.full(add_items, -1), np.zeros(add_items), step=1)


def make_data(n_users: int, n_items: int, per_user: int = 8, seed: int = 0) -> TrainingData:
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.7
    users = np.repeat(np.arange(n_users), per_user)
    items = rng.choice(n_items, size=len(users), p=pop / pop.sum())
    z = np.zeros(len(users))
    return TrainingData(users.astype(np.int64), items.astype(np.int64), z.astype(np.int32), z.astype(np.int8),
                        n_users, n_items)


def fit(policy, data, world, seed=1, warm=False):
    policy.fit(data, world, step=0, rng=np.random.default_rng(seed), warm_start=warm)
    return policy


SMALL = {"als": dict(factors=8, iterations=4), "bpr": dict(factors=8, iterations=3),
         "relmf": dict(factors=8, iterations=2)}
CLASSES = {"als": ALS, "bpr": BPR, "relmf": RelMF}


# ------------------------------------------------------------------------------------------- item KNN
def test_iknn_sanity_cosine():
    R = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 1]], np.float32))
    M = topk_item_similarity(R, neighbors=50).toarray()
    assert M[0, 1] == pytest.approx(0.707107, abs=1e-6)
    assert M[1, 2] == 0.0 and np.all(np.diag(M) == 0)
    world = make_world(2, 3)
    data = TrainingData(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 2]), np.zeros(4, np.int32),
                        np.zeros(4, np.int8), 2, 3)
    knn = fit(ItemKNN(), data, world)
    s = knn.score(np.array([0]), world)
    assert s.dtype == np.float32 and s.shape == (1, 3)
    np.testing.assert_allclose(s[0], [0.707107, 0.707107, 0.707107], atol=1e-6)


def _brute_force_topk(X: np.ndarray, K: int, shrink: float) -> np.ndarray:
    X = (X > 0).astype(np.float64)
    G = X.T @ X
    n = np.sqrt(np.diag(G))
    with np.errstate(divide="ignore", invalid="ignore"):
        S = np.where(np.outer(n, n) + shrink > 0, G / (np.outer(n, n) + shrink), 0.0)
    np.fill_diagonal(S, 0.0)
    out = np.zeros_like(S)
    for i in range(S.shape[0]):
        order = np.lexsort((np.arange(S.shape[1]), -S[i]))[:K]  # ties → lower id
        keep = order[S[i, order] > 0]
        out[i, keep] = S[i, keep]
    return out


@pytest.mark.parametrize("K,shrink", [(1, 0.0), (3, 0.0), (5, 2.0)])
def test_iknn_topk_matches_brute_force_and_blocks(K, shrink):
    rng = np.random.default_rng(3)
    X = (rng.random((60, 25)) < 0.15).astype(np.float32)
    ref = _brute_force_topk(X, K, shrink)
    for block_entries in (25, 25 * 7, 1 << 21):  # 1 row, 7 rows, everything in one block
        M = topk_item_similarity(sp.csr_matrix(X), K, shrink, block_entries=block_entries)
        assert M.dtype == np.float32
        np.testing.assert_allclose(M.toarray(), ref, atol=1e-6)
        assert np.all(np.diff(M.indptr) <= K)


def test_iknn_scores_growth_and_state_roundtrip():
    world = make_world(30, 20)
    data = make_data(30, 20, per_user=5)
    cols = (data.users.copy(), data.items.copy())
    knn = fit(ItemKNN(ItemKNN.Params(neighbors=5)), data, world)
    np.testing.assert_array_equal(data.users, cols[0])  # inputs untouched
    np.testing.assert_array_equal(data.items, cols[1])
    H = data.matrix(binary=True).toarray()
    M = knn.similarity().toarray()
    users = np.array([3, 0, 7, 3])
    np.testing.assert_allclose(knn.score(users, world), H[users] @ M.T, atol=1e-5)
    # new users and items after the fit score 0 and the shape follows the world
    grow_world(world, 2, 3)
    s = knn.score(np.array([0, 31]), world)
    assert s.shape == (2, 23) and s.dtype == np.float32
    assert np.all(s[1] == 0) and np.all(s[:, 20:] == 0)
    # checkpoint round trip
    other = ItemKNN(ItemKNN.Params(neighbors=5))
    other.load_state_dict(knn.state_dict())
    np.testing.assert_array_equal(other.score(np.arange(32), world), knn.score(np.arange(32), world))
    idx1, _ = knn.recommend(np.arange(32), 4, world)
    idx2, _ = other.recommend(np.arange(32), 4, world)
    np.testing.assert_array_equal(idx1, idx2)


def test_iknn_unfitted_and_empty():
    world = make_world(4, 5)
    knn = ItemKNN()
    assert np.all(knn.score(np.arange(4), world) == 0)
    fit(knn, TrainingData.empty(4, 5), world)
    assert knn.score(np.arange(4), world).shape == (4, 5)


# ------------------------------------------------------------------------------------------------ ALS
def test_als_half_step_sanity():
    x = als_half_step(sp.csr_matrix(np.array([[1.0]])), np.array([[1.0]]), 1.0)
    assert x.shape == (1, 1) and x[0, 0] == pytest.approx(0.5)


def test_als_half_step_matches_dense_solve_and_implicit():
    rng = np.random.default_rng(0)
    nu, ni, f, lam = 12, 9, 3, 0.3
    R = (rng.random((nu, ni)) < 0.3) * rng.integers(1, 4, (nu, ni))
    C = sp.csr_matrix(np.where(R > 0, 1.0 + 2.0 * R, 0.0))
    Y = rng.normal(size=(ni, f))
    X = als_half_step(C, Y, lam)
    Cd = np.where(R > 0, 1.0 + 2.0 * R, 1.0)
    for u in range(nu):
        A = Y.T @ (Cd[u][:, None] * Y) + lam * np.eye(f)
        b = Y.T @ (Cd[u] * (R[u] > 0))
        np.testing.assert_allclose(X[u], np.linalg.solve(A, b), rtol=1e-5, atol=1e-6)
    # chunked path (tiny memory budget) gives the same result
    np.testing.assert_allclose(als_half_step(C, Y, lam, max_entries=f * f * 2), X, rtol=1e-5, atol=1e-6)
    # implicit's exact solver reads the stored value as the confidence: the same convention
    from implicit.cpu.als import AlternatingLeastSquares

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = AlternatingLeastSquares(factors=f, regularization=lam, alpha=1.0, use_cg=False, num_threads=1)
    m.item_factors = Y.astype(np.float32)
    X_implicit = m.recalculate_user(np.arange(nu), C.astype(np.float32))
    np.testing.assert_allclose(X_implicit, X, rtol=1e-3, atol=1e-4)


def test_als_numpy_solver_agrees_with_implicit_cholesky():
    world = make_world(40, 15)
    data = make_data(40, 15, per_user=4)
    a = fit(ALS(ALS.Params(factors=4, iterations=2, solver="numpy")), data, world)
    b = fit(ALS(ALS.Params(factors=4, iterations=2, solver="cholesky")), data, world)
    np.testing.assert_allclose(a.factors(world)[0], b.factors(world)[0], rtol=1e-2, atol=2e-3)
    np.testing.assert_allclose(a.factors(world)[1], b.factors(world)[1], rtol=1e-2, atol=2e-3)


# ----------------------------------------------------------------------------------- shared MF checks
@pytest.mark.parametrize("name", ["als", "bpr", "relmf"])
def test_mf_registered_and_params(name):
    spec = _REGISTRY["policy"][name]
    assert spec.cls is CLASSES[name]
    with pytest.raises(ValidationError):
        spec.params.model_validate({"factors": 4, "no_such_key": 1})
    pol = spec.cls(spec.params.model_validate(SMALL[name]))
    assert pol.params.factors == 8


@pytest.mark.parametrize("name", ["als", "bpr", "relmf"])
def test_mf_deterministic_float32_and_inputs_untouched(name):
    cls = CLASSES[name]
    world = make_world(50, 20)
    data = make_data(50, 20)
    before = (data.users.copy(), data.items.copy())
    a = fit(cls(cls.Params(**SMALL[name])), data, world, seed=5)
    b = fit(cls(cls.Params(**SMALL[name])), data, world, seed=5)
    c = fit(cls(cls.Params(**SMALL[name])), data, world, seed=6)
    np.testing.assert_array_equal(data.users, before[0])
    np.testing.assert_array_equal(data.items, before[1])
    Ua, Va, ba = a.factors(world)
    Ub, Vb, bb = b.factors(world)
    for x in (Ua, Va):
        assert x.dtype == np.float32 and x.flags.c_contiguous
    assert Ua.shape[0] == 50 and Va.shape[0] == 20 and Ua.shape[1] == Va.shape[1]
    assert (ba is None) == (name != "relmf")
    np.testing.assert_array_equal(Ua, Ub)
    np.testing.assert_array_equal(Va, Vb)
    assert not np.array_equal(Ua, c.factors(world)[0])
    assert np.all(np.isfinite(Ua)) and np.all(np.isfinite(Va))
    s = a.score(np.array([1, 2]), world)
    assert s.dtype == np.float32 and s.shape == (2, 20)


@pytest.mark.parametrize("name", ["als", "bpr", "relmf"])
def test_mf_warm_start_keeps_rows_and_extends(name):
    cls = CLASSES[name]
    world = make_world(30, 12)
    data = make_data(30, 12)
    pol = fit(cls(cls.Params(**SMALL[name], warm_iterations=0)), data, world)
    U0, V0 = pol.user_factors.copy(), pol.item_factors.copy()
    grow_world(world, 4, 3)
    # between fits the factors already cover the grown world: mean user, zero item
    U, V, b = pol.factors(world)
    assert U.shape[0] == 34 and V.shape[0] == 15
    np.testing.assert_allclose(U[30:], np.broadcast_to(U0.mean(0), (4, U0.shape[1])), rtol=1e-5, atol=1e-6)
    assert np.all(V[12:] == 0) and (b is None or np.all(b[12:] == 0))
    more = make_data(34, 15, seed=1)
    fit(pol, more, world, warm=True)  # warm_iterations = 0: existing rows untouched, new rows appended
    np.testing.assert_array_equal(pol.user_factors[:30], U0)
    np.testing.assert_array_equal(pol.item_factors[:12], V0)
    assert pol.user_factors.shape[0] == 34 and pol.item_factors.shape[0] == 15
    if name == "bpr":
        assert np.all(pol.user_factors[30:, -1] == 1.0) and np.all(pol.item_factors[12:] == 0)
    # a real warm retrain moves the factors and stays finite
    pol2 = cls(cls.Params(**SMALL[name], warm_iterations=2))
    pol2.load_state_dict(pol.state_dict())
    fit(pol2, more, world, warm=True)
    assert pol2.user_factors.shape == (34, U0.shape[1])
    assert not np.array_equal(pol2.item_factors[:12], V0)
    assert np.all(np.isfinite(pol2.user_factors))


@pytest.mark.parametrize("name", ["als", "bpr", "relmf"])
def test_mf_state_dict_roundtrip(name):
    cls = CLASSES[name]
    world = make_world(25, 10)
    data = make_data(25, 10)
    a = fit(cls(cls.Params(**SMALL[name])), data, world)
    state = a.state_dict()
    b = cls(cls.Params(**SMALL[name]))
    b.load_state_dict(state)
    users = np.arange(25)
    np.testing.assert_array_equal(a.score(users, world), b.score(users, world))
    h = History(25)
    h.add(data.users, data.items)
    np.testing.assert_array_equal(a.recommend(users, 3, world, exclude=h)[0],
                                  b.recommend(users, 3, world, exclude=h)[0])
    state["user_factors"][:] = 0  # the loaded copy is independent of the dict
    assert not np.all(b.user_factors == 0)


@pytest.mark.parametrize("name", ["als", "bpr", "relmf"])
def test_mf_unfitted_and_empty_log(name):
    cls = CLASSES[name]
    world = make_world(5, 6)
    pol = cls(cls.Params(**SMALL[name]))
    U, V, _ = pol.factors(world)
    assert U.shape[0] == 5 and V.shape[0] == 6
    fit(pol, TrainingData.empty(5, 6), world)
    idx, _ = pol.recommend(np.arange(5), 2, world)
    assert idx.shape == (5, 2)


def test_mf_learn_structure():
    """Block-structured data: each model ranks a user's own block above the other block."""
    nu, ni = 40, 20
    users, items = [], []
    for u in range(nu):
        block = np.arange(10) if u < nu // 2 else np.arange(10, 20)
        chosen = block[(np.arange(6) + u) % 10]
        users += [u] * len(chosen)
        items += chosen.tolist()
    z = np.zeros(len(users))
    data = TrainingData(np.array(users), np.array(items), z.astype(np.int32), z.astype(np.int8), nu, ni)
    world = make_world(nu, ni)
    for pol in (ALS(ALS.Params(factors=4)), BPR(BPR.Params(factors=4, iterations=40)),
                RelMF(RelMF.Params(factors=4, iterations=30)), ItemKNN()):
        fit(pol, data, world)
        s = pol.score(np.arange(nu), world)
        own = np.where(np.arange(nu)[:, None] < nu // 2, s[:, :10].mean(1, keepdims=True),
                       s[:, 10:].mean(1, keepdims=True))
        other = np.where(np.arange(nu)[:, None] < nu // 2, s[:, 10:].mean(1, keepdims=True),
                         s[:, :10].mean(1, keepdims=True))
        assert np.mean(own > other) > 0.9, type(pol).__name__


def test_relmf_propensity_sanity():
    theta = relmf_propensity(np.array([25.0, 100.0, 0.0, 1.0]))
    np.testing.assert_allclose(theta, [0.5, 1.0, 0.1, 0.1])
    assert 1.0 / theta[0] == pytest.approx(2.0)


def test_bpr_warm_start_continues_from_current_factors():
    """implicit only initialises factors that are None: a warm fit starts from ours (tiny step → ~same)."""
    world = make_world(50, 20)
    data = make_data(50, 20)
    a = fit(BPR(BPR.Params(factors=4, iterations=5)), data, world)
    b = BPR(BPR.Params(factors=4, learning_rate=1e-7, warm_iterations=1))
    b.load_state_dict(a.state_dict())
    fit(b, data, world, seed=2, warm=True)
    np.testing.assert_allclose(b.user_factors, a.user_factors, atol=1e-5)
    np.testing.assert_allclose(b.item_factors, a.item_factors, atol=1e-5)
