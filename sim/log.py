"""The interaction log the policy trains on: appended per cycle, windowed by the retrain schedule.

Columns are kept as per-cycle chunks (appending never copies earlier data); ``training_data``
concatenates on demand. ``data: initial`` keeps only the initial log; ``window`` drops old chunks, so
memory stays flat on long runs unless the scenario asks to train on everything.
"""

from __future__ import annotations

import numpy as np

from recloop.contracts import TrainingData


class InteractionLog:
    def __init__(self, mode: str = "all", window: int = 50):
        self.mode = mode
        self.window = window
        self.initial: list[tuple] = []
        self.chunks: list[tuple] = []  # (step, users, items, provenance)
        self.counts = np.zeros(3, np.int64)  # cumulative interactions by provenance code

    def add(self, step: int, users: np.ndarray, items: np.ndarray, provenance: np.ndarray | int,
            initial: bool = False) -> None:
        users = np.asarray(users, np.int64)
        items = np.asarray(items, np.int64)
        prov = np.broadcast_to(np.asarray(provenance, np.int8), users.shape).copy()
        self.counts += np.bincount(prov, minlength=3)[:3]
        if initial:
            self.initial.append((step, users, items, prov))
            return
        if self.mode == "initial":
            return
        self.chunks.append((step, users, items, prov))
        if self.mode == "window":
            self.chunks = [c for c in self.chunks if c[0] > step - self.window]

    def state_dict(self) -> dict:
        """The log as arrays (chunks concatenated, with their steps and lengths), for a checkpoint."""
        return {"mode": self.mode, "window": int(self.window), "counts": self.counts,
                "initial": _pack(self.initial), "chunks": _pack(self.chunks)}

    @classmethod
    def from_state_dict(cls, state: dict) -> InteractionLog:
        log = cls(state["mode"], int(state["window"]))
        log.counts = state["counts"].copy()
        log.initial = _unpack(state["initial"])
        log.chunks = _unpack(state["chunks"])
        return log

    def training_data(self, n_users: int, n_items: int) -> TrainingData:
        parts = self.initial + self.chunks
        if not parts:
            return TrainingData.empty(n_users, n_items)
        steps = np.concatenate([np.full(len(c[1]), c[0], np.int32) for c in parts])
        return TrainingData(
            users=np.concatenate([c[1] for c in parts]),
            items=np.concatenate([c[2] for c in parts]),
            steps=steps,
            provenance=np.concatenate([c[3] for c in parts]),
            n_users=n_users,
            n_items=n_items,
        )

    def provenance_shares(self) -> np.ndarray:
        """Share of the training log by provenance (organic, recommended, llm_augmented)."""
        parts = self.initial + self.chunks
        if not parts:
            return np.zeros(3)
        c = np.bincount(np.concatenate([p[3] for p in parts]), minlength=3)[:3].astype(float)
        return c / max(c.sum(), 1.0)


def _pack(chunks: list[tuple]) -> dict[str, np.ndarray]:
    """(step, users, items, provenance) chunks as five arrays: few npz entries however long the run."""
    def cat(j: int, dtype) -> np.ndarray:
        return np.concatenate([c[j] for c in chunks]) if chunks else np.zeros(0, dtype)

    return {"steps": np.array([c[0] for c in chunks], np.int64),
            "lengths": np.array([len(c[1]) for c in chunks], np.int64),
            "users": cat(1, np.int64), "items": cat(2, np.int64), "provenance": cat(3, np.int8)}


def _unpack(packed: dict[str, np.ndarray]) -> list[tuple]:
    cuts = np.cumsum(packed["lengths"])[:-1]
    cols = [np.split(packed[name], cuts) if len(packed["lengths"]) else [] for name in ("users", "items", "provenance")]
    return [(int(s), u, i, p) for s, u, i, p in zip(packed["steps"].tolist(), *cols)]
