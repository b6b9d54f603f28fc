"""Numba kernels for the engine's hot loops: fused exclusion-aware top-k and slate gathers.

Everything here is optional: :mod:`recloop.sim.engine` falls back to NumPy when Numba cannot be
imported (``HAVE_NUMBA`` is False then). The kernels are compiled on first use and cached on disk
(``cache=True``), release the GIL (``nogil=True``) and run rows in parallel (``prange``).

Top-k semantics (shared with every backend): per row, the ``k`` largest scores, ranked by score
descending and, on equal scores, by lower item id; excluded items and items scoring ``-inf`` are
never returned, and slots left empty hold item ``-1`` with score ``-inf``.
"""

from __future__ import annotations

import os

import numpy as np

try:  # numba is a dependency, but keep the engine importable without it
    import numba
    from numba import njit, prange

    HAVE_NUMBA = True
    if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
        # runs fork worker processes (runner --workers): GNU OpenMP is not fork-safe, so pick tbb when
        # installed, else the workqueue layer (fork-safe; kernels are launched from one thread)
        numba.config.THREADING_LAYER = "forksafe"
except Exception:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

    def njit(*a, **kw):
        def deco(f):
            return f

        return deco(a[0]) if a and callable(a[0]) else deco

    prange = range
    numba = None

_BLOCK = 64  # items tested per vectorised threshold check (>= 64 lets LLVM vectorise the count)


@njit(cache=True, nogil=True, inline="always")
def _insert(vals, idx, k, v, j):
    """Insert (v, j) into the ranked buffer (vals desc, ties by lower id); v beats vals[k-1]."""
    p = k - 1
    while p > 0 and vals[p - 1] < v:  # equal values stay ahead: they have lower ids
        vals[p] = vals[p - 1]
        idx[p] = idx[p - 1]
        p -= 1
    vals[p] = v
    idx[p] = j


@njit(cache=True, nogil=True)
def _scan(row, lo, hi, k, vals, idx, offset):
    """Offer row[lo:hi] (item ids lo+offset ...) to the buffer; returns nothing, updates in place."""
    thr = vals[k - 1]
    j = lo
    while j + _BLOCK <= hi:
        c = 0
        for t in range(j, j + _BLOCK):  # branch-free count: vectorises
            c += row[t] > thr
        if c > 0:
            for t in range(j, j + _BLOCK):
                v = row[t]
                if v > thr:
                    _insert(vals, idx, k, v, t + offset)
                    thr = vals[k - 1]
        j += _BLOCK
    while j < hi:
        v = row[j]
        if v > thr:
            _insert(vals, idx, k, v, j + offset)
            thr = vals[k - 1]
        j += 1


@njit(cache=True, nogil=True)
def _topk_one(row, k, excl, out_val, out_idx):
    # the buffer lives in local arrays (no aliasing with the score row), copied out at the end
    vals = np.empty(k, np.float32)
    idx = np.empty(k, np.int64)
    for p in range(k):
        vals[p] = -np.inf
        idx[p] = -1
    m = row.shape[0]
    ne = excl.shape[0]
    if ne == 0:
        _scan(row, 0, m, k, vals, idx, 0)
    else:
        ex = excl
        if ne > 1:
            ex = np.sort(excl)
        lo = 0
        e = 0
        while lo < m:
            while e < ne and ex[e] < lo:  # merge-walk the sorted exclusion list (duplicates are fine)
                e += 1
            hi = m
            if e < ne and ex[e] < m:
                hi = ex[e]
            _scan(row, lo, hi, k, vals, idx, 0)
            lo = hi + 1
    for p in range(k):
        out_val[p] = vals[p]
        out_idx[p] = idx[p]


@njit(parallel=True, cache=True, nogil=True)
def topk_rows(S, k, ex_ptr, ex_idx, out_idx, out_val):
    """Top-k of every row of ``S`` (n, m) skipping row r's items ex_idx[ex_ptr[r]:ex_ptr[r+1]]."""
    n = S.shape[0]
    for r in prange(n):
        _topk_one(S[r], k, ex_idx[ex_ptr[r]:ex_ptr[r + 1]], out_val[r], out_idx[r])


@njit(cache=True, nogil=True)
def topk_rows_serial(S, k, ex_ptr, ex_idx, out_idx, out_val):
    """As :func:`topk_rows` on the calling thread (for a pool of worker threads)."""
    n = S.shape[0]
    for r in range(n):
        _topk_one(S[r], k, ex_idx[ex_ptr[r]:ex_ptr[r + 1]], out_val[r], out_idx[r])


