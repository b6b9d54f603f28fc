"""The respond phase, fused into serving: an engine sink that applies the users' behaviour (dynamics
adjust perceived utility, the choice model picks) to each chunk of slates as the engine produces it,
so slates are never held as a users x items matrix and choice costs no second pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Response:
    """What the active users did with their slates in one cycle (aligned with ``users``)."""

    users: np.ndarray
    chosen_pos: np.ndarray  # (n,) position picked, -1 = no click
    chosen_item: np.ndarray  # (n,) item picked, -1 = no click
    utility: np.ndarray  # (n,) realised true utility (multi-accept models: the sum over accepted items)
    extra_users: np.ndarray  # further accepted (user, item) pairs of multi-accept choice models
    extra_items: np.ndarray
    choice_probs: np.ndarray | None = None
    extra_positions: np.ndarray | None = None  # slate positions of the extra pairs


class ChoiceSink:
    """Engine sink (``on_chunk(rows, items, scores)``): the users' choice on each chunk of slates."""

    def __init__(self, users: np.ndarray, world, choice, dynamics, key: np.uint64, step: int):
        self.users = users
        self.world = world
        self.choice = choice
        self.dynamics = dynamics
        self.key = key
        self.step = step
        self.many = getattr(choice, "choose_many", None)  # multi-accept models (e.g. EchoTrace replay)
        n = len(users)
        self.chosen_pos = np.full(n, -1, np.int64)
        self.chosen_item = np.full(n, -1, np.int64)
        self.realised = np.zeros(n, np.float32)
        self.probs: np.ndarray | None = None  # (n, k+1) where the model has a closed form (last: no click)
        self._closed_form = self.many is None
        self._extra_users: list[np.ndarray] = []
        self._extra_items: list[np.ndarray] = []
        self._extra_pos: list[np.ndarray] = []

    def __call__(self, sl: slice, items: np.ndarray, scores: np.ndarray) -> None:
        u = self.users[sl]
        valid = items >= 0
        true_u = np.where(valid, self.world.true_utility(u, items), 0.0).astype(np.float32)
        perceived = true_u
        for d in self.dynamics:
            perceived = d.adjust(u, items, perceived, self.world)
        if self.many is not None:
            accept = self._accept_many(u, items, valid, perceived)
            pos = np.where(accept.any(axis=1), np.argmax(accept, axis=1), -1)
        else:
            pos = self.choice.choose(perceived, valid, u, self.key)
            self._keep_probabilities(sl, perceived, valid)
        hit = pos >= 0
        rows = np.flatnonzero(hit)
        self.chosen_pos[sl] = pos
        ci = np.full(len(u), -1, np.int64)
        ci[rows] = items[rows, pos[hit]]
        self.chosen_item[sl] = ci
        if self.many is not None:
            self.realised[sl] = np.where(accept, true_u, 0.0).sum(axis=1).astype(np.float32)
        else:
            ru = np.zeros(len(u), np.float32)
            ru[rows] = true_u[rows, pos[hit]]
            self.realised[sl] = ru

    def _keep_probabilities(self, sl: slice, perceived: np.ndarray, valid: np.ndarray) -> None:
        """The choice model's probabilities of this chunk, when it has them in closed form."""
        if not self._closed_form:
            return
        p = self.choice.probabilities(perceived, valid)
        if p is None:
            self._closed_form = False
            return
        if self.probs is None:
            self.probs = np.zeros((len(self.users), p.shape[1]), np.float32)
        self.probs[sl] = p

    def _accept_many(self, u, items, valid, perceived) -> np.ndarray:
        """Every accepted slot; the first is the user's choice, the others are kept as extra pairs."""
        accept = self.many(perceived, valid, u, self.key, step=self.step) & valid
        first = np.where(accept.any(axis=1), np.argmax(accept, axis=1), -1)
        rest = accept.copy()
        rest[np.arange(len(u)), np.maximum(first, 0)] = False
        r, c = np.nonzero(rest)
        self._extra_users.append(u[r])
        self._extra_items.append(items[r, c])
        self._extra_pos.append(c.astype(np.int16))
        return accept

    def response(self) -> Response:
        z = np.zeros(0, np.int64)
        eu = np.concatenate(self._extra_users) if self._extra_users else z
        ei = np.concatenate(self._extra_items) if self._extra_items else z
        ep = np.concatenate(self._extra_pos) if self._extra_pos else np.zeros(0, np.int16)
        return Response(self.users, self.chosen_pos, self.chosen_item, self.realised, eu, ei, self.probs, ep)
