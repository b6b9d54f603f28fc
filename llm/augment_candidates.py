"""Candidate pools of the R1 augmenter (:mod:`.role_augment`) and the relevance of their items that an
LLM can read off titles (the surrogate's payload).
"""

from __future__ import annotations

import numpy as np

from .roles import _zscore_rows

__all__ = ["candidate_pools", "pool_relevance"]


def candidate_pools(
    users: np.ndarray,
    history,
    real_ids: np.ndarray,
    cold_pool: np.ndarray,
    rng: np.random.Generator,
    candidates: int,
    cold_share: float,
) -> list[np.ndarray]:
    """Candidate pools (unconsumed items, ~cold_share of them cold, shuffled), vectorised over users:
    draws with replacement, first occurrences kept, consumed items dropped."""
    U = len(users)
    m = min(candidates, len(real_ids))
    n_cold = min(int(round(cold_share * m)), len(cold_pool))
    wc, wr = 2 * n_cold, 2 * m + 8
    parts = [cold_pool[rng.integers(0, len(cold_pool), size=(U, wc))]] if n_cold else []
    parts.append(real_ids[rng.integers(0, len(real_ids), size=(U, wr))])
    X = np.concatenate(parts, axis=1)
    W = X.shape[1]
    keep = np.ones_like(X, dtype=bool)
    if history is not None and getattr(history, "nnz", 1):
        keep &= ~history.contains(np.repeat(users, W), X.ravel()).reshape(U, W)
    order = np.argsort(X, axis=1, kind="stable")
    xs = np.take_along_axis(X, order, axis=1)
    dup_sorted = np.zeros_like(keep)
    dup_sorted[:, 1:] = xs[:, 1:] == xs[:, :-1]
    dup = np.empty_like(keep)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    keep &= ~dup
    if wc:
        cold_col = np.arange(W)[None, :] < wc
        keep &= ~cold_col | (np.cumsum(keep & cold_col, axis=1) <= n_cold)
    keep &= np.cumsum(keep, axis=1) <= m
    full = keep.sum(axis=1) == m
    out: list[np.ndarray] = [np.zeros(0, np.int64)] * U
    if full.any():
        rows = np.flatnonzero(full)
        P = rng.permuted(X[rows][keep[rows]].reshape(len(rows), m), axis=1)
        for j, r in enumerate(rows.tolist()):
            out[r] = P[j]
    for r in np.flatnonzero(~full).tolist():
        out[r] = rng.permutation(X[r, keep[r]])
    return out


def pool_relevance(pools: list[np.ndarray], ptr: np.ndarray, hist: np.ndarray, genres: np.ndarray) -> np.ndarray:
    """(users, max pool size) relevance an LLM can read off titles: the genre similarity of each pool item
    to the user's history (``hist[ptr[r]:ptr[r + 1]]``), z-scored per user (0 for users without history)."""
    U = len(pools)
    width = max((len(q) for q in pools), default=0)
    P = np.full((U, width), -1, np.int64)
    for r, q in enumerate(pools):
        P[r, : len(q)] = q
    mask = P >= 0
    lens = np.diff(ptr)
    owner = np.repeat(np.arange(U), lens)
    share = np.zeros((U, genres.shape[1]))
    np.add.at(share, owner, genres[hist])
    G = genres[np.maximum(P, 0)].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.einsum("umg,ug->um", G, share) / (
            np.linalg.norm(G, axis=2) * np.linalg.norm(share, axis=1, keepdims=True) + 1e-12
        )
    return np.where((lens > 0)[:, None], _zscore_rows(cos, mask), 0.0)
