"""Re-rankers: MMR (E-MMR), calibrated (E-CALIB), FA*IR (E-FAIR), popularity penalty, identity."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from recloop.contracts import PlatformView
from recloop.recommenders.base import TrainingData
from recloop.recommenders.rerankers import (
    MMR,
    Calibrated,
    FairTopK,
    Identity,
    PopularityPenalty,
    Reranker,
    calibration_kl,
    fair_adjusted_mtable,
    fair_fail_probability,
    fair_mtable,
)
from recloop.registry import _REGISTRY
from recloop.sim.state import History, Items, Users, World

ALL = {"identity": Identity, "mmr": MMR, "calibrated": Calibrated, "fair": FairTopK,
       "popularity_penalty": PopularityPenalty}


def world_from(attrs, genres=None, group=None, n_users=3) -> World:
    attrs = np.asarray(attrs, np.float32)
    n = attrs.shape[0]
    genres = np.full((n, 2), 0.5) if genres is None else np.asarray(genres)
    items = Items.create(attrs, genres, [f"i{j}" for j in range(n)], group=group)
    return World(Users.create(np.ones((n_users, attrs.shape[1]))), items)


def random_case(n=7, m=12, n_items=30, seed=0):
    rng = np.random.default_rng(seed)
    world = world_from(rng.normal(size=(n_items, 4)), rng.dirichlet(np.ones(3), n_items),
                       group=(rng.random(n_items) < 0.3).astype(np.int8), n_users=n)
    cand = np.stack([rng.choice(n_items, m, replace=False) for _ in range(n)])
    scores = rng.normal(size=(n, m)).astype(np.float32)
    cand[0, 3] = -1  # invalid id
    scores[0, 3] = -np.inf
    scores[1, 5] = -np.inf  # invalid score
    scores[2, :] = -np.inf  # a user with nothing valid
    cand[2, :] = -1
    hist = History(n)
    hist.add(np.repeat(np.arange(n), 4), rng.integers(0, n_items, 4 * n))
    return world, cand, scores, hist


# ------------------------------------------------------------------------------------------------ shared
@pytest.mark.parametrize("name", list(ALL))
def test_registered_shapes_validity_determinism(name):
    spec = _REGISTRY["reranker"][name]
    assert spec.cls is ALL[name] and issubclass(spec.cls, Reranker)
    with pytest.raises(ValidationError):
        spec.params.model_validate({"no_such_key": 1})
    rr = spec.cls(spec.params())
    world, cand, scores, hist = random_case()
    c0, s0 = cand.copy(), scores.copy()
    out = rr.rerank(np.arange(7), cand, scores, 5, world, step=0, history=hist)
    np.testing.assert_array_equal(cand, c0)  # inputs untouched
    np.testing.assert_array_equal(scores, s0)
    assert out.shape == (7, 5) and out.dtype == np.int64
    again = spec.cls(spec.params()).rerank(np.arange(7), cand, scores, 5, world, step=0, history=hist)
    np.testing.assert_array_equal(out, again)
    for u in range(7):
        valid = set(cand[u][(cand[u] >= 0) & np.isfinite(scores[u])].tolist())
        row = out[u][out[u] >= 0].tolist()
        assert set(row) <= valid and len(set(row)) == len(row)
        assert len(row) == min(5, len(valid))
        assert np.all(out[u][len(row):] == -1)  # -1 only at the end
    assert np.all(out[2] == -1)
    # k larger than the number of candidates pads with -1
    big = rr.rerank(np.arange(7), cand, scores, 15, world, history=hist)
    assert big.shape == (7, 15) and np.all(big[:, 12:] == -1)
    # the empty case
    assert rr.rerank(np.zeros(0, np.int64), cand[:0], scores[:0], 3, world, history=hist).shape == (0, 3)


def test_greedy_ties_prefer_higher_base_score():
    world = world_from([[1, 0], [1, 0], [1, 0]])  # identical items: every similarity is 1
    cand = np.array([[0, 1, 2]])
    scores = np.array([[0.1, 0.9, 0.5]], np.float32)
    out = MMR(MMR.Params(lambda_=0.0)).rerank(np.array([0]), cand, scores, 3, world)  # pure diversity
    np.testing.assert_array_equal(out, [[1, 2, 0]])
    out = Calibrated(Calibrated.Params(lambda_=1.0)).rerank(np.array([0]), cand, scores, 3, world)
    np.testing.assert_array_equal(out, [[1, 2, 0]])


def test_identity_is_topk_by_score_with_ties_by_position():
    world = world_from(np.eye(5))
    cand = np.array([[4, 3, 2, 1, 0]])
    scores = np.array([[0.5, 0.9, 0.5, -np.inf, 0.1]], np.float32)
    out = Identity().rerank(np.array([0]), cand, scores, 4, world)
    np.testing.assert_array_equal(out, [[3, 4, 2, 0]])


# ------------------------------------------------------------------------------------------------- MMR
def test_mmr_sanity_reference():
    # a=(1,0), b=(1,0), c=(0,1): sim(a,b)=1, sim(a,c)=0; rel a=.9, b=.8, c=.5; λ=.5, k=2 → [a, c]
    world = world_from([[1, 0], [1, 0], [0, 1]])
    cand = np.array([[0, 1, 2]])
    scores = np.array([[0.9, 0.8, 0.5]], np.float32)
    for normalize in (False, True):
        rr = MMR(MMR.Params(lambda_=0.5, normalize=normalize))
        np.testing.assert_array_equal(rr.rerank(np.array([0]), cand, scores, 2, world), [[0, 2]])
    # λ = 1 is pure relevance
    np.testing.assert_array_equal(MMR(MMR.Params(lambda_=1.0)).rerank(np.array([0]), cand, scores, 2, world),
                                  [[0, 1]])


def test_mmr_lambda_alias():
    assert MMR.Params.model_validate({"lambda": 0.3}).lambda_ == 0.3
    assert MMR.Params(lambda_=0.2).lambda_ == 0.2
    assert Calibrated.Params.model_validate({"lambda": 0.7, "alpha": 0.02}).lambda_ == 0.7


def _mmr_naive(cand, scores, k, attrs, lam):
    out = []
    for c, s in zip(cand, scores, strict=True):
        ok = (c >= 0) & np.isfinite(s)
        idx = list(np.flatnonzero(ok))
        if not idx:
            out.append([-1] * k)
            continue
        lo, hi = s[ok].min(), s[ok].max()
        rel = {j: (s[j] - lo) / (hi - lo) if hi > lo else 1.0 for j in idx}
        A = attrs / np.maximum(np.linalg.norm(attrs, axis=1, keepdims=True), 1e-300)
        chosen = []
        for _ in range(min(k, len(idx))):
            best, bv = None, -np.inf
            for j in idx:
                if j in chosen:
                    continue
                pen = max((A[c[j]] @ A[c[q]] for q in chosen), default=0.0)
                v = lam * rel[j] - (1 - lam) * pen
                if v > bv:
                    best, bv = j, v
            chosen.append(best)
        out.append([int(c[j]) for j in chosen] + [-1] * (k - len(chosen)))
    return np.array(out)


def test_mmr_vectorised_matches_naive_loop():
    world, cand, scores, hist = random_case(seed=4)
    out = MMR(MMR.Params(lambda_=0.6)).rerank(np.arange(7), cand, scores, 6, world, history=hist)
    ref = _mmr_naive(cand, scores.astype(np.float64), 6, world.items.attrs.astype(np.float64), 0.6)
    np.testing.assert_array_equal(out, ref)


# ------------------------------------------------------------------------------------------ calibrated
def test_calibrated_sanity_reference():
    # p = (.5, .5); a (genre A, .9), b (A, .8), c (B, .5); λ = .5, k = 2 → [a, c]
    genres = np.array([[1, 0], [1, 0], [0, 1], [1, 0], [0, 1]], float)
    world = world_from(np.eye(5), genres)
    hist = History(1)
    hist.add(np.array([0, 0]), np.array([3, 4]))  # history: one A item and one B item → p = (.5, .5)
    cand = np.array([[0, 1, 2]])
    scores = np.array([[0.9, 0.8, 0.5]], np.float32)
    rr = Calibrated(Calibrated.Params(lambda_=0.5))
    out = rr.rerank(np.array([0]), cand, scores, 2, world, history=hist)
    np.testing.assert_array_equal(out, [[0, 2]])
    p = np.array([0.5, 0.5])
    obj_ac = 0.5 * (0.9 + 0.5) - 0.5 * calibration_kl(p, np.array([0.5, 0.5]))
    obj_ab = 0.5 * (0.9 + 0.8) - 0.5 * calibration_kl(p, np.array([1.0, 0.0]))
    assert obj_ac == pytest.approx(0.70, abs=1e-9)
    assert obj_ab == pytest.approx(-0.129, abs=5e-4)
    assert calibration_kl(p, np.array([1.0, 0.0])) == pytest.approx(1.958518, abs=1e-6)  # M-CALKL
    # without history there is nothing to calibrate to: the top-k by score
    out = Calibrated().rerank(np.array([0]), cand, scores, 2, world, history=None)
    np.testing.assert_array_equal(out, [[0, 1]])


def test_calibrated_lambda_zero_is_identity():
    world, cand, scores, hist = random_case(seed=2)
    a = Calibrated(Calibrated.Params(lambda_=0.0)).rerank(np.arange(7), cand, scores, 5, world, history=hist)
    b = Identity().rerank(np.arange(7), cand, scores, 5, world)
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------- FA*IR
def test_fair_mtable_sanity_reference():
    assert fair_mtable(20, 0.25, 0.1).tolist() == [0] * 8 + [1] * 6 + [2] * 5 + [3]
    assert fair_mtable(10, 0.2, 0.15).tolist() == [0] * 8 + [1, 1]
    assert fair_mtable(30, 0.3, 0.05).tolist() == [0] * 8 + [1] * 5 + [2] * 5 + [3] * 5 + [4] * 4 + [5] * 3


@pytest.mark.parametrize("k,p,alpha,table,fail", [
    (10, 0.2, 0.15, [0] * 8 + [1, 1], 0.134217728),
    (20, 0.25, 0.1, [0] * 8 + [1] * 7 + [2] * 5, 0.10515247355215251),
    (30, 0.3, 0.05, [0] * 10 + [1] * 6 + [2] * 5 + [3] * 4 + [4] * 5, 0.04877730797178359),
])
def test_fair_adjusted_mtable_matches_fairsearchcore(k, p, alpha, table, fail):
    mt, _ = fair_adjusted_mtable(k, p, alpha)
    assert mt.tolist() == table
    assert fair_fail_probability(mt, p) == pytest.approx(fail, abs=1e-9)
    cons, a_c = fair_adjusted_mtable(k, p, alpha, rule="conservative")
    assert fair_fail_probability(cons, p) <= alpha and a_c <= alpha


def _fair_naive(cand, scores, prot, k, mt):
    """A direct port of fairsearchcore.re_ranker.fair_top_k (per user, lists sorted by score)."""
    out = []
    for c, s, pr in zip(cand, scores, prot, strict=True):
        ok = (c >= 0) & np.isfinite(s)
        order = [j for j in np.argsort(-s, kind="stable") if ok[j]]
        P = [j for j in order if pr[j]]
        N = [j for j in order if not pr[j]]
        res, cp, ip, iN = [], 0, 0, 0
        for i in range(k):
            if ip >= len(P) and iN >= len(N):
                break
            if ip >= len(P):
                res.append(N[iN]); iN += 1  # noqa: E702
            elif iN >= len(N):
                res.append(P[ip]); ip += 1; cp += 1  # noqa: E702
            elif cp < mt[i] or s[P[ip]] >= s[N[iN]]:
                res.append(P[ip]); ip += 1; cp += 1  # noqa: E702
            else:
                res.append(N[iN]); iN += 1  # noqa: E702
        out.append([int(c[j]) for j in res] + [-1] * (k - len(res)))
    return np.array(out)


@pytest.mark.parametrize("adjust", [False, True])
def test_fair_matches_reference_algorithm_and_is_fair(adjust):
    world, cand, scores, hist = random_case(n=20, m=25, n_items=60, seed=7)
    rr = FairTopK(FairTopK.Params(p=0.5, alpha=0.1, adjust=adjust))
    k = 10
    out = rr.rerank(np.arange(20), cand, scores, k, world)
    mt = rr.mtable(k, world)
    prot = world.items.group[np.maximum(cand, 0)] == 1
    np.testing.assert_array_equal(out, _fair_naive(cand, scores, prot, k, mt))
    for u in range(20):
        n_prot_avail = int((prot[u] & (cand[u] >= 0) & np.isfinite(scores[u])).sum())
        counts = np.cumsum(world.items.group[np.maximum(out[u], 0)] * (out[u] >= 0))
        assert np.all(counts >= np.minimum(mt, n_prot_avail))


def test_fair_default_p_is_catalog_share():
    world = world_from(np.eye(8), group=np.array([1, 1, 0, 0, 0, 0, 0, 0], np.int8))
    rr = FairTopK(FairTopK.Params(adjust=False))
    np.testing.assert_array_equal(rr.mtable(20, world), fair_mtable(20, 0.25, 0.1))
    # top-scored items are all unprotected, but the protected share is pushed into the slate
    cand = np.arange(8)[None, ::-1].copy()
    scores = np.linspace(1, 0, 8, dtype=np.float32)[None]
    out = FairTopK(FairTopK.Params(p=0.5, adjust=False)).rerank(np.array([0]), cand, scores, 8, world)
    assert world.items.group[out[0, :4]].sum() >= fair_mtable(4, 0.5, 0.1)[-1]


# ----------------------------------------------------------------------------------- popularity penalty
def test_popularity_penalty_sources_and_effect():
    world = world_from(np.eye(4), n_users=2)
    cand = np.array([[0, 1, 2, 3]])
    scores = np.array([[1.0, 0.9, 0.8, 0.0]], np.float32)
    phi = np.array([100.0, 0.0, 0.0, 0.0])
    # no popularity known → no penalty
    np.testing.assert_array_equal(PopularityPenalty().rerank(np.array([0]), cand, scores, 2, world), [[0, 1]])
    # from the platform view
    view = PlatformView(SimpleNamespace(world=world, popularity=phi, t=0))
    rr = PopularityPenalty(PopularityPenalty.Params(weight=0.5))
    np.testing.assert_array_equal(rr.rerank(np.array([0]), cand, scores, 2, view), [[1, 2]])
    # from the training log via fit (wins over the context), and checkpointed
    z = np.zeros(3, np.int32)
    data = TrainingData(np.array([0, 1, 0]), np.array([2, 2, 1]), z, z.astype(np.int8), 2, 4)
    rr.fit(data, world, step=0, rng=np.random.default_rng(0), warm_start=False)  # the pipeline's call
    np.testing.assert_array_equal(rr.popularity, [0, 1, 2, 0])
    np.testing.assert_array_equal(rr.rerank(np.array([0]), cand, scores, 2, world), [[0, 1]])
    other = PopularityPenalty(PopularityPenalty.Params(weight=0.5))
    other.load_state_dict(rr.state_dict())
    np.testing.assert_array_equal(other.popularity, rr.popularity)
    # from the history object
    hist = History(2)
    hist.add(np.array([0, 1]), np.array([0, 0]))
    rr = PopularityPenalty(PopularityPenalty.Params(weight=0.5))
    out = rr.rerank(np.array([0]), cand, scores, 2, world, history=hist)
    np.testing.assert_array_equal(out, [[1, 2]])
    # the raw variant
    rr = PopularityPenalty(PopularityPenalty.Params(weight=0.1, normalize=False))
    np.testing.assert_array_equal(rr.rerank(np.array([0]), cand, scores, 2, view), [[1, 2]])
