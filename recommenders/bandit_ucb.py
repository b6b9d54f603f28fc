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

__all__ = ["candidate_counts", "quadratic_features", "ucb_tile"]

NEG_INF = np.float32(-np.inf)


def candidate_counts(k: int, n_items: int) -> list[int]:
    """Candidate-set sizes tried in turn (an exact check after each): 4k (at least k + 16), then 64k,
    capped at the catalog; users that fail both are scored exactly over the whole catalog."""
    first = min(n_items, max(4 * k, k + 16))
    return sorted({first, min(n_items, 64 * k)})


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
             excl=None, directions: int = 2, prune: bool = True, phi: np.ndarray | None = None
             ) -> tuple[np.ndarray, int]:
    """Scores for one tile of users: exact UCB values on a candidate set that provably holds each
    user's top-k (excluded items skipped), ``-inf`` elsewhere; and how many users needed the whole
    catalog. ``mean`` (n, n_items) float32, ``S`` (n, d, d) float64 PSD, ``X`` (n_items, d) float64,
    ``norms2`` = ‖x_i‖², ``phi`` = :func:`quadratic_features` of X (computed once per catalog).
    ``prune=False`` scores every user over the whole catalog (when the bound is known to fail, it is not
    worth computing)."""
    n, n_items = mean.shape
    mean64 = mean.astype(np.float64)
    excluded = _excluded_mask(excl, n, n_items)
    if not prune:
        out = mean64 + alpha * np.sqrt(np.maximum(_all_quadratic(S, X, phi), 0.0))
        if excluded is not None:
            out[excluded] = -np.inf
        return out.astype(np.float32), n
    ub = _bound(mean64, S, X, norms2, alpha, directions)
    if excluded is not None:
        ub[excluded] = -np.inf
    out = np.full((n, n_items), -np.inf)
    todo = np.arange(n)
    for m in candidate_counts(k, n_items):
        if not len(todo) or len(todo) > n // 2 and m > candidate_counts(k, n_items)[0]:
            break  # most of the tile failed the first check: the whole catalog is cheaper for them
        done = _try_candidates(out, todo, mean64, ub, S, X, alpha, k, m)
        todo = todo[~done]
    if len(todo):  # the bound was not tight enough: these users are scored exactly over all items
        out[todo] = mean64[todo] + alpha * np.sqrt(np.maximum(_all_quadratic(S[todo], X, phi), 0.0))
        if excluded is not None:
            out[todo] = np.where(excluded[todo], -np.inf, out[todo])
    return out.astype(np.float32), len(todo)


def _try_candidates(out, rows_, mean64, ub, S, X, alpha, k, m) -> np.ndarray:
    """Exact scores of each row's top-``m`` items by the bound; True where they provably hold its top-k
    (then written to ``out``)."""
    n_items = ub.shape[1]
    sub = ub[rows_]
    if m >= n_items:
        cand = np.broadcast_to(np.arange(n_items), sub.shape)
    else:
        cand = np.argpartition(-sub, m - 1, axis=1)[:, :m]
    r = np.arange(len(rows_))[:, None]
    p = _exact(mean64[rows_[:, None], cand], S[rows_], X[cand], alpha)
    p[np.isneginf(sub[r, cand])] = -np.inf
    if m >= n_items:
        ok = np.ones(len(rows_), bool)
    else:
        outside = sub.copy()
        outside[r, cand] = -np.inf
        best_out = outside.max(axis=1)
        kth = -np.partition(-p, k - 1, axis=1)[:, k - 1]
        ok = (best_out < kth) | np.isneginf(best_out)
    good = rows_[ok]
    out[good[:, None], cand[ok]] = p[ok]
    return ok


def quadratic_features(X: np.ndarray) -> np.ndarray:
    """φ(x) = [x_a·x_b]_{a≤b} (float32, d(d+1)/2 columns): then xᵀSx = φ(x)·s(S), with s(S) the upper
    triangle of S with its off-diagonal entries doubled — one product for every (user, item) pair."""
    a, b = np.triu_indices(X.shape[1])
    return np.ascontiguousarray(X[:, a] * X[:, b], np.float32)


def _sym_weights(S: np.ndarray) -> np.ndarray:
    d = S.shape[1]
    a, b = np.triu_indices(d)
    return (S[:, a, b] * np.where(a == b, 1.0, 2.0)).astype(np.float32)


def _all_quadratic(S: np.ndarray, X: np.ndarray, phi: np.ndarray | None = None) -> np.ndarray:
    """x_iᵀ S_u x_i for every item and each of the users' S (r, d, d), as φ(X)·s(S)ᵀ: one float32 BLAS
    product of d(d+1)/2 columns (see :func:`quadratic_features`)."""
    phi = quadratic_features(X) if phi is None else phi
    return (phi @ _sym_weights(S).T).T.astype(np.float64)
