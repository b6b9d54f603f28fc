"""Numba kernels for per-cycle metrics: Jaccard of two slates straight from the slate matrix (M-HOMOG)
and per-row sums over a history CSR (M-POPLIFT profiles).

Optional like :mod:`recloop.sim.kernels` (``HAVE_NUMBA`` False: callers keep their NumPy path). Each
kernel returns exactly the values of the NumPy route it replaces (same operations in the same order),
so the metrics are bit-identical either way; ``tests/test_metric_kernels.py`` checks it on random inputs.
"""

from __future__ import annotations

import numpy as np

from recloop.sim.kernels import HAVE_NUMBA, njit

__all__ = ["HAVE_NUMBA", "csr_row_sums", "slate_pair_jaccard"]


@njit(cache=True, nogil=True, inline="always")
def _sorted_row(slates, r, out):
    """out = slates[r] in ascending order (insertion sort: slates are short)."""
    for j in range(slates.shape[1]):
        v = slates[r, j]
        t = j
        while t > 0 and out[t - 1] > v:
            out[t] = out[t - 1]
            t -= 1
        out[t] = v


@njit(cache=True, nogil=True)
def slate_pair_jaccard(slates, pairs, out):
    """out[p] = |A ∩ B| / |A ∪ B| for A, B the slates of rows pairs[p, 0], pairs[p, 1] (negative ids
    skipped; 0 when both are empty), each row sorted first as the CSR route does."""
    k = slates.shape[1]
    a = np.empty(k, slates.dtype)
    b = np.empty(k, slates.dtype)
    for p in range(pairs.shape[0]):
        _sorted_row(slates, pairs[p, 0], a)
        _sorted_row(slates, pairs[p, 1], b)
        a0 = 0
        b0 = 0
        while a0 < k and a[a0] < 0:
            a0 += 1
        while b0 < k and b[b0] < 0:
            b0 += 1
        na = k - a0
        nb = k - b0
        inter = 0
        while a0 < k and b0 < k:
            if a[a0] == b[b0]:
                inter += 1
                a0 += 1
                b0 += 1
            elif a[a0] < b[b0]:
                a0 += 1
            else:
                b0 += 1
        union = na + nb - inter
        out[p] = inter / union if union > 0 else 0.0
    return out


@njit(cache=True, nogil=True)
def csr_row_sums(ptr, items, weights, out):
    """out[r] = sum of weights[items[j]] over row r's entries, added in row order from 0.0 (what
    ``np.bincount(owner, weights=weights[items])`` adds, without the owner and gathered arrays)."""
    for r in range(ptr.shape[0] - 1):
        s = 0.0
        for j in range(ptr[r], ptr[r + 1]):
            s += weights[items[j]]
        out[r] = s
    return out
