"""LLM-drawn interactions for a policy's warm start (HyperBandit+'s "LLM Start", F-AUG): the registered
``llm_interactions`` service. A policy below the LLM layer asks for it by name through its build
context (``context.service("llm_interactions", ...)``), never by import.

It runs the R1 augmenter's generation round (:class:`~.role_augment.LLMAugmented`: history and candidate
titles in, matched titles out, through the run's :class:`~.service.LLMService`, so the surrogate by
default and the real model when the scenario's ``llm:`` block names it) on sampled users until it has
the interactions asked for, and reports the round like the augmenter does, so the warm start's risks
(popularity bias, hallucinated titles) appear in the ``llm_*`` metrics with ``role=augmenter``.
"""

from __future__ import annotations

import numpy as np

from recloop import registry

from .reports import AugmenterReport
from .role_augment import LLMAugmented

__all__ = ["LLMInteractions"]

ROUNDS = 8  #: generation rounds tried before giving up on reaching the requested count


class LLMInteractions:
    """Draws (user, item) interactions from the run's LLM (titles matched to the catalog)."""

    def __init__(self, context, titles_per_user: int = 10, candidates: int = 40):
        self.titles_per_user = titles_per_user
        self.augmenter = LLMAugmented(LLMAugmented.Params(base={"type": "random"}, n=titles_per_user,
                                                          candidates=candidates)).bind(context)

    def draw(self, view, n: int, step: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """About ``n`` interactions (at most ``n``), from as many users as needed (seeded by the run)."""
        users: list[np.ndarray] = []
        items: list[np.ndarray] = []
        got = 0
        per_round = max(1, -(-n // self.titles_per_user))
        aug = self.augmenter
        for r in range(ROUNDS):
            if got >= n:
                break
            aug.params = aug.params.model_copy(update={"users_per_cycle": min(per_round, view.users.n)})
            aug._reports = []
            pairs = aug.augment(view, step + r)
            if pairs is not None:
                users.append(pairs[0])
                items.append(pairs[1])
                got += len(pairs[0])
        if not users:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(users)[:n], np.concatenate(items)[:n]

    def stage_report(self) -> AugmenterReport:
        return self.augmenter.stage_report()

    def state_dict(self) -> dict:
        """The augmenter's counters and phantom flags (checkpointed with the run's services)."""
        return self.augmenter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.augmenter.load_state_dict(state)

    def close(self) -> None:
        """Nothing to release (the LLM service is closed on its own)."""


registry.register_service("llm_interactions", LLMInteractions)
