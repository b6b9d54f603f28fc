"""The scoring engine: every backend returns the slates of a brute-force reference (ties by lower item
id, excluded and -inf items never recommended, -1 padding), whatever the chunking; and a whole run gives
identical metrics under different chunk sizes and backends."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recloop.analysis import user_metrics as UM
from recloop.rng import derive_key, hash_uniform
from recloop.sim import kernels
from recloop.sim.backends import (
    TILE_ROWS,
    CupyBackend,
    available_backends,
    exclusion_csr,
    resolve_backend_name,
)
from recloop.sim.engine import ScoringEngine
from recloop.sim.state import History

CPU_BACKENDS = [b for b in ("numpy", "numba", "torch") if b in available_backends()]


def brute_topk(S: np.ndarray, k: int, excl_rows=(), excl_items=()):
    """Reference: sort every row by (-score, item id); excluded and -inf items dropped; pad with -1."""
    S = np.array(S, dtype=np.float32)
    S[np.asarray(excl_rows, np.int64), np.asarray(excl_items, np.int64)] = -np.inf
    n = S.shape[0]
    idx = np.full((n, k), -1, np.int64)
    val = np.full((n, k), -np.inf, np.float32)
    for r in range(n):
        order = sorted(range(S.shape[1]), key=lambda j: (-S[r, j], j))
        order = [j for j in order if S[r, j] > -np.inf][:k]
        idx[r, : len(order)] = order
        val[r, : len(order)] = S[r, order]
    return idx, val


@pytest.fixture(scope="module")
def tied_case():
    rng = np.random.default_rng(11)
    n, m = 60, 45
    S = rng.integers(0, 6, size=(n, m)).astype(np.float32)  # many ties
    S[rng.random((n, m)) < 0.1] = -np.inf  # some items cannot be recommended
    S[0, :] = 1.0  # a row of all-equal scores
    S[1, :] = -np.inf  # a row with nothing to recommend
    hist = History(n)
    for _ in range(3):  # several segments, with repeats
        u = rng.integers(0, n, 400)
        hist.add(u, rng.integers(0, m, 400))
    hist.add(np.full(m - 3, 2), np.arange(m - 3))  # user 2 has only 3 eligible items left
    r, c = hist.to_coo()
    return S, hist, r, c


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("chunk_rows", [1, 7, None])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_backends_match_brute_force(tied_case, backend, chunk_rows, k):
    S, hist, r, c = tied_case
    ref_i, ref_v = brute_topk(S, k, r, c)
    eng = ScoringEngine(backend, chunk_rows=chunk_rows)
    users = np.arange(S.shape[0])
    idx, val = eng.topk(users, k, S.shape[1], lambda ids: S[ids], exclude=hist)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_array_equal(val, ref_v)
    assert (idx[1] == -1).all()  # nothing recommendable
    assert (idx[2] >= 0).sum() <= 3  # only three items left for user 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("workers", [1, 2])
def test_factor_path_matches_brute_force(backend, workers):
    """The BLAS fast path (also on the worker pool) with a bias, ties and exclusions."""
    rng = np.random.default_rng(5)
    U = rng.integers(-2, 3, size=(90, 4)).astype(np.float32)  # small integers: exact products, many ties
    V = rng.integers(-2, 3, size=(70, 4)).astype(np.float32)
    b = rng.integers(0, 2, size=70).astype(np.float32)
    hist = History(90)
    hist.add(rng.integers(0, 90, 600), rng.integers(0, 70, 600))
    r, c = hist.to_coo()
    users = rng.permutation(90)[:80]
    S = U[users] @ V.T + b
    pos = {u: i for i, u in enumerate(users)}
    keep = np.isin(r, users)
    ref_i, ref_v = brute_topk(S, 10, [pos[u] for u in r[keep]], c[keep])
    for chunk_rows in (1, 7, None):
        eng = ScoringEngine(backend, chunk_rows=chunk_rows, workers=workers)
        seen: list[tuple[int, int]] = []

        def on_chunk(sl, items, scores, seen=seen):
            seen.append((sl.start, sl.stop))

        idx, val = eng.topk_factors(users, 10, U, V, b, exclude=hist, on_chunk=on_chunk)
        np.testing.assert_array_equal(idx, ref_i)
        np.testing.assert_array_equal(val, ref_v)
        assert seen[0][0] == 0 and seen[-1][1] == len(users)  # callbacks cover every user, in order
        assert all(a[1] == b_[0] for a, b_ in zip(seen, seen[1:], strict=False))


@pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba not installed")
def test_warm_start_hints_never_change_slates(tied_case):
    """Previous slates seed a lower bound for the next top-k; results equal the cold computation,
    also when hinted items are now excluded, tied, -inf, out of range or missing."""
    S, hist, r, c = tied_case
    rng = np.random.default_rng(9)
    users = np.arange(S.shape[0])
    eng = ScoringEngine("numba", chunk_rows=7)
    for _ in range(4):
        S2 = S + rng.integers(-1, 2, size=S.shape).astype(np.float32)  # scores move, ties stay
        got = eng.topk(users, 6, S.shape[1], lambda ids, S2=S2: S2[ids], exclude=hist)
        ref = brute_topk(S2, 6, r, c)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
    assert eng._prev  # hints were kept
    hint = rng.integers(-3, S.shape[1] + 3, size=(S.shape[0], 6)).astype(np.int32)  # junk hints
    idx, val = eng.backend.topk(S.copy(), 6, exclusion_csr(hist, users), hint=hint)
    ref = brute_topk(S, 6, r, c)
    np.testing.assert_array_equal(idx, ref[0])
    np.testing.assert_array_equal(val, ref[1])


def test_k_larger_than_eligible_pads_with_minus_one():
    S = np.array([[3.0, 1.0, 2.0, -np.inf]], np.float32)
    for backend in CPU_BACKENDS:
        idx, val = ScoringEngine(backend).topk(np.array([0]), 6, 4, lambda ids: S[ids])
        assert idx.tolist() == [[0, 2, 1, -1, -1, -1]]
        assert np.isneginf(val[0, 3:]).all()


def test_cupy_backend_logic_with_numpy_arrays(tied_case):
    """The CuPy backend's code path (argpartition + exact tie fix) run with NumPy standing in."""
    S, hist, r, c = tied_case
    be = CupyBackend(xp=np)
    excl = exclusion_csr(hist, np.arange(S.shape[0]))
    idx, val = be.topk(S, 5, excl)
    ref_i, ref_v = brute_topk(S, 5, r, c)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_array_equal(val, ref_v)


