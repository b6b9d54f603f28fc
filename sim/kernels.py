"""Numba kernels for the engine's hot loops: fused exclusion-aware top-k and slate gathers.

Everything here is optional: :mod:`recloop.sim.backends` falls back to NumPy when Numba cannot be
imported (``HAVE_NUMBA`` is False then). The kernels are compiled on first use and cached on disk
(``cache=True``) and release the GIL (``nogil=True``). They are serial on purpose: the engine runs
row blocks of them on its own worker threads, so there is no Numba threading layer to configure
(GNU OpenMP is not fork-safe; the workqueue layer is not thread-safe) and nothing nests.

Top-k semantics (shared with every backend): per row, the ``k`` largest scores, ranked by score
descending and, on equal scores, by lower item id; excluded items and items scoring ``-inf`` are
never returned, and slots left empty hold item ``-1`` with score ``-inf``.
"""

from __future__ import annotations

import numpy as np

try:  # numba is a dependency, but keep the engine importable without it
    import numba
    from numba import njit

    HAVE_NUMBA = True
except Exception:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

    def njit(*a, **kw):
        def deco(f):
            return f

        return deco(a[0]) if a and callable(a[0]) else deco

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
def _scan(row, lo, hi, k, vals, idx, floor):
    """Offer row[lo:hi] to the buffer (item ids lo ...), in increasing id order.

    An item enters when it beats the buffer's k-th value and is above ``floor`` (a value known to be
    below the row's final k-th score; -inf when unknown)."""
    thr = max(vals[k - 1], floor)
    j = lo
    while j + _BLOCK <= hi:
        c = 0
        for t in range(j, j + _BLOCK):  # branch-free count: vectorises
            c += row[t] > thr
        if c > 0:
            for t in range(j, j + _BLOCK):
                v = row[t]
                if v > thr:
                    _insert(vals, idx, k, v, t)
                    thr = max(vals[k - 1], floor)
        j += _BLOCK
    while j < hi:
        v = row[j]
        if v > thr:
            _insert(vals, idx, k, v, j)
            thr = max(vals[k - 1], floor)
        j += 1


@njit(cache=True, nogil=True)
def _excluded(ex, i):
    """Whether item i is in the sorted array ``ex`` (binary search)."""
    lo = 0
    hi = ex.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if ex[mid] < i:
            lo = mid + 1
        else:
            hi = mid
    return lo < ex.shape[0] and ex[lo] == i


@njit(cache=True, nogil=True)
def _topk_one(row, k, excl, hint, out_val, out_idx):
    """Top-k of one row. ``hint``: items believed to rank high (e.g. the user's previous slate); when
    at least k of them are eligible, the smallest of their scores is a lower bound of the k-th score
    (k real items reach it), so every item below it is skipped without being offered. Exact."""
    # the buffer lives in local arrays (no aliasing with the score row), copied out at the end
    vals = np.empty(k, np.float32)
    idx = np.empty(k, np.int64)
    for p in range(k):
        vals[p] = -np.inf
        idx[p] = -1
    m = row.shape[0]
    ne = excl.shape[0]
    ex = excl
    if ne > 1:
        ex = np.sort(excl)
    floor = np.float32(-np.inf)
    if hint.shape[0] >= k:
        g = np.float32(np.inf)
        cnt = 0
        for j in range(hint.shape[0]):
            i = hint[j]
            if i < 0 or i >= m:
                continue
            if ne > 0 and _excluded(ex, i):
                continue
            v = row[i]
            if v > -np.inf:  # also false for NaN
                cnt += 1
                g = min(g, v)
        if cnt >= k:
            # items equal to g may still belong to the top-k: test "v > floor" with floor just below g
            floor = np.nextafter(g, np.float32(-np.inf))
    if ne == 0:
        _scan(row, 0, m, k, vals, idx, floor)
    else:
        lo = 0
        e = 0
        while lo < m:
            while e < ne and ex[e] < lo:  # merge-walk the sorted exclusion list (duplicates are fine)
                e += 1
            hi = m
            if e < ne and ex[e] < m:
                hi = ex[e]
            _scan(row, lo, hi, k, vals, idx, floor)
            lo = hi + 1
    for p in range(k):
        out_val[p] = vals[p]
        out_idx[p] = idx[p]


@njit(cache=True, nogil=True)
def topk_rows(S, k, ex_ptr, ex_idx, hint, out_idx, out_val):
    """Top-k of every row of ``S`` (n, m) skipping row r's items ex_idx[ex_ptr[r]:ex_ptr[r+1]].

    ``hint`` (n, h) int: per row, items expected near the top (-1 = none; h = 0 for no hints).
    Serial and GIL-free: the engine runs row blocks of it on its worker threads."""
    for r in range(S.shape[0]):
        _topk_one(S[r], k, ex_idx[ex_ptr[r]:ex_ptr[r + 1]], hint[r], out_val[r], out_idx[r])


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def gather_dot(x, users, a, items, out):
    """out[r, j] = <x[users[r]], a[max(items[r, j], 0)]> accumulated in float64, stored as float32.

    The slate-utility gather without materialising the (n, k, d) block (serial: it runs on the
    calling thread next to the engine's workers). ``reassoc`` lets the float64 sum vectorise; each
    value depends only on its own row and item, never on the chunking."""
    n, k = items.shape
    d = x.shape[1]
    for r in range(n):
        u = users[r]
        for j in range(k):
            i = max(items[r, j], 0)
            s = 0.0
            for t in range(d):
                s += np.float64(x[u, t]) * np.float64(a[i, t])
            out[r, j] = s
    return out


