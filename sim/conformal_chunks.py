"""Softmax probabilities of a scorer over the whole catalog, one engine chunk of users at a time, for
conformal sets (reference C-SPLIT): what the ``conformal`` metric and the ``conformal_set`` policy share.

p̂(i | u) = softmax_i(β·s_ui) over the items a user can still get (consumed items are left out when
repeats are off). Nothing here holds a users × items matrix: score blocks come in the engine's chunks
(``rows_per_chunk`` users, each product over one canonical tile, so a row's scores never depend on the
chunk size), and each block is reduced at once to per-row numbers:

* the label's probability p̂(y) and the mass strictly above it, Σ_{p̂_i > p̂_y} p̂_i (LAC and APS scores);
* the sizes of LAC and APS sets {i : s(u, i) ≤ q̂} for any number of thresholds q̂, without sorting a
  row: a histogram of the probabilities over float32 exponent buckets (16 per octave) finds the bucket
  where the cumulative mass crosses q̂, and only that bucket's items are sorted (Numba, nogil);
* the statistics of a likelihood fit of the temperature 1/β (Newton steps on the concave log-likelihood).

Set semantics follow :mod:`recloop.sim.conformal` (``sets_lac``, ``sets_aps``): LAC keeps 1 − p̂_i ≤ q̂,
APS keeps Σ_{p̂_j > p̂_i} p̂_j + u·p̂_i ≤ q̂ (u = 1 non-randomised), ties sharing the mass above them. Items a
user cannot get (probability 0) are never in a set, except that q̂ = +∞ (the full set) counts every
item the user can get.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

from recloop.sim.backends import tile_bounds
from recloop.sim.engine import tiled_rows
from recloop.sim.kernels import njit
from recloop.sim.pool import blas_single_thread, parallel_rows

__all__ = ["BlockScorer", "HistoryBefore", "block_stats", "exclude_pairs", "fit_beta", "label_stats", "score_blocks",
           "set_sizes", "softmax_block"]

_SHIFT = 19  # float32 bits >> 19: exponent + 4 mantissa bits, 16 buckets per octave
_NB = (0x3F800000 >> _SHIFT) + 1  # buckets up to the bits of 1.0f (the largest e = exp(0))
#: float32 bits of 2^-40: items below it (relative to the row's largest, 1) are histogrammed only when needed
_CUT_BITS = (127 - 40) << 23
#: fast-math without the no-inf / no-nan assumptions (scores hold −inf for items a user cannot get)
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


# ------------------------------------------------------------------------------------------ score blocks
class BlockScorer:
    """Dense scores for chunks of users: from (U, V, b) factors, one BLAS product per canonical tile (on the
    engine's worker threads, BLAS pinned to one thread each, as the engine's own products), or from a
    scoring function ``fn(user_ids) -> (rows, n_items)`` called on the calling thread."""

    def __init__(self, n_items: int, factors=None, fn: Callable[[np.ndarray], np.ndarray] | None = None):
        self.n_items = int(n_items)
        self.fn = fn
        if factors is not None:
            U, V, b = factors
            self.U = U
            self.Vt = np.ascontiguousarray(np.asarray(V[:n_items], np.float32).T)
            self.b = None if b is None else np.ascontiguousarray(b[:n_items], dtype=np.float32)
            self.missing = n_items - self.Vt.shape[1]  # items newer than the factors: never in a set
        elif fn is None:
            raise ValueError("a BlockScorer needs factors or a scoring function")

    def _tile(self, ids: np.ndarray, out: np.ndarray, tile: int) -> None:
        """``out`` = scores of ``ids`` (at most one tile) through one product of exactly ``tile`` rows."""
        m = self.Vt.shape[1]
        if len(ids) == tile and not self.missing:
            np.matmul(np.asarray(self.U[ids], np.float32), self.Vt, out=out)
        else:
            U = np.zeros((tile, self.Vt.shape[0]), np.float32)
            U[: len(ids)] = self.U[ids]
            out[:, :m] = (U @ self.Vt)[: len(ids)]
        if self.b is not None:
            out[:, :m] += self.b
        if self.missing > 0:
            out[:, m:] = -np.inf

    def fill(self, ids: np.ndarray, S: np.ndarray, tile: int, workers: int = 1) -> np.ndarray:
        """Scores of ``ids`` into S (len(ids), n_items), tile by tile (tiles aligned to ids[0])."""
        ids = np.asarray(ids, np.int64)
        bounds = tile_bounds(len(ids), tile)
        if self.fn is not None:
            tiled_rows(self, ids, tile, S)
            return S

        def tiles(a, b):
            for lo, hi in bounds[a:b]:
                self._tile(ids[lo:hi], S[lo:hi], tile)

        with blas_single_thread():
            parallel_rows(len(bounds), tiles, workers, min_rows=1)
        return S

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        if self.fn is None:  # one product of exactly len(ids) rows (the engine's canonical tile, when it calls)
            out = np.empty((len(ids), self.n_items), np.float32)
            if len(ids):
                self._tile(ids, out, len(ids))
            return out
        s = np.asarray(self.fn(ids), np.float32)
        if s.shape != (len(ids), self.n_items):
            raise ValueError(f"a scorer returned shape {s.shape} for {len(ids)} users and {self.n_items} items")
        return s


def score_blocks(engine, ids: np.ndarray, scorer: BlockScorer, exclude=None) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(lo, hi, S)`` for ``ids[lo:hi]`` in the engine's chunks; S is float32 (hi − lo, n_items) with the
    excluded (user, item) pairs at −inf. Every product covers one canonical tile of the engine's backend
    (chunks are whole tiles), so a row's scores never depend on the chunk size or the worker count."""
    ids = np.asarray(ids, np.int64)
    n_items = scorer.n_items
    step = engine.rows_per_chunk(n_items)
    tile = engine.backend.tile_rows
    for lo in range(0, len(ids), step):
        hi = min(lo + step, len(ids))
        S = scorer.fill(ids[lo:hi], np.empty((hi - lo, n_items), np.float32), tile, engine.workers)
        if exclude is not None:
            exclude_pairs(S, ids[lo:hi], exclude)
        yield lo, hi, S


