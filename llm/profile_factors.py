"""Closed-form scoring of the R2 profiler (:mod:`.role_profile`): score_ui = z_u(base score_ui) +
weight · cos(profile_u, item_i) as one factor model, so the BLAS fast path is kept; the same scores
row by row for a base without factors; the projection of embeddings on the items' principal directions;
and the top-k shift the profiles cause.
"""

from __future__ import annotations

import numpy as np

__all__ = ["popularity_scores", "principal_directions", "rank_shift", "standardise_rows", "standardised_factors"]


def principal_directions(emb: np.ndarray, dims: int) -> np.ndarray:
    """(dim, r) float32 projection on the top r = min(dims, dim, n) principal directions of ``emb`` (n, dim),
    uncentred: the right singular vectors of emb = eigenvectors of the (dim x dim) Gram matrix."""
    e = emb.astype(np.float64)
    r = min(dims, e.shape[1], e.shape[0])
    w, v = np.linalg.eigh(e.T @ e)
    return np.ascontiguousarray(v[:, np.argsort(-w)[:r]]).astype(np.float32)


def popularity_scores(pop: np.ndarray, n_items: int) -> np.ndarray:
    """(n_items,) float32 tie-breaking scores of ``base: null``: 1e-3 · z(log1p(popularity))."""
    p = np.zeros(n_items)
    p[: min(n_items, len(pop))] = pop[:n_items]
    lp = np.log1p(p)
    return (1e-3 * (lp - lp.mean()) / (lp.std() or 1.0)).astype(np.float32)


def standardise_rows(s: np.ndarray) -> np.ndarray:
    """Each row of base scores standardised over its finite entries (non-finite ones: -1e9), float32."""
    s = np.where(np.isfinite(s), s, np.nan)
    mu = np.nanmean(s, axis=1, keepdims=True)
    sd = np.nanstd(s, axis=1, keepdims=True)
    z = (s - mu) / np.where(sd > 1e-12, sd, 1.0)
    return np.where(np.isfinite(z), z, -1e9).astype(np.float32)


def standardised_factors(base_f: tuple, P: np.ndarray, E: np.ndarray, n_items: int) -> tuple:
    """Factors (U, V, None) with U_u · V_i = z_u(base score_ui) + P_u · E_i, from the base's factors
    (U, V, b): the per-user mean and standard deviation over the catalog in closed form."""
    cap = P.shape[0]
    U, V, b = base_f
    U = np.asarray(U, np.float64)
    V = np.asarray(V[:n_items], np.float64)
    bb = np.zeros(n_items) if b is None else np.asarray(b[:n_items], np.float64)
    Ut = np.concatenate([U, np.ones((U.shape[0], 1))], axis=1)
    Vt = np.concatenate([V, bb[:, None]], axis=1)
    m = Vt.mean(axis=0)
    C = np.cov(Vt, rowvar=False, bias=True) if n_items > 1 else np.zeros((Vt.shape[1],) * 2)
    C = np.atleast_2d(C)
    mu = Ut @ m
    sd = np.sqrt(np.maximum(np.sum((Ut @ C) * Ut, axis=1), 0.0))
    sd = np.where(sd > 1e-12, sd, 1.0)
    rows = max(cap, Ut.shape[0])
    Uz = np.zeros((rows, Vt.shape[1] + 1), np.float32)
    Uz[: Ut.shape[0], :-1] = Ut / sd[:, None]
    Uz[: Ut.shape[0], -1] = -mu / sd
    Pz = np.zeros((rows, P.shape[1]), np.float32)
    Pz[: P.shape[0]] = P
    Ufull = np.concatenate([Uz, Pz], axis=1)
    Vfull = np.concatenate([Vt, np.ones((n_items, 1)), E], axis=1).astype(np.float32)
    return np.ascontiguousarray(Ufull), np.ascontiguousarray(Vfull), None


def rank_shift(base: np.ndarray, full: np.ndarray, k: int) -> float:
    """Mean 1 − |top-k(base) ∩ top-k(full)| / k over the rows."""
    kk = min(k, base.shape[1])
    a = np.argpartition(-base, kk - 1, axis=1)[:, :kk]
    b = np.argpartition(-full, kk - 1, axis=1)[:, :kk]
    inter = np.array([len(np.intersect1d(x, y)) for x, y in zip(a, b, strict=True)])
    return float(np.mean(1.0 - inter / kk))
