"""A set-valued policy: each user is shown its conformal set (reference C-SPLIT, C-EXCH), so the loop runs on
sets and we can watch what that does to the ecosystem.

``conformal_set`` wraps a ``base`` policy. The base ranks the catalog; the slate is the base's top-k cut to
the user's conformal set {i : s(u, i) ≤ q̂} under p̂(i | u) = softmax(β·score) over the items the user can
get: LAC keeps p̂_i ≥ 1 − q̂, APS keeps items while the mass down to and including them stays ≤ q̂. The set
is capped at the slate size k (``-1`` fills the empty slots, which every choice model treats as nothing
shown) and holds at least ``min_size`` items.

Calibration is online, from the loop's own feedback: after each cycle the users who consumed something
are points (label: the first item consumed, slate picks and organic picks alike), scored with the model
that served them; q̂ is the split-conformal quantile of the last ``window`` cycles' points. The
temperature is fitted by likelihood on a disjoint sample of the first cycle's points (every cycle's with
``temperature_refit``) unless given. Until the first feedback q̂ = +∞ (the full set, so the base's top-k).

Labels picked from the shown sets are what C-EXCH calls selection by the policy: without organic
consumption the calibration sees mostly covered labels and q̂ shrinks, and a temperature refitted on
such labels grows without bound (the sets collapse to ``min_size``); that is the effect this policy lets
a study measure.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from recloop import registry
from recloop.component import Child
from recloop.recommenders.base import Policy
from recloop.registry import Params, register
from recloop.rng import component_rng
from recloop.sim.conformal import conformal_quantile
from recloop.sim.conformal_chunks import BlockScorer, HistoryBefore, block_stats, exclude_pairs, fit_beta, score_blocks

__all__ = ["ConformalSetPolicy"]


@register("policy", "conformal_set")
class ConformalSetPolicy(Policy):
    """Each user's conformal set as a variable-size slate (capped at k), calibrated online from the loop's
    own feedback (C-SPLIT LAC or APS; C-EXCH)."""

    online = True
    example_params = {"base": {"type": "popularity"}, "calibration_users": 30, "temperature_users": 20}

    class Params(Params):
        base: Child("policy") = Field(description="the policy whose scores rank the catalog ({type: ..., ...})")
        method: Literal["lac", "aps"] = Field("lac", description="LAC (1 − p̂) or non-randomised APS sets")
        alpha: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(0.1, description="miscoverage level α")
        calibration_users: Annotated[int, Field(ge=1, le=1_000_000)] = Field(500, description="points per cycle")
        temperature_users: Annotated[int, Field(ge=0, le=1_000_000)] = Field(
            300, description="points per cycle for the temperature fit (disjoint from the calibration points)")
        temperature: Annotated[float, Field(gt=0.0)] | None = Field(None, description="a fixed temperature (no fit)")
        temperature_refit: bool = Field(
            False, description="refit the temperature every cycle (default: once, on the first feedback, before the "
                               "sets select the labels)")
        window: Annotated[int, Field(ge=1, le=10_000)] = Field(1, description="cycles of calibration points kept")
        min_size: Annotated[int, Field(ge=0, le=10_000)] = Field(1, description="items always shown (top of the base)")

    def __init__(self, params=None):
        super().__init__(params)
        self.base = registry.build("policy", self.params.base)
        self.uses_ground_truth = self.base.uses_ground_truth
        p = self.params
        self.qhat = math.inf
        self.beta = math.nan if p.temperature is None else 1.0 / p.temperature
        self.points = np.zeros(0, np.float64)
        self.point_steps = np.zeros(0, np.int64)
        self.excluding = True  # repeats off: consumed items are not in a set (set by each recommend call)

    def children(self) -> list:
        return [self.base]

    def fit(self, data, view, *, step, rng, warm_start):
        self.base.fit(data, view, step=step, rng=rng, warm_start=warm_start)

    def score(self, users, view, step=0):
        return self.base.score(users, view, step)

    def _scorer(self, view, step) -> BlockScorer:
        n = view.items.n
        f = self.base.factors(view)
        if f is not None:
            return BlockScorer(n, factors=f)
        return BlockScorer(n, fn=lambda ids: self.base.score(ids, view, step))

    def _beta(self) -> float:
        return self.beta if math.isfinite(self.beta) else 1.0

    # -- serving ---------------------------------------------------------------------------------------
    def recommend(self, users, k, view, *, exclude=None, step=0, engine=None, on_chunk=None):
        engine = engine or self.engine
        users = np.asarray(users, np.int64)
        self.excluding = exclude is not None
        scorer = self._scorer(view, step)
        beta = np.float32(self._beta())
        lse = np.zeros(int(users.max()) + 1 if len(users) else 0)

        def scores(ids):
            S = scorer(ids)
            if exclude is not None:
                exclude_pairs(S, ids, exclude)
            top = S.max(axis=1)
            top = np.where(np.isfinite(top), top, 0.0).astype(np.float32)
            z = np.exp(beta * (S - top[:, None])).sum(axis=1, dtype=np.float64)
            lse[ids] = np.log(np.maximum(z, 1e-300)) + float(beta) * top
            return S

        def stage(sl, items, sc):
            self._cut(items, sc, lse[users[sl]], float(beta))
            if on_chunk is not None:
                on_chunk(sl, items, sc)

        return engine.topk(users, k, view.items.n, scores, exclude=exclude, on_chunk=stage)

    def _cut(self, items: np.ndarray, sc: np.ndarray, lse: np.ndarray, beta: float) -> None:
        """Keep each slate's conformal set (a prefix of the ranked slate), in place; -1 elsewhere."""
        p = np.where(items >= 0, np.exp(beta * sc.astype(np.float64) - lse[:, None]), 0.0)
        if self.params.method == "lac":
            keep = (1.0 - p) <= self.qhat
        else:
            keep = np.cumsum(p, axis=1) <= self.qhat
        keep |= np.arange(items.shape[1])[None, :] < self.params.min_size
        keep &= items >= 0
        items[~keep] = -1
        sc[~keep] = -np.inf

    # -- online calibration ----------------------------------------------------------------------------
    def update(self, feedback, view):
        """Calibrate q̂ on this cycle's consumption (scored by the model that served it), then let an online
        base learn."""
        self._calibrate(feedback, view)
        if self.base.online:
            self.base.update(feedback, view)

    def _calibrate(self, feedback, view) -> None:
        p = self.params
        users, labels = _points(feedback, view.items.n)
        if not len(users):
            return
        perm = component_rng(self.context.seed, "policy.conformal_set", feedback.step).permutation(len(users))
        fit = p.temperature is None and (p.temperature_refit or not math.isfinite(self.beta))
        n_temp = min(p.temperature_users, len(users) // 2) if fit else 0
        temp, cal = np.sort(perm[:n_temp]), np.sort(perm[n_temp:n_temp + p.calibration_users])
        exclude = HistoryBefore(view.history, *(feedback.consumed or (users, labels))) if self.excluding else None
        scorer = self._scorer(view, feedback.step)
        if n_temp:
            def blocks():
                return score_blocks(self.engine, users[temp], scorer, exclude)
            self.beta = fit_beta(blocks, labels[temp], self._beta())
        if not len(cal):
            return
        p_y, above = np.zeros(len(cal)), np.zeros(len(cal))
        for lo, hi, S in score_blocks(self.engine, users[cal], scorer, exclude):
            p_y[lo:hi], above[lo:hi], _, _ = block_stats(S, self._beta(), labels[cal][lo:hi])
        scores = 1.0 - p_y if p.method == "lac" else above + p_y
        keep = self.point_steps > feedback.step - p.window
        self.points = np.concatenate([self.points[keep], scores])
        self.point_steps = np.concatenate([self.point_steps[keep], np.full(len(scores), feedback.step, np.int64)])
        self.qhat = conformal_quantile(self.points, p.alpha)

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self):
        return {"base": self.base.state_dict(), "qhat": float(self.qhat), "beta": float(self.beta),
                "points": self.points, "point_steps": self.point_steps, "excluding": self.excluding}

    def load_state_dict(self, state):
        self.base.load_state_dict(state["base"])
        self.qhat, self.beta = float(state["qhat"]), float(state["beta"])
        self.points = np.asarray(state["points"], np.float64)
        self.point_steps = np.asarray(state["point_steps"], np.int64)
        self.excluding = bool(state["excluding"])


def _points(feedback, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(users, labels): each user who consumed something in the cycle and its first consumed item."""
    if feedback.consumed is not None and len(feedback.consumed[0]):
        u, i = (np.asarray(a, np.int64) for a in feedback.consumed)
    else:
        hit = feedback.chosen_item >= 0
        u, i = np.asarray(feedback.users[hit], np.int64), np.asarray(feedback.chosen_item[hit], np.int64)
    users, first = np.unique(u, return_index=True)
    labels = i[first]
    ok = labels < n_items
    return users[ok], labels[ok]
