"""Chunked scoring with a fused top-k: memory is bounded by the chunk, never by users x items.

For a chunk of users the engine computes the score block (a BLAS product of factors, or a policy's
own scoring function), masks each user's excluded items by scattering -inf at their (row, item)
pairs (no dense mask), and keeps the k best items per row. Ties break by lower item id, so every
backend returns the same slates. Items that cannot be recommended (all excluded) come back as -1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

NEG_INF = np.float32(-np.inf)


def topk_rows_numpy(S: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k per row with ties broken by lower column index. Returns (idx, vals), ranked."""
    n, m = S.shape
    k = min(k, m)
    if n == 0 or k == 0:
        return np.zeros((n, k), np.int64), np.zeros((n, k), S.dtype)
    if k == m:
        order = np.lexsort((np.broadcast_to(np.arange(m), S.shape), -S), axis=-1)
        return order.astype(np.int64), np.take_along_axis(S, order, axis=1)
    part = np.argpartition(S, m - k, axis=1)[:, m - k :]
    vals = np.take_along_axis(S, part, axis=1)
    thr = vals.min(axis=1)
    # rows whose k-th value is tied with an item outside the chosen set need the lowest ids
    n_ge = np.count_nonzero(S >= thr[:, None], axis=1)
    bad = np.flatnonzero(n_ge > k)
    for r in bad:  # only rows with boundary ties (rare for continuous scores)
        row = S[r]
        cand = np.flatnonzero(row >= thr[r])
        best = cand[np.lexsort((cand, -row[cand]))][:k]
        part[r] = best
        vals[r] = row[best]
    order = np.lexsort((part, -vals), axis=-1)
    return np.take_along_axis(part, order, axis=1).astype(np.int64), np.take_along_axis(vals, order, axis=1)


@dataclass
class Backend:
    """A compute backend: how to multiply and take top-k on one chunk."""

    name: str = "numpy"

    def matmul(self, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return np.matmul(a, b, out=out)

    def topk(self, S: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return topk_rows_numpy(S, k)


def available_backends() -> list[str]:
    return ["numpy"]


def make_backend(name: str = "auto") -> Backend:
    """Resolve a backend name (``auto`` picks the fastest available)."""
    if name in ("auto", "numpy"):
        return Backend("numpy")
    raise ValueError(f"unknown backend {name!r}; available: {available_backends()}")


class ScoringEngine:
    """Chunked users x items scoring with a fused, exclusion-aware top-k."""

    def __init__(self, backend: str = "auto", chunk_rows: int | None = None, chunk_mib: float = 16.0):
        self.backend = make_backend(backend)
        self.backend_name = self.backend.name
        self.chunk_rows = chunk_rows
        self.chunk_mib = chunk_mib

    def rows_per_chunk(self, n_items: int) -> int:
        if self.chunk_rows:
            return int(self.chunk_rows)
        return max(1, int(self.chunk_mib * 2**20 // (4 * max(n_items, 1))))

    def chunks(self, n: int, n_items: int) -> Iterator[slice]:
        step = self.rows_per_chunk(n_items)
        for lo in range(0, n, step):
            yield slice(lo, min(lo + step, n))

    def topk(
        self,
        users: np.ndarray,
        k: int,
        n_items: int,
        score_chunk: Callable[[np.ndarray], np.ndarray],
        exclude=None,
        on_chunk: Callable[[slice, np.ndarray, np.ndarray], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items for ``users``; ``score_chunk(user_ids) -> (rows, n_items)`` float32 scores.

        ``exclude`` is any object with ``pairs(user_ids) -> (rows, items)`` (e.g. :class:`History`).
        ``on_chunk(sl, items, scores)`` runs right after each chunk (fused choice, streaming metrics).
        """
        users = np.asarray(users, dtype=np.int64)
        n = len(users)
        kk = min(k, n_items)
        out_i = np.full((n, k), -1, dtype=np.int64)
        out_s = np.full((n, k), NEG_INF, dtype=np.float32)
        for sl in self.chunks(n, n_items):
            ids = users[sl]
            S = score_chunk(ids)
            if S.dtype != np.float32:
                S = S.astype(np.float32)
            if exclude is not None:
                r, c = exclude.pairs(ids)
                if len(r):
                    if not S.flags.writeable:
                        S = S.copy()
                    keep = c < n_items
                    S[r[keep], c[keep]] = NEG_INF
            idx, vals = self.backend.topk(S, kk)
            idx = np.where(np.isneginf(vals), -1, idx)
            out_i[sl, :kk] = idx
            out_s[sl, :kk] = vals
            if on_chunk is not None:
                on_chunk(sl, out_i[sl], out_s[sl])
        return out_i, out_s

    def topk_factors(
        self,
        users: np.ndarray,
        k: int,
        user_factors: np.ndarray,
        item_factors: np.ndarray,
        item_bias: np.ndarray | None = None,
        exclude=None,
        on_chunk=None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of <U_u, V_i> (+ b_i) with a reused chunk buffer (the BLAS fast path)."""
        n_items = item_factors.shape[0]
        VT = np.ascontiguousarray(item_factors.T, dtype=np.float32)
        rows = self.rows_per_chunk(n_items)
        buf = np.empty((rows, n_items), dtype=np.float32)
        bias = None if item_bias is None else np.asarray(item_bias, dtype=np.float32)

        def score(ids: np.ndarray) -> np.ndarray:
            S = buf[: len(ids)]
            self.backend.matmul(np.ascontiguousarray(user_factors[ids], dtype=np.float32), VT, out=S)
            if bias is not None:
                S += bias
            return S

        return self.topk(users, k, n_items, score, exclude=exclude, on_chunk=on_chunk)
