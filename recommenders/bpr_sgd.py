"""Rendle's BPR-Opt by SGD with uniform negatives (E-BPR), our own kernel.

``implicit``'s CPU BPR draws each negative as the item of a random logged pair (so in proportion to its
popularity) and *skips* the sample when the user liked it; Rendle et al. (2009) draw the negative
uniformly from the items the user has not interacted with. The two samplers move popularity bias in
opposite directions in a feedback loop (issue 12), so the policy ``bpr`` exposes both
(``negatives: uniform | popularity``); this module is the uniform one.

One epoch draws ``nnz`` triples (u, i, j): a logged pair (u, i) uniformly, then j uniformly among the
items until one the user has not liked is found (re-drawn, at most 64 tries). The updates are implicit's
(bias as the last item column, the user's last column fixed at 1):

    z = σ(−<u, v_i − v_j>);  u += lr·(z·(v_i − v_j) − reg·u);  v_i += lr·(z·u − reg·v_i);  v_j += lr·(−z·u − reg·v_j)

Random draws come from a counter-based SplitMix64 stream seeded by the fit's seed, and the loop is
sequential, so a fit is bit-identical for a given seed whatever the thread budget.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import scipy.sparse as sp

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


@nb.njit(cache=True, inline="always")
def _splitmix(state: np.uint64) -> tuple[np.uint64, np.uint64]:
    state = state + np.uint64(0x9E3779B97F4A7C15)
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return state, z ^ (z >> np.uint64(31))


@nb.njit(cache=True)
def _liked(indices: np.ndarray, lo: int, hi: int, item: int) -> bool:
    """Whether ``item`` is in the sorted slice indices[lo:hi] (binary search)."""
    while lo < hi:
        mid = (lo + hi) // 2
        v = indices[mid]
        if v == item:
            return True
        if v < item:
            lo = mid + 1
        else:
            hi = mid
    return False


@nb.njit(cache=True)
def _epochs(U, V, indptr, indices, rows, n_items, epochs, lr, reg, seed):  # noqa: C901
    """``epochs`` passes of ``nnz`` uniform-negative BPR updates, in place."""
    nnz = indices.shape[0]
    f = U.shape[1] - 1  # the last user column is the constant 1 of the bias
    state = np.uint64(seed)
    diff = np.empty(V.shape[1], np.float32)
    for _ in range(epochs):
        for _s in range(nnz):
            state, r = _splitmix(state)
            k = np.int64(r % np.uint64(nnz))
            u = rows[k]
            i = indices[k]
            lo, hi = indptr[u], indptr[u + 1]
            if hi - lo >= n_items:
                continue  # the user liked everything: no negative exists
            j = -1
            for _t in range(64):
                state, r = _splitmix(state)
                c = np.int64(r % np.uint64(n_items))
                if not _liked(indices, lo, hi, c):
                    j = c
                    break
            if j < 0:
                continue
            x = np.float32(0.0)
            for a in range(V.shape[1]):
                diff[a] = V[i, a] - V[j, a]
                x += U[u, a] * diff[a]
            z = np.float32(1.0) / (np.float32(1.0) + np.exp(x))
            for a in range(V.shape[1]):
                uu = U[u, a]
                V[i, a] += lr * (z * uu - reg * V[i, a])
                V[j, a] += lr * (-z * uu - reg * V[j, a])
                if a < f:
                    U[u, a] += lr * (z * diff[a] - reg * uu)


def bpr_uniform(X: sp.csr_matrix, U: np.ndarray, V: np.ndarray, epochs: int, lr: float, reg: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train (U, V) on the binary matrix ``X`` (users × items) with uniform negatives; returns new arrays."""
    X = X.tocsr()
    X.sort_indices()
    U = np.ascontiguousarray(U, np.float32).copy()
    V = np.ascontiguousarray(V, np.float32).copy()
    if X.nnz == 0 or epochs <= 0:
        return U, V
    indptr = X.indptr.astype(np.int64)
    indices = X.indices.astype(np.int64)
    rows = np.repeat(np.arange(X.shape[0], dtype=np.int64), np.diff(indptr))
    _epochs(U, V, indptr, indices, rows, int(X.shape[1]), int(epochs), np.float32(lr), np.float32(reg),
            np.uint64(seed))
    return U, V