class HistoryBefore:
    """A history without some (user, item) pairs (those consumed this cycle): ``pairs(ids)`` for
    :func:`exclude_pairs`, so a label consumed this cycle is not excluded from its own softmax."""

    def __init__(self, history, users: np.ndarray, items: np.ndarray):
        self.history = history
        users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
        self.stride = int(items.max()) + 2 if len(items) else 1
        self.keys = np.unique(users * self.stride + items)

    def pairs(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, np.int64)
        r, c = self.history.pairs(ids)
        if not len(r) or not len(self.keys):
            return r, c
        inside = c < self.stride - 1
        keys = ids[r] * self.stride + np.where(inside, c, 0)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        keep = ~(inside & (self.keys[pos] == keys))
        return r[keep], c[keep]


def exclude_pairs(S: np.ndarray, ids: np.ndarray, exclude) -> None:
    """Set the excluded pairs of ``ids`` (an object with ``pairs(ids) -> (rows, items)``) to −inf in S."""
    r, c = exclude.pairs(ids)
    keep = c < S.shape[1]
    S[r[keep], c[keep]] = -np.inf


def _exp_rows(S: np.ndarray, beta: np.float32) -> None:
    """S ← exp(β·(S − max S)) row by row, in place (−inf stays 0; a row without a finite score: exp(β·S))."""
    top = S.max(axis=1, keepdims=True)
    top[~np.isfinite(top)] = 0.0
    np.subtract(S, top, out=S)
    S *= beta
    np.exp(S, out=S)


