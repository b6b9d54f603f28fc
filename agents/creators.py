"""Creators that adapt to what gets consumed and publish new items (reference CR-TRECS)."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from recloop.component import Component
from recloop.limits import MAX_ITEMS
from recloop.registry import Params, register
from recloop.rng import component_rng


def trecs_profile_update(profiles: np.ndarray, gains: np.ndarray, lr: float) -> np.ndarray:
    """CR-TRECS: c_j ← normalise(c_j + η Σ a_i over interacted items of j), then clip to [1e-4, 1]."""
    out = np.abs(profiles + lr * gains)
    out = out / np.maximum(out.sum(axis=1, keepdims=True), 1e-12)
    return np.clip(out, 1e-4, 1.0).astype(np.float32)


class CreatorModel(Component):
    """Base: creators adapt to consumption and publish items (``step``); bound with the simulator's
    view and the world generator (new items are drawn like the world's)."""

    class Params(Params):
        pass

    uses_ground_truth = True

    @property
    def seed(self) -> int:
        return self.context.seed

    @property
    def generator(self):
        return self.context.generator

    def step(self, world, step: int, users: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        """Adapt profiles to this cycle's consumption and publish items; returns new item ids."""
        return np.zeros(0, np.int64)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@register("creator", "trecs")
class TrecsCreators(CreatorModel):
    """CR-TRECS: each creator moves toward the attributes of its consumed items (rate η) and, with
    probability ``creation_prob`` per cycle, publishes a new item drawn around its profile."""

    class Params(Params):
        creation_prob: float = Field(0.5, ge=0, le=1, description="p_c per creator per cycle")
        learning_rate: float = Field(0.05, ge=0, description="η")
        max_new_items: int = Field(100000, ge=0, le=MAX_ITEMS, description="cap on items created over the whole run")

    def __init__(self, params=None):
        super().__init__(params)
        self.created = 0

    def step(self, world, step, users, chosen):
        cr = world.creators
        if cr is None or cr.n == 0:
            return np.zeros(0, np.int64)
        hit = chosen >= 0
        items = chosen[hit]
        owner = world.items.creator[items]
        ok = owner >= 0
        gains = np.zeros_like(cr.profiles, dtype=np.float64)
        np.add.at(gains, owner[ok], world.items.attrs[items[ok]])
        if world.meta.get("simplex", False):
            cr.profiles[:] = trecs_profile_update(cr.profiles, gains, self.params.learning_rate)
        else:
            counts = np.bincount(owner[ok], minlength=cr.n)[:, None]
            mean = gains / np.maximum(counts, 1)
            move = np.where(counts > 0, mean - cr.profiles, 0.0)
            cr.profiles[:] = (cr.profiles + self.params.learning_rate * move).astype(np.float32)
        rng = component_rng(self.seed, "creators", step)
        makers = np.flatnonzero(rng.random(cr.n) < self.params.creation_prob)
        makers = makers[: max(0, self.params.max_new_items - self.created)]
        if len(makers) == 0 or self.generator is None:
            return np.zeros(0, np.int64)
        attrs, genres, titles = self.generator.new_items(makers, world, rng)
        self.created += len(makers)
        return world.items.append(attrs, genres, titles, makers.astype(np.int32), cr.group[makers], step + 1)

    def state_dict(self):
        return {"created": self.created}

    def load_state_dict(self, state):
        self.created = state["created"]