@njit(parallel=True, cache=True, nogil=True)
def gather_dot(x, users, a, items, out):
    """out[r, j] = <x[users[r]], a[items[r, j]]> (float32 result, float32 accumulation in d order);
    0 where items[r, j] < 0. Never materialises the (n, k, d) gather."""
    n, k = items.shape
    d = x.shape[1]
    for r in prange(n):
        u = users[r]
        for j in range(k):
            i = items[r, j]
            if i < 0:
                out[r, j] = 0.0
                continue
            s = np.float32(0.0)
            for t in range(d):
                s += x[u, t] * a[i, t]
            out[r, j] = s
    return out


# -- counter-based hashing (bit-identical to recloop.sim.rng.hash_u64 / hash_uniform) -------------
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_C2 = np.uint64(0x632BE59BD9B4E019)
_ONE = np.uint64(1)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


@njit(cache=True, nogil=True, inline="always")
def _mix(z):
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(cache=True, nogil=True, inline="always")
def _hash_uniform32(zu, b):
    """hash_uniform(key, a, b) as float32, given zu = _mix(key + GOLDEN*(a+1))."""
    h = _mix(zu ^ (np.uint64(b) * _GOLDEN + _C2)) >> _S11
    return np.float32((np.float64(h) + 0.5) * (1.0 / 9007199254740992.0))


@njit(parallel=True, cache=True, nogil=True)
def hash_topk(key, users, n_items, k, ex_ptr, ex_idx, out_idx, out_val):
    """Top-k of the hashed uniform scores hash_uniform(key, user, item) (float32) per user, skipping
    excluded items: ``k`` distinct random items per user without a users x items score matrix."""
    n = users.shape[0]
    for r in prange(n):
        row = np.empty(n_items, np.float32)
        zu = _mix(key + _GOLDEN * (np.uint64(users[r]) + _ONE))
        for i in range(n_items):
            row[i] = _hash_uniform32(zu, i)
        _topk_one(row, k, ex_idx[ex_ptr[r]:ex_ptr[r + 1]], out_val[r], out_idx[r])


# -- sparse histories ------------------------------------------------------------------------------
@njit(parallel=True, cache=True, nogil=True)
def csr_contains(ptr, idx, users, items, out):
    """out[j] |= items[j] in row users[j] of a CSR whose rows are sorted (binary search)."""
    n_rows = ptr.shape[0] - 1
    for j in prange(users.shape[0]):
        u = users[j]
        if out[j] or u < 0 or u >= n_rows:
            continue
        lo = ptr[u]
        hi = ptr[u + 1]
        x = items[j]
        while lo < hi:
            mid = (lo + hi) >> 1
            if idx[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        if lo < ptr[u + 1] and idx[lo] == x:
            out[j] = True


@njit(cache=True, nogil=True)
def _merge_row(a, b, out, write):
    """Merge two sorted rows without duplicates; writes to ``out`` when ``write``; returns the length."""
    i = 0
    j = 0
    n = 0
    last = -1
    have = False
    while i < a.shape[0] or j < b.shape[0]:
        if j >= b.shape[0] or (i < a.shape[0] and a[i] <= b[j]):
            v = a[i]
            i += 1
        else:
            v = b[j]
            j += 1
        if have and v == last:
            continue
        if write:
            out[n] = v
        n += 1
        last = v
        have = True
    return n


@njit(parallel=True, cache=True, nogil=True)
def merge_csr(ptr_a, idx_a, ptr_b, idx_b):
    """Row-wise union of two CSRs with sorted rows (same row count): sorted, duplicates removed."""
    n = ptr_a.shape[0] - 1
    counts = np.empty(n, np.int64)
    dummy = np.empty(0, idx_a.dtype)
    for r in prange(n):
        counts[r] = _merge_row(idx_a[ptr_a[r]:ptr_a[r + 1]], idx_b[ptr_b[r]:ptr_b[r + 1]], dummy, False)
    ptr = np.zeros(n + 1, np.int64)
    for r in range(n):
        ptr[r + 1] = ptr[r] + counts[r]
    out = np.empty(ptr[n], idx_a.dtype)
    for r in prange(n):
        _merge_row(idx_a[ptr_a[r]:ptr_a[r + 1]], idx_b[ptr_b[r]:ptr_b[r + 1]], out[ptr[r]:ptr[r + 1]], True)
    return ptr, out


def warmup() -> None:
    """Compile (or load from the cache) the kernels with the engine's signatures."""
    if not HAVE_NUMBA:
        return
    S = np.zeros((2, 20), np.float32)
    ptr = np.zeros(3, np.int64)
    ex = np.zeros(0, np.int64)
    oi = np.empty((2, 3), np.int64)
    ov = np.empty((2, 3), np.float32)
    topk_rows(S, 3, ptr, ex, oi, ov)
    topk_rows_serial(S, 3, ptr, ex, oi, ov)