# -- counter-based hashing (bit-identical to recloop.rng.hash_u64 / hash_uniform) -------------
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


@njit(cache=True, nogil=True)
def hash_topk(key, users, n_items, k, ex_ptr, ex_idx, out_idx, out_val):
    """Top-k of the hashed uniform scores hash_uniform(key, user, item) (float32) per user, skipping
    excluded items: ``k`` distinct random items per user without a users x items score matrix."""
    n = users.shape[0]
    row = np.empty(n_items, np.float32)
    no_hint = np.empty(0, np.int32)
    for r in range(n):
        zu = _mix(key + _GOLDEN * (np.uint64(users[r]) + _ONE))
        for i in range(n_items):
            row[i] = _hash_uniform32(zu, i)
        _topk_one(row, k, ex_idx[ex_ptr[r]:ex_ptr[r + 1]], no_hint, out_val[r], out_idx[r])


@njit(cache=True, nogil=True, parallel=True)
def hash_normals(key, users, dim, out):
    """out[r, j] = a standard normal from hash_uniform(key, users[r], 2j) and (…, 2j + 1) by Box–Muller
    (the uniforms bit-identical to recloop.rng.hash_uniform)."""
    for r in numba.prange(users.shape[0]):
        zu = _mix(key + _GOLDEN * (np.uint64(users[r]) + _ONE))
        for j in range(dim):
            h1 = _mix(zu ^ (np.uint64(2 * j) * _GOLDEN + _C2)) >> _S11
            h2 = _mix(zu ^ (np.uint64(2 * j + 1) * _GOLDEN + _C2)) >> _S11
            u1 = (np.float64(h1) + 0.5) * (1.0 / 9007199254740992.0)
            u2 = (np.float64(h2) + 0.5) * (1.0 / 9007199254740992.0)
            out[r, j] = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


# -- metrics -----------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def row_drift(A, ia, B, ib, cos_dist, angle, l2):
    """Per pair r of rows (A[ia[r]], B[ib[r]]): 1 - cos, the angle and the L2 distance, accumulated in
    float64 (the values of ``recloop.analysis.user_metrics.drift`` without (n, d) temporaries)."""
    d = A.shape[1]
    for r in range(ia.shape[0]):
        a = ia[r]
        b = ib[r]
        saa = 0.0
        sbb = 0.0
        sab = 0.0
        sdd = 0.0
        for t in range(d):
            x = np.float64(A[a, t])
            y = np.float64(B[b, t])
            saa += x * x
            sbb += y * y
            sab += x * y
            sdd += (x - y) * (x - y)
        na = np.sqrt(saa)
        nb = np.sqrt(sbb)
        den = na * nb
        if den > 0:
            c = sab / den
        elif na == 0 and nb == 0:
            c = 1.0
        else:
            c = 0.0
        c = min(1.0, max(-1.0, c))
        cos_dist[r] = 1.0 - c
        angle[r] = np.arccos(c)
        l2[r] = np.sqrt(sdd)


# -- user dynamics -----------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def slerp_rows(X, users, A, items, p):
    """In place: X[users[r]] <- slerp(X[users[r]], A[items[r]], p) (U-DRIFT), keeping the norm.

    The per-row maths of ``recloop.agents.dynamics.slerp`` (same guards: zero vectors, antipodal
    nudge, the small-angle linear fallback) in float64, without (n, d) temporaries."""
    d = X.shape[1]
    for r in range(users.shape[0]):
        u = users[r]
        i = items[r]
        nx = 0.0
        na = 0.0
        for t in range(d):
            nx += np.float64(X[u, t]) ** 2
            na += np.float64(A[i, t]) ** 2
        nx = np.sqrt(nx)
        na = np.sqrt(na)
        sx = 1.0 / nx if nx > 0 else 1.0
        sa = 1.0 / na if na > 0 else 1.0
        c = 0.0
        for t in range(d):
            c += (np.float64(X[u, t]) * sx) * (np.float64(A[i, t]) * sa)
        c = min(1.0, max(-1.0, c))
        if c < -1 + 1e-7:
            c = -1 + 1e-7
        omega = np.arccos(c)
        so = np.sin(omega)
        if so < 1e-7:
            w1 = 1.0 - p
            w2 = p
        else:
            w1 = np.sin((1.0 - p) * omega) / so
            w2 = np.sin(p * omega) / so
        no = 0.0
        for t in range(d):
            o = w1 * np.float64(X[u, t]) * sx + w2 * np.float64(A[i, t]) * sa
            no += o * o
        no = np.sqrt(no)
        so_ = nx / no if no > 0 else nx
        for t in range(d):
            X[u, t] = (w1 * np.float64(X[u, t]) * sx + w2 * np.float64(A[i, t]) * sa) * so_


