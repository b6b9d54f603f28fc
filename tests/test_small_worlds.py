"""Issue 12, small worlds: the per-cycle metric paths rewritten for speed give exactly the values of the
computations they replace (kept here as references), on random inputs. The end-to-end values are also
pinned by tests/test_golden.py (bench-S, M, L, quickstart, ...: bitwise on the machine that made them)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from recloop.analysis import metric_kernels as MK
from recloop.analysis import metrics as M
from recloop.analysis import user_collectors as UC
from recloop.analysis import user_metrics as UM
from recloop.sim import kernels
from recloop.sim.state import History

needs_numba = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba kernels")


def _history(rng, n_users=40, n_items=30, cycles=25, per=30) -> History:
    """A history of many small segments, with repeated pairs inside and across them."""
    h = History(n_users)
    for _ in range(cycles):
        u = rng.integers(0, n_users, per)
        h.add(np.concatenate([u, u[:5]]), np.concatenate([rng.integers(0, n_items, per), rng.integers(0, 3, 5)]))
    return h


def _csr_reference(h: History, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """History.csr as it was: every segment's rows gathered, then each row sorted and deduplicated."""
    ptr, items = h.rows_csr(users)
    rows = [np.unique(items[ptr[r]:ptr[r + 1]]) for r in range(len(users))]
    out_ptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return out_ptr, np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)


@needs_numba
def test_history_csr_equals_the_sort_and_unique_reference():
    rng = np.random.default_rng(0)
    h = _history(rng)
    assert len(h.segments) > 1
    for users in (rng.permutation(45),  # all users (the merged, cached path) and unknown ones
                  rng.integers(0, 40, 6),  # a few users, repeated (the per-segment merge)
                  np.zeros(0, np.int64), np.arange(40)):
        got, want = h.csr(users), _csr_reference(h, users)
        assert got[0].dtype == np.int64 and got[1].dtype == np.int64
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        ref_ptr, ref_items = kernels.csr_sorted_unique(*h.rows_csr(users))  # the kernel path it replaced
        np.testing.assert_array_equal(got[1], ref_items)
    before = h.csr(np.arange(40))
    h.add(np.array([0, 39]), np.array([29, 28]))  # the cache follows the history
    after = h.csr(np.arange(40))
    np.testing.assert_array_equal(after[1], _csr_reference(h, np.arange(40))[1])
    assert len(after[1]) >= len(before[1])
    assert History(5).csr(np.arange(3))[0].tolist() == [0, 0, 0, 0]


@needs_numba
def test_slate_pair_jaccard_equals_the_csr_route():
    rng = np.random.default_rng(1)
    for k in (1, 5, 10):
        slates = rng.integers(-1, 12, (60, k))  # -1: empty slots; repeated ids too
        pos = rng.integers(0, 60, (200, 2))
        out = np.empty(len(pos))
        MK.slate_pair_jaccard(slates, pos, out)
        need, local = np.unique(pos, return_inverse=True)  # the route it replaces
        sl = np.sort(slates[need], axis=1)
        ip = np.arange(0, sl.size + 1, k, dtype=np.int64)[: len(sl) + 1]
        want = np.empty(len(pos))
        kernels.pair_jaccard(ip, sl.ravel(), local.reshape(-1, 2), want)
        np.testing.assert_array_equal(out, want)
        assert UC._slate_pair_jaccard(slates, pos) == float(want.mean())


@needs_numba
def test_history_pair_jaccard_equals_the_unique_route():
    rng = np.random.default_rng(2)
    h = _history(rng)
    pairs = rng.integers(0, 42, (300, 2))
    users = np.unique(pairs)
    ip, it = h.csr(users)
    want = UC._mean_pair_jaccard(ip, it, np.searchsorted(users, pairs))
    assert UC._history_pair_jaccard(h, pairs) == want
    assert want == pytest.approx(UM.mean_pair_jaccard(ip, it, np.searchsorted(users, pairs)), abs=1e-15)


@needs_numba
def test_csr_row_sums_equal_bincount():
    rng = np.random.default_rng(3)
    lens = rng.integers(0, 9, 50)
    ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    items = rng.integers(0, 20, int(ptr[-1]))
    w = rng.random(20) * 1e3
    owner = np.repeat(np.arange(50), lens)
    got = MK.csr_row_sums(ptr, items, w, np.empty(50))
    np.testing.assert_array_equal(got, np.bincount(owner, weights=w[items], minlength=50))


def test_average_ranks_equal_scipy():
    rng = np.random.default_rng(4)
    for t in range(300):
        n = int(rng.integers(1, 200))
        x = rng.integers(0, int(rng.integers(1, 30)), n) / 3.0 if t % 2 else rng.random(n)
        np.testing.assert_array_equal(M._average_ranks(x), stats.rankdata(x, method="average"))


def test_full_slate_mean_equals_per_user_mean():
    rng = np.random.default_rng(5)
    pop = rng.random(40) * 100
    slates = rng.integers(0, 40, (70, 10))
    np.testing.assert_array_equal(pop[slates].sum(axis=1) / 10, M.per_user_mean(slates, pop))


def _most_similar_reference(U, q, n, rng):
    """user_collectors._most_similar as it was (every candidate block normalised on its own)."""
    cand = rng.permutation(n) if n <= UC.SIMILAR_POOL else rng.choice(n, size=UC.SIMILAR_POOL, replace=False)
    Q = UC._unit_rows(U[q]).astype(np.float32)
    slot = np.full(n, -1, np.int64)
    slot[cand] = np.arange(len(cand))
    self_slot = slot[q]
    best = np.full(len(q), -np.inf, np.float32)
    partner = np.zeros(len(q), np.int64)
    rows = np.arange(len(q))
    for lo in range(0, len(cand), UC._SIMILAR_BLOCK):
        c = cand[lo:lo + UC._SIMILAR_BLOCK]
        sims = Q @ UC._unit_rows(U[c]).astype(np.float32).T
        mine = (self_slot >= lo) & (self_slot < lo + len(c))
        sims[rows[mine], self_slot[mine] - lo] = -np.inf
        j = np.argmax(sims, axis=1)
        v = sims[rows, j]
        better = v > best
        best[better] = v[better]
        partner[better] = c[j[better]]
    return partner


@pytest.mark.parametrize("n", [600, 1000])
def test_most_similar_equals_the_reference(n):
    rng = np.random.default_rng(6)
    U = rng.standard_normal((n + 7, 8)).astype(np.float32)
    U[::5] = U[1::5][: len(U[::5])]  # exact ties between users
    U[3] = 0  # a zero row
    q = rng.choice(n, size=300, replace=False)
    got = UC._most_similar(U, q, n, np.random.default_rng(11))
    np.testing.assert_array_equal(got, _most_similar_reference(U, q, n, np.random.default_rng(11)))


def test_user_sample_equals_isin():
    from recloop.sim.measure import MetricSuite

    rng = np.random.default_rng(7)
    suite = MetricSuite.__new__(MetricSuite)
    for _ in range(50):
        suite.sample = np.sort(rng.choice(500, size=int(rng.integers(0, 60)), replace=False)).astype(np.int64)
        active = np.sort(rng.choice(700, size=int(rng.integers(0, 400)), replace=False)).astype(np.int64)
        want = suite.sample[np.isin(suite.sample, active, assume_unique=True)]
        np.testing.assert_array_equal(suite.user_sample(active), want)
