"""The coarse actors of the loop as Mesa agents: the platform, the user population and the creators.

Users and items are arrays (:mod:`recloop.sim.state`); these agents own the components that act on them
and their methods are the phases of a cycle (see :class:`recloop.sim.model.FeedbackLoop`):

* :class:`PlatformAgent` serves slates (``serve``), learns online from the cycle record (``observe``) and
  retrains (``produce`` then ``fit``);
* :class:`UsersAgent` says who visits (``active``), responds to slates (``sink``: the choice model fused
  into serving), draws organic picks (``organic``) and advances (``advance``: drift, satiation, churn);
* :class:`CreatorsAgent` advances the catalog (``advance``: creators adapt and publish).

``advance`` is the verb both of the last two share, called through Mesa's ``AgentSet.do``.
"""

from __future__ import annotations

import time

import mesa
import numpy as np

from recloop.contracts import Feedback, PlatformView, Report, TrainingData
from recloop.rng import component_rng, derive_key, hash_u64, hash_uniform
from recloop.sim.respond import ChoiceSink, Response


class PlatformAgent(mesa.Agent):
    """The platform: a policy (bound with its platform view) and the schedule it is served on."""

    def __init__(self, model, policy, view: PlatformView):
        super().__init__(model)
        self.policy = policy
        self.view = view

    def serve(self, users: np.ndarray, step: int, sink: ChoiceSink) -> tuple[np.ndarray, np.ndarray]:
        """Slates (len(users), k) and their scores; the engine hands each chunk to ``sink``."""
        m = self.model
        exclude = None if m.scenario.users.repeat_consumption else self.view.history  # read-only
        return self.policy.recommend(users, m.scenario.k, self.view, exclude=exclude, step=step,
                                     engine=m.engine, on_chunk=sink)

    def observe(self, feedback: Feedback) -> None:
        """Online learning from the cycle (policies with ``online = True``)."""
        if self.policy.online:
            self.policy.update(feedback, self.view)

    def produce(self, step: int) -> list[Report]:
        """Data the policy's stages add before a retrain (committed by the loop)."""
        return self.policy.produce(self.view, step=step)

    def fit(self, data: TrainingData, step: int, warm_start: bool) -> None:
        t0 = time.perf_counter()
        self.policy.fit(data, self.view, step=step, rng=component_rng(self.model.seed, "fit", step),
                        warm_start=warm_start)
        self.model.timings["retrain"].append(time.perf_counter() - t0)


class UsersAgent(mesa.Agent):
    """The user population: choice model, dynamics and population process (simulator-side components)."""

    def __init__(self, model, choice, dynamics: list, population):
        super().__init__(model)
        self.choice = choice
        self.dynamics = dynamics
        self.population = population

    def active(self, step: int) -> np.ndarray:
        return self.population.active_users(self.model.world, step)

    def sink(self, users: np.ndarray, step: int) -> ChoiceSink:
        """The respond phase as an engine sink: the choice on each chunk of slates, as it is scored."""
        key = derive_key(self.model.seed, "choice", step)
        return ChoiceSink(users, self.model.world, self.choice, self.dynamics, key, step)

    def organic(self, step: int, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Organic picks outside recommendations: with probability ``organic_rate`` a user picks a
        uniformly drawn item (counter-based draws: independent of chunking and of the policy)."""
        sc = self.model.scenario
        key = derive_key(self.model.seed, "organic", step)
        pick = hash_uniform(key, users, 0) < sc.users.organic_rate
        users = users[pick]
        items = (hash_u64(key, users, 1) % np.uint64(self.model.world.items.n)).astype(np.int64)
        return users, items

    def advance(self, response: Response, step: int) -> None:
        """Tastes move (drift, satiation, familiarity), then users leave and arrive."""
        w = self.model.world
        for d in self.dynamics:
            d.update(response.users, response.chosen_item, w, step)
        self.population.step(w, step, response.chosen_item >= 0, response.users)


class CreatorsAgent(mesa.Agent):
    """The creator population (array-backed): adapts to consumption and publishes items."""

    def __init__(self, model, creators):
        super().__init__(model)
        self.creators = creators

    def advance(self, response: Response, step: int) -> None:
        self.creators.step(self.model.world, step, response.users, response.chosen_item)
