"""Bandit metrics per cycle (registered as metric ``bandit``; not on by default): regret against the
ideal policy under the choice model, reward, reward against random slates, and how much the policy
explores. ``group`` is empty.

Expected values use the choice model's closed-form probabilities P(j | slate) (the record's
``choice_probabilities``; a model without one, such as EchoTrace's replay, gives no rows): the expected
utility of a slate is Σ_j P(j)·V_uj and its expected reward (a click) is 1 − P(no click). Both are
evaluated on the true utilities users had when served (the record's ``truth_at_serve``: tastes that
move in the advance phase are taken before they move) for the served slate, the ideal policy's slate
(top-k by true utility, the served slate's exclusions) and a uniformly random slate, for every active
user.
"""

from __future__ import annotations

import numpy as np

from recloop.analysis.collectors import MetricComponent
from recloop.analysis.user_collectors import _Before
from recloop.registry import register
from recloop.rng import derive_key

__all__ = ["BanditMetrics", "expected_utility_and_reward"]


def expected_utility_and_reward(probabilities, world, users, slates) -> tuple[np.ndarray, np.ndarray] | None:
    """(E[utility], E[reward]) of each user's slate under the choice model; None without a closed form."""
    valid = slates >= 0
    util = np.where(valid, world.true_utility(users, np.maximum(slates, 0)), 0.0).astype(np.float32)
    p = probabilities(util, valid) if probabilities is not None else None
    if p is None:
        return None
    k = slates.shape[1]
    return (p[:, :k] * util).sum(axis=1), 1.0 - p[:, k]


@register("metric", "bandit")
class BanditMetrics(MetricComponent):
    """Bandit metrics: cumulative regret against ideal (expected utility under the choice model),
    cumulative reward, expected reward relative to random slates, and the exploration share."""

    default = False
    needs_serve_time_truth = True  # regret compares slates under the tastes users had when served
    METRICS = {
        "cumulative_regret": "Σ over cycles and active users of E[utility] of the ideal policy's slate minus "
                             "that of the served slate, both under the choice model's probabilities",
        "cumulative_reward": "Σ over cycles of the clicks on served slates (realised rewards)",
        "reward_ratio_random": "cumulative E[reward] of the served slates ÷ that of uniformly random slates "
                               "for the same users (1 = no better than random)",
        "exploration_share": "share of the shown items (sampled users) that the policy's greedy, mean-only "
                             "ranking would not have shown; only for policies that explore",
    }

    def setup(self, world, seed, config):
        self.seed = seed
        self.regret = 0.0
        self.reward = 0.0
        self.served_reward = 0.0
        self.random_reward = 0.0

    def compute(self, rec):
        exclude = None if rec.repeat_consumption else _Before(rec.history, rec)
        w = rec.truth_at_serve if rec.truth_at_serve is not None else rec.world
        served = expected_utility_and_reward(rec.choice_probabilities, w, rec.users, rec.slates)
        if served is None or not len(rec.users):
            return []
        k, n = rec.slates.shape[1], w.items.n
        ideal, _ = rec.engine.topk_factors(rec.users, k, w.users.prefs, w.items.attrs[:n], exclude=exclude)
        best = expected_utility_and_reward(rec.choice_probabilities, w, rec.users, ideal)
        key = derive_key(self.seed, "metric.bandit.random", rec.step)
        rand = rec.engine.random_topk(rec.users, k, n, key, exclude=exclude)
        chance = expected_utility_and_reward(rec.choice_probabilities, w, rec.users, rand)
        self.regret += float(np.sum(best[0] - served[0]))
        self.reward += float((rec.chosen_item >= 0).sum())
        self.served_reward += float(served[1].sum())
        self.random_reward += float(chance[1].sum())
        rows = [("cumulative_regret", "", self.regret), ("cumulative_reward", "", self.reward),
                ("reward_ratio_random", "", self.served_reward / self.random_reward if self.random_reward > 0
                 else float("nan"))]
        share = self._exploration_share(rec, exclude)
        if share is not None:
            rows.append(("exploration_share", "", share))
        return rows

    def _exploration_share(self, rec, exclude) -> float | None:
        f = rec.policy.greedy_factors()
        sample = rec.user_sample
        if f is None or not len(sample):
            return None
        U, V, b = f
        k = rec.slates.shape[1]
        greedy, _ = rec.engine.topk_factors(sample, k, U, V, b, exclude=exclude)
        shown = rec.slates[np.searchsorted(rec.users, sample)]
        valid = shown >= 0
        inside = (shown[:, :, None] == greedy[:, None, :]).any(axis=2)
        return float((valid & ~inside).sum() / max(valid.sum(), 1))