def softmax_block(S: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """(E, Z): E = exp(β·(S − max)) in float32, in place of S, and Z = Σ_i E (float64), so p̂ = E / Z.
    A row with no finite score gets Z = 0."""
    _exp_rows(S, np.float32(beta))
    return S, S.sum(axis=1, dtype=np.float64)


def block_stats(S: np.ndarray, beta: float, labels: np.ndarray, qs=(), modes=(), u=None, workers: int = 1):
    """Everything a conformal metric needs from one score block, computed in place of S (which becomes
    E = exp(β·(S − max))): ``(p_y, above, sizes, Z)`` with p̂_y, the mass strictly above it, the set size
    of each row at each threshold (``qs``: one per query, or (rows, queries); ``modes`` as in
    :func:`set_sizes`) and Z = Σ E (p̂ = E / Z). Row ranges run on the engine's worker threads (NumPy's
    exp and the Numba kernels release the GIL)."""
    n = len(S)
    lab = np.asarray(labels, np.int64)
    Q = _qmatrix(qs, n) if len(np.shape(qs)) and np.size(qs) else np.zeros((n, 0))
    modes = np.asarray(modes, np.int64)
    us = np.ones(n) if u is None else np.asarray(u, np.float64)
    ncand = np.zeros(n, np.int64)
    beta32 = np.float32(beta)

    def rows(lo, hi):
        if Q.shape[1]:
            ncand[lo:hi] = np.count_nonzero(S[lo:hi] > -np.inf, axis=1)
        _exp_rows(S[lo:hi], beta32)

    parallel_rows(n, rows, workers)
    return _stats(S, lab, ncand, Q, modes, us, workers)


# ------------------------------------------------------------------------------------------------ kernels
@njit(cache=True, nogil=True)
def _walk(vals, z, q, u, above0, lac):
    """How many of ``vals`` (sorted descending) a set at threshold ``q`` keeps, given the probability
    mass ``above0`` of every larger value; ties are kept or left together. LAC keeps 1 − p ≤ q, APS
    keeps above + u·p ≤ q."""
    kept = 0
    above = above0
    i = 0
    n = len(vals)
    while i < n:
        v = vals[i]
        j = i
        while j < n and vals[j] == v:
            j += 1
        p = v / z
        if not ((1.0 - p <= q) if lac else (above + u * p <= q)):
            break
        kept += j - i
        above += (j - i) * p
        i = j
    return kept


@njit(cache=True, nogil=True)
def _crossing(z, q, lac, low, cnt, mass):
    """(bucket, items kept above it, their mass) of one threshold from a row's histogram over float32
    exponent buckets: whole buckets from the top are kept while their least member would be; the first
    bucket that is not is the crossing one (-1: none, every item kept)."""
    kept = 0
    above = 0.0
    for b in range(_NB - 1, 0, -1):
        if cnt[b] == 0:
            continue
        if (1.0 - low[b] / z <= q) if lac else ((above + mass[b]) / z <= q):
            kept += cnt[b]
            above += mass[b]
            continue
        return b, kept, above
    return -1, kept, above


@njit(cache=True, nogil=True, fastmath=_FAST)
def _label_rows(E, labels, lo, hi, p_y, above, zout):
    """p̂_y and the mass above y per row of a softmax block (vectorised sums)."""
    for r in range(lo, hi):
        row = E[r]
        ey = row[labels[r]]
        z = 0.0
        a = 0.0
        for j in range(len(row)):
            e = row[j]
            z += e
            a += e if e > ey else 0.0
        zout[r] = z
        z = z if z > 0 else 1.0
        p_y[r] = ey / z
        above[r] = a / z


@njit(cache=True, nogil=True, fastmath=_FAST)
def _row_sums(row, ey):
    """(Σe, Σ_{e > e_y} e, #e > 0) of one row (vectorised)."""
    z = 0.0
    a = 0.0
    nz = 0
    for j in range(len(row)):
        e = row[j]
        z += e
        a += e if e > ey else 0.0
        nz += e > 0
    return z, a, nz


@njit(cache=True, nogil=True)
def _histogram(row, bits, cut, cnt, mass):
    """Counts and masses per exponent bucket of the items whose bits are ≥ ``cut``; returns their number."""
    cnt[:] = 0
    mass[:] = 0.0
    m = 0
    for j in range(len(row)):
        if bits[j] >= cut:
            b = bits[j] >> _SHIFT
            cnt[b] += 1
            mass[b] += row[j]
            m += 1
    return m


@njit(cache=True, nogil=True)
def _crossings(r, z, qs, modes, low, cnt, mass, cross, base, mabove):
    """Each threshold's crossing bucket (-2: q̂ = ±∞; -1: every histogram item kept)."""
    for k in range(qs.shape[1]):
        cross[k] = -2
        if qs[r, k] != np.inf and qs[r, k] != -np.inf:
            cross[k], base[k], mabove[k] = _crossing(z, qs[r, k], modes[k] == 0, low, cnt, mass)


@njit(cache=True, nogil=True)
def _size_rows(E, Eb, labels, ncand, qs, modes, us, low, lo, hi, p_y, above, sizes, zout):
    """Per row of a softmax block: p̂_y, the mass above y and the set size at every threshold. The histogram
    first covers only the items within 2^-40 of the row's largest value (e = 1): the crossing lies among
    them unless q̂ keeps all of them, and only then is the whole row histogrammed. One more pass gathers
    the crossing buckets' items, sorted once."""
    n = E.shape[1]
    nq = qs.shape[1]
    cnt = np.zeros(_NB, np.int64)
    mass = np.zeros(_NB, np.float64)
    flag = np.zeros(_NB, np.bool_)
    buf = np.empty(n + 1, np.float32)
    cross = np.empty(nq, np.int64)
    base = np.empty(nq, np.int64)
    mabove = np.empty(nq, np.float64)
    for r in range(lo, hi):
        row, bits = E[r], Eb[r]
        ey = row[labels[r]]
        z, a, nz = _row_sums(row, ey)
        zout[r] = z
        z = z if z > 0 else 1.0
        p_y[r] = ey / z
        above[r] = a / z
        inside = _histogram(row, bits, _CUT_BITS, cnt, mass)
        _crossings(r, z, qs, modes, low, cnt, mass, cross, base, mabove)
        if inside < nz and (cross == -1).any():  # the crossing may lie below the cut: the whole row
            _histogram(row, bits, 1, cnt, mass)
            _crossings(r, z, qs, modes, low, cnt, mass, cross, base, mabove)
        flag[:] = False
        for k in range(nq):
            if cross[k] >= 0:
                flag[cross[k]] = True
        m = 0
        if flag.any():  # branch-free compaction (bucket 0, e = 0, is never a crossing bucket)
            for j in range(n):
                buf[m] = row[j]
                m += flag[bits[j] >> _SHIFT]
        vals = -np.sort(-buf[:m])
        vbits = vals.view(np.int32) >> _SHIFT
        for k in range(nq):
            if cross[k] == -2:
                sizes[r, k] = ncand[r] if qs[r, k] > 0 else 0
            elif cross[k] == -1:
                sizes[r, k] = base[k]
            else:
                seg = vals[vbits == cross[k]]
                u = us[r] if modes[k] == 2 else 1.0
                sizes[r, k] = base[k] + _walk(seg, z, qs[r, k], u, mabove[k] / z, modes[k] == 0)


def _qmatrix(qs, n: int) -> np.ndarray:
    """Thresholds as (rows, queries): one per query (broadcast) or one per row and query (Mondrian)."""
    q = np.asarray(qs, np.float64)
    return np.ascontiguousarray(np.broadcast_to(q if q.ndim == 2 else q.reshape(1, -1), (n, q.shape[-1])))


def _stats(E, labels, ncand, qs, modes, us, workers):
    """(p_y, above, sizes, Z) of a softmax block on the worker threads (``qs`` as from :func:`_qmatrix`)."""
    n = len(E)
    p_y, above, z = np.zeros(n), np.zeros(n), np.zeros(n)
    sizes = np.zeros((n, qs.shape[1]), np.int64)

    def rows(a, b):
        if qs.shape[1]:
            _size_rows(E, E.view(np.int32), labels, ncand, qs, modes, us, _LOW, a, b, p_y, above, sizes, z)
        else:
            _label_rows(E, labels, a, b, p_y, above, z)

    parallel_rows(n, rows, workers)
    return p_y, above, sizes, z


def label_stats(E: np.ndarray, Z: np.ndarray, labels: np.ndarray, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(p̂_y, Σ_{p̂_i > p̂_y} p̂_i) per row of a softmax block ``E`` (from :func:`softmax_block`): the LAC
    score is 1 − p̂_y, the APS score mass_above + u·p̂_y (C-SPLIT)."""
    n = len(E)
    p_y, above, _, _ = _stats(E, np.asarray(labels, np.int64), np.zeros(n, np.int64), np.zeros((n, 0)),
                              np.zeros(0, np.int64), np.ones(n), workers)
    return p_y, above


def set_sizes(E: np.ndarray, Z: np.ndarray, qs, modes, u=None, ncand=None, workers: int = 1) -> np.ndarray:
    """|C| per row and threshold of a softmax block ``E``: ``qs[k]`` with ``modes[k]`` 0 (LAC), 1 (APS,
    u = 1) or 2 (randomised APS, ``u`` one draw per row). (rows, len(qs)) int64. ``ncand``: the size of
    the full set (q̂ = +∞) per row, default every item with p̂ > 0. ``qs`` may also be (rows, queries):
    one threshold per row (Mondrian)."""
    n = len(E)
    us = np.ones(n) if u is None else np.asarray(u, np.float64)
    ncand = np.count_nonzero(E > 0, axis=1) if ncand is None else np.asarray(ncand, np.int64)
    return _stats(E, np.zeros(n, np.int64), ncand, _qmatrix(qs, n), np.asarray(modes, np.int64), us, workers)[2]


_LOW = (np.arange(_NB, dtype=np.int64) << _SHIFT).astype(np.int32).view(np.float32).astype(np.float64)


# ----------------------------------------------------------------------------------------- temperature
@njit(cache=True, nogil=True, fastmath=_FAST)
def _weighted_sums(W, D, z, m1, m2):
    """Per row Σw, Σw·d, Σw·d² (d = s − max; −inf entries have w = 0 and count as d = 0)."""
    for r in range(W.shape[0]):
        a = 0.0
        b = 0.0
        c = 0.0
        for j in range(W.shape[1]):
            w = W[r, j]
            d = D[r, j] if w > 0 else 0.0
            a += w
            b += w * d
            c += w * d * d
        z[r], m1[r], m2[r] = a, b, c


def _moments(S: np.ndarray, beta: float, labels: np.ndarray) -> tuple[float, float, float]:
    """(Σ log p̂_β(y), Σ (s_y − E_β[s]), Σ Var_β[s]) over a block's rows (rows with a finite label)."""
    n = len(S)
    top = S.max(axis=1, keepdims=True)
    top[~np.isfinite(top)] = 0.0
    dy = S[np.arange(n), labels].astype(np.float64) - top[:, 0]
    S -= top
    W = np.exp(np.float32(beta) * S)
    z, m1, m2 = np.zeros(n), np.zeros(n), np.zeros(n)
    _weighted_sums(W, S, z, m1, m2)
    ok = np.isfinite(dy) & (z > 0)
    z, m1, m2, dy = z[ok], m1[ok] / z[ok], m2[ok] / z[ok], dy[ok]
    return float((beta * dy - np.log(z)).sum()), float((dy - m1).sum()), float(np.maximum(m2 - m1 * m1, 0.0).sum())


def fit_beta(blocks: Callable[[], Iterator[tuple[int, int, np.ndarray]]], labels: np.ndarray, beta0: float,
             max_iter: int = 8, tol: float = 1e-3) -> float:
    """Maximum-likelihood inverse temperature β of softmax(β·s) for the points (user, label): Newton steps
    on the concave log-likelihood, each a pass over ``blocks()`` (a fresh iterator of score blocks), until
    the Newton step is below ``tol``·β; a step that lowers the likelihood is halved (at most 5 times).
    Returns β > 0 (``beta0`` when nothing can be fitted). A warm start usually costs one or two passes."""
    labels = np.asarray(labels, np.int64)

    def stats(beta):
        ll = g = h = 0.0
        for lo, hi, S in blocks():
            a, b, c = _moments(S, beta, labels[lo:hi])
            ll, g, h = ll + a, g + b, h + c
        return ll, g, h

    beta = float(beta0)
    ll, g, h = stats(beta)
    for _ in range(max_iter):
        if h <= 0 or not math.isfinite(g):
            break
        step = g / h
        if abs(step) <= tol * beta:
            beta += step if beta + step > 0 else 0.0
            break
        new = beta + step if beta + step > 0 else beta / 2
        ll_new, g_new, h_new = stats(new)
        for _ in range(5):
            if ll_new >= ll - 1e-12 * abs(ll):
                break
            new = (beta + new) / 2
            ll_new, g_new, h_new = stats(new)
        if ll_new < ll - 1e-12 * abs(ll):
            break
        beta, ll, g, h = new, ll_new, g_new, h_new
    return beta