# -- sparse histories ------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def csr_contains(ptr, idx, users, items, out):
    """out[j] |= items[j] in row users[j] of a CSR whose rows are sorted (binary search)."""
    n_rows = ptr.shape[0] - 1
    for j in range(users.shape[0]):
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


@njit(cache=True, nogil=True)
def merge_csr(ptr_a, idx_a, ptr_b, idx_b):
    """Row-wise union of two CSRs with sorted rows (same row count): sorted, duplicates removed."""
    n = ptr_a.shape[0] - 1
    counts = np.empty(n, np.int64)
    dummy = np.empty(0, idx_a.dtype)
    for r in range(n):
        counts[r] = _merge_row(idx_a[ptr_a[r]:ptr_a[r + 1]], idx_b[ptr_b[r]:ptr_b[r + 1]], dummy, False)
    ptr = np.zeros(n + 1, np.int64)
    for r in range(n):
        ptr[r + 1] = ptr[r] + counts[r]
    out = np.empty(ptr[n], idx_a.dtype)
    for r in range(n):
        _merge_row(idx_a[ptr_a[r]:ptr_a[r + 1]], idx_b[ptr_b[r]:ptr_b[r + 1]], out[ptr[r]:ptr[r + 1]], True)
    return ptr, out


@njit(cache=True, nogil=True)
def csr_sorted_unique(ptr, idx):
    """Each CSR row sorted with duplicates removed (a new CSR)."""
    n = ptr.shape[0] - 1
    out = np.empty(idx.shape[0], idx.dtype)
    new_ptr = np.zeros(n + 1, np.int64)
    w = 0
    for r in range(n):
        row = np.sort(idx[ptr[r]:ptr[r + 1]])
        for j in range(row.shape[0]):
            if j == 0 or row[j] != row[j - 1]:
                out[w] = row[j]
                w += 1
        new_ptr[r + 1] = w
    return new_ptr, out[:w]


@njit(cache=True, nogil=True)
def csr_gather_unique(ptr, idx, users):
    """Rows ``users`` of a CSR whose rows are sorted (duplicates allowed), duplicates removed, as a new
    int64 CSR in ``users`` order; users outside the CSR get empty rows (one pass per row, no sort)."""
    n_rows = ptr.shape[0] - 1
    n = users.shape[0]
    new_ptr = np.zeros(n + 1, np.int64)
    total = 0
    for r in range(n):
        u = users[r]
        if 0 <= u < n_rows:
            total += ptr[u + 1] - ptr[u]
    out = np.empty(total, np.int64)
    w = 0
    for r in range(n):
        u = users[r]
        if 0 <= u < n_rows:
            for j in range(ptr[u], ptr[u + 1]):
                v = np.int64(idx[j])
                if j == ptr[u] or v != out[w - 1]:
                    out[w] = v
                    w += 1
        new_ptr[r + 1] = w
    return new_ptr, out[:w]


@njit(cache=True, nogil=True)
def pair_jaccard(ptr, idx, pairs, out):
    """out[p] = |A ∩ B| / |A ∪ B| for rows A = pairs[p, 0], B = pairs[p, 1] of a CSR with sorted,
    duplicate-free rows (0 when both are empty); negative entries are ignored."""
    for p in range(pairs.shape[0]):
        a0, a1 = ptr[pairs[p, 0]], ptr[pairs[p, 0] + 1]
        b0, b1 = ptr[pairs[p, 1]], ptr[pairs[p, 1] + 1]
        while a0 < a1 and idx[a0] < 0:
            a0 += 1
        while b0 < b1 and idx[b0] < 0:
            b0 += 1
        na = a1 - a0
        nb = b1 - b0
        inter = 0
        while a0 < a1 and b0 < b1:
            if idx[a0] == idx[b0]:
                inter += 1
                a0 += 1
                b0 += 1
            elif idx[a0] < idx[b0]:
                a0 += 1
            else:
                b0 += 1
        union = na + nb - inter
        out[p] = inter / union if union > 0 else 0.0
    return out


def warmup() -> None:
    """Compile (or load from the cache) the kernels with the engine's signatures."""
    if not HAVE_NUMBA:
        return
    S = np.zeros((2, 20), np.float32)
    ptr = np.zeros(3, np.int64)
    ex = np.zeros(0, np.int64)
    oi = np.empty((2, 3), np.int64)
    ov = np.empty((2, 3), np.float32)
    topk_rows(S, 3, ptr, ex, np.full((2, 3), -1, np.int32), oi, ov)
