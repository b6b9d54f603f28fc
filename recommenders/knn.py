"""Item-based k-nearest-neighbours (reference E-IKNN).

sim(i, j) = |R_:i ∩ R_:j| / (‖R_:i‖·‖R_:j‖ + shrink) on the binary users x items matrix R (cosine when
``shrink = 0``). Each target item i keeps its ``neighbors`` most similar items N_K(i) (ties broken by the
lower item id, non-positive similarities dropped), and

    score(u, i) = Σ_{j ∈ H_u ∩ N_K(i)} sim(i, j),

i.e. ``H[users] @ S`` with the sparse matrix S[j, i] = sim(i, j) for j ∈ N_K(i). The similarity is built
in blocks of target items (a dense ``block x n_items`` float32 co-occurrence block at a time, about 8 MiB
by default), so memory is O(n_items · K) plus one block, never n_items².

H is the training matrix of the last :meth:`ItemKNN.fit`; users and items that arrived after it score 0
until the next fit (the reference rebuilds the model every cycle).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from pydantic import Field

from recloop.limits import MAX_ITEMS
from recloop.registry import Params, register

from .base import Policy, TrainingData

#: float32 entries per dense similarity block (2^21 ≈ 8 MiB; small blocks stay in cache and are faster).
BLOCK_ENTRIES = 1 << 21


def _topk_positive(S: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k per row of a non-negative float32 matrix, ties broken by the lower column.

    Non-negative float32 values order like their int32 bit patterns, so the key
    ``bits << 32 | (2^32 - 1 - column)`` is unique per row and one argpartition on it is exact.
    """
    n, m = S.shape
    key = S.view(np.int32).astype(np.int64) << 32
    key |= (np.int64(2**32 - 1) - np.arange(m, dtype=np.int64))[None, :]
    part = np.argpartition(key, m - k, axis=1)[:, m - k :] if k < m else np.broadcast_to(np.arange(m), (n, m))
    order = np.argsort(-np.take_along_axis(key, part, axis=1), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    return idx, np.take_along_axis(S, idx, axis=1)


def topk_item_similarity(
    X: sp.spmatrix, neighbors: int, shrink: float = 0.0, block_entries: int = BLOCK_ENTRIES
) -> sp.csr_matrix:
    """Top-K cosine item-item similarity of a binary users x items matrix ``X``.

    Returns the (n_items, n_items) float32 CSR ``M`` with ``M[i, j] = sim(i, j)`` for the K best j ≠ i
    (row i = target item i). Only strictly positive similarities are kept.
    """
    X = sp.csc_matrix(X, dtype=np.float32)
    X.sum_duplicates()
    X.data[:] = 1.0
    n_items = X.shape[1]
    counts = np.diff(X.indptr).astype(np.float64)
    norms = np.sqrt(counts)
    XT = X.T.tocsr()  # items x users
    K = int(min(neighbors, max(n_items - 1, 0)))
    rows_out: list[np.ndarray] = []
    cols_out: list[np.ndarray] = []
    vals_out: list[np.ndarray] = []
    if K == 0 or X.nnz == 0:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    block = max(1, int(block_entries // max(n_items, 1)))
    for lo in range(0, n_items, block):
        hi = min(lo + block, n_items)
        G = (XT[lo:hi] @ X).toarray().astype(np.float32, copy=False)  # co-occurrence counts (hi-lo, n_items)
        denom = (norms[lo:hi, None] * norms[None, :] + shrink).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            S = np.where(denom > 0, G / denom, np.float32(0.0)).astype(np.float32, copy=False)
        np.maximum(S, 0.0, out=S)  # only positive similarities are kept
        S[np.arange(hi - lo), np.arange(lo, hi)] = 0.0  # never your own neighbour
        idx, vals = _topk_positive(S, K)
        keep = vals > 0
        r = np.broadcast_to(np.arange(lo, hi)[:, None], idx.shape)
        rows_out.append(r[keep])
        cols_out.append(idx[keep])
        vals_out.append(vals[keep])
    rows = np.concatenate(rows_out)
    cols = np.concatenate(cols_out)
    vals = np.concatenate(vals_out)
    M = sp.csr_matrix((vals, (rows, cols)), shape=(n_items, n_items), dtype=np.float32)
    M.sort_indices()
    return M


@register("policy", "item_knn")
class ItemKNN(Policy):
    """Item-based KNN on the binary interaction matrix: cosine similarity, top-K neighbours (E-IKNN)."""

    class Params(Params):
        neighbors: int = Field(50, ge=1, le=MAX_ITEMS, description="neighbours K kept per item")
        shrink: float = Field(0.0, ge=0.0, description="shrinkage added to the cosine denominator")

    def __init__(self, params: Params | None = None):
        super().__init__(params)
        self.H: sp.csr_matrix | None = None  # users x items binary training matrix
        self.S: sp.csr_matrix | None = None  # items x items, S[j, i] = sim(i, j) for j in N_K(i)

    def fit(
        self, data: TrainingData, world, *, step: int, rng: np.random.Generator, warm_start: bool
    ) -> None:
        H = data.matrix(binary=True).astype(np.float32)
        H.sort_indices()
        M = topk_item_similarity(H, self.params.neighbors, self.params.shrink)
        self.H = H
        self.S = M.T.tocsr()
        self.S.sort_indices()

    def similarity(self) -> sp.csr_matrix:
        """The kept similarities as (target item i, neighbour j) → sim(i, j)."""
        if self.S is None:
            raise RuntimeError("ItemKNN.similarity() called before fit()")
        return self.S.T.tocsr()

    def score(self, users: np.ndarray, world, step: int = 0) -> np.ndarray:
        users = np.asarray(users, dtype=np.int64)
        n_items = int(world.items.n)
        out = np.zeros((len(users), n_items), dtype=np.float32)
        if self.H is None or self.S is None or len(users) == 0:
            return out
        nu, ni = self.H.shape
        inside = users < nu
        if not inside.any():
            return out
        part = (self.H[users[inside]] @ self.S).toarray()
        m = min(ni, n_items)
        if inside.all():
            out[:, :m] = part[:, :m]
        else:
            out[np.flatnonzero(inside), :m] = part[:, :m]
        return out

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for name in ("H", "S"):
            m = getattr(self, name)
            state[name] = None if m is None else {
                "data": m.data.copy(), "indices": m.indices.copy(), "indptr": m.indptr.copy(),
                "shape": tuple(m.shape),
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("H", "S"):
            d = state.get(name)
            m = None if d is None else sp.csr_matrix(
                (np.array(d["data"], np.float32), np.array(d["indices"]), np.array(d["indptr"])),
                shape=tuple(d["shape"]),
            )
            setattr(self, name, m)
