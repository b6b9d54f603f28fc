"""Ridge-regression state of the linear bandits (E-LINUCB, E-LINTS, E-EPS): A = λI + Σ x xᵀ, b = Σ r x,
θ̂ = A⁻¹ b, kept as A⁻¹ (float64) per user or shared, and updated in batches.

A batch of m observations X (m × d) with rewards r adds XᵀX to A and updates A⁻¹ by Woodbury,
A⁻¹ ← A⁻¹ − A⁻¹Xᵀ (I + X A⁻¹ Xᵀ)⁻¹ X A⁻¹, in O(m d² + m² d + m³), or, when m ≥ d (the shared model gets
every user's observations), by inverting the updated A, in O(m d² + d³) — the same matrix (to float
rounding) as m Sherman–Morrison updates one at a time (tested). Users are batched by their number of
observations, so a cycle's update is a few stacked matrix products rather than a Python loop over users.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RidgeState", "woodbury_update", "sherman_morrison_update"]


def woodbury_update(a_inv: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A⁻¹ after adding the rows of ``x`` to A, for stacks: ``a_inv`` (n, d, d), ``x`` (n, m, d)."""
    ax = a_inv @ np.swapaxes(x, 1, 2)  # (n, d, m)
    inner = np.eye(x.shape[1])[None] + x @ ax  # (n, m, m)
    return a_inv - ax @ np.linalg.solve(inner, np.swapaxes(ax, 1, 2))


def sherman_morrison_update(a_inv: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A⁻¹ after adding one row ``x`` (d,) to A (the one-at-a-time reference)."""
    ax = a_inv @ x
    return a_inv - np.outer(ax, ax) / (1.0 + x @ ax)


class RidgeState:
    """Per-row ridge statistics (``rows`` = users in ``per_user`` mode, 1 in ``shared`` mode)."""

    def __init__(self, dim: int, lam: float, rows: int = 0):
        self.dim = int(dim)
        self.lam = float(lam)
        self.a = np.zeros((0, dim, dim))
        self.a_inv = np.zeros((0, dim, dim))
        self.b = np.zeros((0, dim))
        self.theta = np.zeros((0, dim))
        self.n_obs = np.zeros(0, np.int64)
        self.grow(rows)

    def grow(self, rows: int) -> None:
        """Rows for new users: A = λI, b = 0."""
        have = len(self.b)
        if rows <= have:
            return
        extra = rows - have
        eye = np.broadcast_to(np.eye(self.dim), (extra, self.dim, self.dim))
        self.a = np.concatenate([self.a, eye * self.lam])
        self.a_inv = np.concatenate([self.a_inv, eye / self.lam])
        self.b = np.concatenate([self.b, np.zeros((extra, self.dim))])
        self.theta = np.concatenate([self.theta, np.zeros((extra, self.dim))])
        self.n_obs = np.concatenate([self.n_obs, np.zeros(extra, np.int64)])

    def update(self, rows: np.ndarray, x: np.ndarray, r: np.ndarray) -> None:
        """Add observations: row ``rows[j]`` saw features ``x[j]`` (d,) with reward ``r[j]``. Rows are
        batched by how many observations they got; every row's rows of ``x`` are added at once."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return
        order = np.argsort(rows, kind="stable")
        rows, x, r = rows[order], np.asarray(x, np.float64)[order], np.asarray(r, np.float64)[order]
        uniq, start, count = np.unique(rows, return_index=True, return_counts=True)
        np.add.at(self.b, rows, x * r[:, None])
        for m in np.unique(count):
            sel = count == m
            who = uniq[sel]
            if m >= self.dim:  # many observations for one row: invert the updated A
                for row, lo in zip(who.tolist(), start[sel].tolist()):
                    xs = x[lo: lo + m]
                    self.a[row] += xs.T @ xs
                    self.a_inv[row] = np.linalg.inv(self.a[row])
                continue
            idx = start[sel][:, None] + np.arange(m)[None, :]
            self.a[who] += np.swapaxes(x[idx], 1, 2) @ x[idx]
            self.a_inv[who] = woodbury_update(self.a_inv[who], x[idx])
        self.n_obs[uniq] += count
        self.theta[uniq] = np.einsum("nde,ne->nd", self.a_inv[uniq], self.b[uniq])

    def accumulate(self, row: int, x: np.ndarray, r: np.ndarray) -> None:
        """Add a block of observations to one row's A and b without inverting (call :meth:`solve` after the
        last block): the shared model takes a cycle's observations in bounded-memory blocks. The block's
        XᵀX is a float32 product, accumulated in float64 across blocks."""
        x32 = np.ascontiguousarray(x, np.float32)
        self.a[row] += x32.T @ x32
        self.b[row] += x.T @ r
        self.n_obs[row] += len(x)

    def solve(self, row: int) -> None:
        """A⁻¹ and θ̂ of ``row`` from its accumulated A and b."""
        self.a_inv[row] = np.linalg.inv(self.a[row])
        self.theta[row] = self.a_inv[row] @ self.b[row]

    def state_dict(self) -> dict:
        return {"dim": self.dim, "lam": self.lam, "a": self.a, "a_inv": self.a_inv, "b": self.b,
                "theta": self.theta, "n_obs": self.n_obs}

    @classmethod
    def from_state_dict(cls, state: dict) -> RidgeState:
        s = cls(int(state["dim"]), float(state["lam"]))
        s.a, s.a_inv, s.b = np.array(state["a"]), np.array(state["a_inv"]), np.array(state["b"])
        s.theta, s.n_obs = np.array(state["theta"]), np.array(state["n_obs"])
        return s
