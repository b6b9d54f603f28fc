"""The interaction log the policy trains on: appended per cycle, windowed by the retrain schedule.

Columns are kept as per-cycle chunks (appending never copies earlier data); ``training_data``
concatenates on demand. ``data: initial`` keeps only the initial log; ``window`` drops old chunks, so
memory stays flat on long runs unless the scenario asks to train on everything.
"""

from __future__ import annotations

import numpy as np

from recloop.recommenders.base import TrainingData


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