def test_random_slates_identical_with_and_without_numba():
    hist = History(40)
    hist.add(np.repeat(np.arange(40), 5), np.tile(np.arange(5), 40))
    key = derive_key(3, "initial_log", 0)
    users = np.arange(40)
    a = ScoringEngine("numpy").topk(users, 8, 30, lambda ids: hash_uniform(
        key, ids[:, None], np.arange(30)[None, :], dtype=np.float32), exclude=hist)[0]
    b = ScoringEngine("numba" if kernels.HAVE_NUMBA else "numpy").random_topk(users, 8, 30, key, exclude=hist)
    np.testing.assert_array_equal(a, b)
    assert not np.isin(b, np.arange(5)).any()  # history excluded


def test_history_lookups_match_sets():
    rng = np.random.default_rng(2)
    n_users, n_items = 30, 25
    h = History(n_users)
    truth: dict[int, set[int]] = {}
    for _ in range(40):  # many small segments: the log-structured merge runs
        u = rng.integers(0, n_users, 20)
        i = rng.integers(0, n_items, 20)
        h.add(u, i)
        for a, b in zip(u, i, strict=True):
            truth.setdefault(int(a), set()).add(int(b))
    assert len(h.segments) <= 8
    users = rng.permutation(n_users + 3)  # includes unknown users
    ptr, items = h.rows_csr(users)
    for row, u in enumerate(users):
        assert set(items[ptr[row]:ptr[row + 1]].tolist()) == truth.get(int(u), set())
    qu = rng.integers(0, n_users, 200)
    qi = rng.integers(0, n_items, 200)
    got = h.contains(qu, qi)
    want = np.array([int(b) in truth.get(int(a), set()) for a, b in zip(qu, qi, strict=True)])
    np.testing.assert_array_equal(got, want)
    ip, it = h.csr(users)  # sorted, duplicate-free rows
    for row, u in enumerate(users):
        assert it[ip[row]:ip[row + 1]].tolist() == sorted(truth.get(int(u), set()))
    from recloop.analysis.user_collectors import _mean_pair_jaccard

    pairs = rng.integers(0, len(users), (50, 2))
    assert _mean_pair_jaccard(ip, it, pairs) == pytest.approx(UM.mean_pair_jaccard(ip, it, pairs), abs=1e-15)
    h.compact()
    assert h.nnz == sum(len(s) for s in truth.values())


def test_kernels_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    a = rng.standard_normal((30, 8)).astype(np.float32)
    users = rng.integers(0, 50, 20)
    items = rng.integers(-1, 30, (20, 6))
    if kernels.HAVE_NUMBA:
        out = kernels.gather_dot(x, users, a, items, np.empty(items.shape, np.float32))
        ref = np.einsum("nkd,nd->nk", a[np.maximum(items, 0)].astype(np.float64), x[users].astype(np.float64))
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    from recloop.analysis.user_collectors import _drift_rows

    ia, ib = rng.integers(0, 50, 40), rng.integers(0, 50, 40)
    x[3] = 0
    got = _drift_rows(x, ia, x[::-1].copy(), ib)
    ref = UM.drift(x[ia], x[::-1][ib])
    for name in ref:
        # arccos is ill-conditioned at cos = 1: ~1e-16 in cos is ~1e-8 in the angle
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-9, atol=1e-7)


@pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba not installed")
def test_slerp_kernel_matches_dynamics_slerp():
    from recloop.agents.dynamics import slerp

    rng = np.random.default_rng(0)
    X = rng.standard_normal((80, 6)).astype(np.float32)
    A = rng.standard_normal((40, 6)).astype(np.float32)
    X[3] = 0  # zero preference
    A[5] = 0  # zero item
    A[7] = -X[9]  # antipodal
    users = np.concatenate([rng.permutation(np.setdiff1d(np.arange(80), [3, 9]))[:30], [3, 9]])
    items = rng.integers(0, 40, len(users))
    items[-2:] = [5, 7]
    ref = slerp(X[users], A[items], 0.1)
    kernels.slerp_rows(X, users.astype(np.int64), A, items.astype(np.int64), 0.1)
    np.testing.assert_allclose(X[users], ref, rtol=1e-4, atol=1e-5)  # float32 NumPy vs float64 kernel


def test_auto_backend_and_chunk_size():
    name = resolve_backend_name("auto")
    assert name in available_backends()
    if kernels.HAVE_NUMBA and name not in ("cupy", "torch"):
        assert name == "numba"
    eng = ScoringEngine("numpy")
    T = TILE_ROWS
    assert eng.rows_per_chunk(1000) == -(-(16 * 2**20 // 4000) // T) * T  # chunk_mib default, whole tiles
    assert ScoringEngine("numpy", chunk_rows=7).rows_per_chunk(10**6) == T  # rounded up to one tile
    assert ScoringEngine("numpy", chunk_rows=T + 1).rows_per_chunk(10**6) == 2 * T
    with pytest.raises(ValueError):
        ScoringEngine("no-such-backend")


SMALL = """
name: engine-invariance
seed: 4
steps: 6
k: 5
world: {type: gaussian_clusters, n_users: 300, n_items: 150, dim: 8, n_clusters: 4, n_creators: 6}
users:
  choice: {type: mnl, temperature: 0.1, no_click_utility: 0.2, position_bias: 0.5}
  dynamics: [{type: drift, rate: 0.05}]
  repeat_consumption: false
  organic_rate: 0.1
creators: {type: trecs, creation_prob: 0.2}
policies:
  content: {type: content}
  mf: {type: als, factors: 6, iterations: 3}
retrain: {every: 2}
initial_log: {interactions_per_user: 3, slate_size: 8}
metrics: {pairs: 60, user_sample: 80, regret_sample: 40}
output: {checkpoint_every: 0, flush_every: 3}
"""


def _run_metrics(write_yaml, tmp_path, name, engine, text=SMALL, overrides=None) -> pl.DataFrame:
    from recloop.sim.config import load_scenario
    from recloop.sim.runner import run_scenario

    path = write_yaml(text, f"{name}.yaml")
    sc = load_scenario(path, overrides={"engine": engine, **(overrides or {})})
    run_scenario(sc, tmp_path / name, progress=False)
    df = pl.read_parquet(tmp_path / name / "metrics.parquet")
    return df.sort(["policy", "seed", "step", "metric", "group"])


def test_full_run_identical_across_chunking_and_backends(write_yaml, tmp_path):
    """NumPy and Numba backends share the BLAS product (row-chunk invariant), so whole runs agree."""
    ref = _run_metrics(write_yaml, tmp_path, "ref", {"backend": "numpy"})
    assert ref.height > 0
    variants = [{"backend": "numpy", "chunk_rows": 7}]
    if "numba" in CPU_BACKENDS:
        variants += [{"backend": "numba"}, {"backend": "numba", "chunk_rows": 13}]
    for i, eng in enumerate(variants):
        got = _run_metrics(write_yaml, tmp_path, f"v{i}", eng)
        assert got.equals(ref, null_equal=True), eng


@pytest.mark.skipif("torch" not in CPU_BACKENDS, reason="torch not installed")
def test_full_run_identical_with_torch_on_exact_scores(write_yaml, tmp_path):
    """torch's CPU product (MKL) may round differently from OpenBLAS for some chunk shapes, so the
    whole-run check for torch uses policies whose scores are exact in any library (hashed random
    scores; popularity = a bias on zero factors) and no oracle regret (a product of true preferences):
    then slates, and every metric, are identical."""
    over = {"policies": {"random": {"type": "random"}, "popularity": {"type": "popularity"}},
            "metrics.regret_sample": 0}
    ref = _run_metrics(write_yaml, tmp_path, "tref", {"backend": "numpy"}, overrides=over)
    for i, eng in enumerate([{"backend": "torch"}, {"backend": "torch", "chunk_rows": 13}]):
        got = _run_metrics(write_yaml, tmp_path, f"t{i}", eng, overrides=over)
        # identical slates; metric values to the last bits (BLAS reductions inside metrics may differ
        # in the final ulp when the machine is loaded and thread partitioning changes)
        from polars.testing import assert_frame_equal

        assert_frame_equal(got, ref, check_exact=False, rel_tol=1e-9, abs_tol=1e-12)
