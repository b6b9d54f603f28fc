"""Exact top-k of an upper confidence bound p_ui = m_ui + α√(x_iᵀ S_u x_i) over a whole catalog, with
exact pruning (E-LINUCB; the issue allows it): the quadratic bonus is costly (d² per user and item), so
it is computed only on a candidate set that provably holds the top-k.

For each user the bound q ≤ λ_max‖x‖² − Σ_{j≤s} (λ_max − λ_j)(v_jᵀx)² holds, with (λ_j, v_j) the s smallest
eigenpairs of S_u (S_u ⪯ λ_max I − Σ_j (λ_max − λ_j) v_j v_jᵀ, exact when s = d). It costs s products
of the size of the mean's and is tight for items along the directions the user has explored — where
its best items lie. The candidates are the top ``M`` items by the bound; their exact scores are
computed; a user whose k-th exact score does not strictly beat the best bound outside the candidates
is scored exactly over the whole catalog instead. So the slate always equals the exhaustive top-k.
Every computation is per canonical tile of users, with shapes that do not depend on the chunking.
"""

from __future__ import annotations

import numpy as np

__all__ = ["candidate_count", "ucb_tile"]

NEG_INF = np.float32(-np.inf)


def candidate_count(k: int, n_items: int) -> int:
    """Candidates whose exact bonus is computed per user: 4k, at least k + 16, at most the catalog."""
    return int(min(n_items, max(4 * k, k + 16)))


def _excluded_mask(excl, n: int, n_items: int) -> np.ndarray | None:
    if excl is None:
        return None
    ptr, items = excl
    if not len(items):
        return None
    rows = np.repeat(np.arange(n), np.diff(ptr))
    keep = items < n_items
    mask = np.zeros((n, n_items), bool)
    mask[rows[keep], items[keep]] = True
    return mask


def _bound(mean, S, X, norms2, alpha, directions: int) -> np.ndarray:
    """Upper bound of p for every (user, item), from the ``directions`` smallest eigenpairs of S."""
    w, vecs = np.linalg.eigh(S)  # ascending eigenvalues
    lam_max = np.maximum(w[:, -1], 0.0)
    s = min(directions, S.shape[1])
    q = lam_max[:, None] * norms2[None, :]
    if s:
        V = np.swapaxes(vecs[:, :, :s], 1, 2)  # (n, s, d)
        proj = (V.reshape(-1, V.shape[2]) @ X.T).reshape(len(S), s, -1)
        gap = lam_max[:, None] - w[:, :s]
        q = q - np.einsum("ns,nsi->ni", gap, proj * proj)
    return mean + alpha * np.sqrt(np.maximum(q, 0.0))


def _exact(mean_rows, S, Xc, alpha) -> np.ndarray:
    """p = m + α√(xᵀSx) for candidate rows ``Xc`` (n, m, d) of each user."""
    q = np.einsum("nmd,nmd->nm", Xc @ S, Xc)
    return mean_rows + alpha * np.sqrt(np.maximum(q, 0.0))


def ucb_tile(mean: np.ndarray, S: np.ndarray, X: np.ndarray, norms2: np.ndarray, alpha: float, k: int,
             excl=None, directions: int = 2) -> np.ndarray:
    """Scores for one tile of users: exact UCB values on a candidate set that provably holds each
    user's top-k (excluded items skipped), ``-inf`` elsewhere. ``mean`` (n, n_items) float32,
    ``S`` (n, d, d) float64 PSD, ``X`` (n_items, d) float64, ``norms2`` = ‖x_i‖²."""
    n, n_items = mean.shape
    mean64 = mean.astype(np.float64)
    excluded = _excluded_mask(excl, n, n_items)
    ub = _bound(mean64, S, X, norms2, alpha, directions)
    if excluded is not None:
        ub[excluded] = -np.inf
    m = candidate_count(k, n_items)
    cand = np.argpartition(-ub, m - 1, axis=1)[:, :m] if m < n_items else np.broadcast_to(np.arange(n_items),
                                                                                           (n, n_items))
    rows = np.arange(n)[:, None]
    p = _exact(mean64[rows, cand], S, X[cand], alpha)
    p[np.isneginf(ub[rows, cand])] = -np.inf
    out = np.full((n, n_items), -np.inf)
    out[rows, cand] = p
    if m < n_items:
        outside = ub.copy()
        outside[rows, cand] = -np.inf
        best_out = outside.max(axis=1)
        kth = -np.partition(-p, k - 1, axis=1)[:, k - 1]
        redo = np.flatnonzero(~((best_out < kth) | np.isneginf(best_out)))
        for r in redo:  # the bound was not tight enough: this user is scored exactly over all items
            row = _exact(mean64[r][None], S[r][None], X[None], alpha)[0]
            if excluded is not None:
                row[excluded[r]] = -np.inf
            out[r] = row
    return out.astype(np.float32)
