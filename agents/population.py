"""Arrivals, churn and activity of the user population (vectorised; counter-based draws)."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from recloop.component import Component
from recloop.registry import Params, register
from recloop.rng import component_rng, derive_key, hash_uniform


class Population(Component):
    """Base: who visits each cycle (``active_users``), churn and arrivals after it (``step``)."""

    class Params(Params):
        pass

    uses_ground_truth = True

    @property
    def seed(self) -> int:
        return self.context.seed

    def active_users(self, world, step: int) -> np.ndarray:
        """Ids of users who visit the platform this cycle."""
        return world.users.active_ids()

    def step(self, world, step: int, clicked: np.ndarray | None = None, users: np.ndarray | None = None) -> None:
        """Churn and arrivals after a cycle (``clicked`` aligned with ``users``)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@register("population", "static")
class Static(Population):
    """Every user visits every cycle; nobody leaves or arrives."""


@register("population", "dynamic")
class Dynamic(Population):
    """Users visit with probability ``activity``; leave with ``churn`` (higher after a no-click);
    ``arrivals`` new users per cycle, whose preferences are resampled from existing users plus noise."""

    class Params(Params):
        activity: float = Field(1.0, gt=0, le=1, description="probability an active user visits a cycle")
        churn: float = Field(0.0, ge=0, le=1, description="probability an active user leaves per cycle")
        churn_after_no_click: float = Field(0.0, ge=0, le=1, description="extra churn after a no-click")
        arrivals: float = Field(0.0, ge=0, description="new users per cycle (expected; Poisson)")
        noise: float = Field(0.05, ge=0, description="sd of the noise added to resampled preferences")

    def active_users(self, world, step):
        ids = world.users.active_ids()
        if self.params.activity >= 1.0:
            return ids
        u = hash_uniform(derive_key(self.seed, "activity", step), ids)
        return ids[u < self.params.activity]

    def step(self, world, step, clicked=None, users=None):
        p = self.params
        if users is not None and (p.churn > 0 or p.churn_after_no_click > 0):
            prob = np.full(len(users), p.churn)
            if clicked is not None:
                prob = prob + p.churn_after_no_click * (~clicked)
            leave = hash_uniform(derive_key(self.seed, "churn", step), users) < prob
            world.users.active[users[leave]] = False
        if p.arrivals > 0:
            rng = component_rng(self.seed, "arrivals", step)
            m = int(rng.poisson(p.arrivals))
            if m:
                src = rng.integers(0, world.users.n, size=m)
                prefs = world.users.prefs0[src] + p.noise * rng.standard_normal((m, world.users.dim))
                if world.meta.get("simplex"):
                    prefs = np.abs(prefs)
                    prefs /= prefs.sum(axis=1, keepdims=True)
                attrs = {k: v[src] for k, v in world.users.attributes.items()}
                world.users.append(prefs.astype(np.float32), step + 1, attrs)
