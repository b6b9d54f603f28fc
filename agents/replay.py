"""The EchoTrace replay user model (Park, Lee & Lee 2026, "Echoes in the Loop", arXiv 2602.07442).

EchoTrace replays a real interaction log through the feedback loop: the timeline of the data set is
cut into ``windows`` consecutive time windows, one per cycle, and in cycle t every user accepts the
top recommended items, first slot first, up to the number of real interactions they had in window t
(users inactive in the window accept nothing). Users therefore never choose *which* items: the
recommender alone decides what enters the training log, and the real data decide how much.

This is registered as the choice model ``replay`` and works on data-set worlds only (``movielens``,
``interactions_csv``), whose generator exposes the real timestamps
(:meth:`recloop.sim.worlds._DataSetWorld.timeline`). The behavioural alternative is an ordinary
choice model such as ``mnl`` (see ``scenarios/echotrace-ml100k-behavioural.yaml``).

Choices (ours where the paper's code leaves them open):

* ``source``: which real interactions set the activity: ``held_out`` (default: the positives after
  each user's initial log, i.e. the "future" of the training data, as in EchoTrace where the ground
  truth follows the training split), ``positives`` (every positive) or ``ratings`` (every rating).
* ``split``: ``timestamps`` (EchoTrace's code: equal numbers of *distinct timestamps* per window,
  the last window takes the remainder) or ``time`` (equal spans of wall-clock time).
* Cycles after the last window accept nothing; so do users that joined during the run.
* Items already consumed are excluded from slates unless ``repeat_consumption`` is on, so a user
  accepts recommended items they have not seen (EchoTrace appends without masking).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from recloop.agents.choice import ChoiceModel
from recloop.errors import RecloopInputError
from recloop.limits import MAX_K, MAX_STEPS
from recloop.registry import Params, register

__all__ = ["ReplayChoice", "window_counts", "window_edges"]


def window_edges(timestamps: np.ndarray, windows: int, split: str = "timestamps") -> np.ndarray:
    """Window index (0..windows-1) of each timestamp.

    ``timestamps``: sorted distinct timestamps are dealt into ``windows`` runs of
    ``len(distinct) // windows`` (the last run takes the rest), as EchoTrace's ``Feedback_Loop.py``
    does; ``time``: [min, max] cut into equal spans (the maximum falls in the last window).
    """
    ts = np.asarray(timestamps, np.float64)
    if windows < 1:
        raise ValueError("windows must be >= 1")
    if ts.size == 0:
        return np.zeros(0, np.int64)
    if split == "time":
        lo, hi = float(ts.min()), float(ts.max())
        if hi <= lo:
            return np.zeros(ts.size, np.int64)
        w = np.floor((ts - lo) / (hi - lo) * windows).astype(np.int64)
        return np.clip(w, 0, windows - 1)
    if split != "timestamps":
        raise ValueError(f"unknown split {split!r}: timestamps or time")
    distinct, inverse = np.unique(ts, return_inverse=True)
    part = max(len(distinct) // windows, 1)
    return np.minimum(inverse // part, windows - 1).astype(np.int64)


def window_counts(
    users: np.ndarray, timestamps: np.ndarray, n_users: int, windows: int, split: str = "timestamps"
) -> np.ndarray:
    """(n_users, windows) int32: each user's number of real interactions per window."""
    w = window_edges(timestamps, windows, split)
    counts = np.zeros((n_users, windows), np.int32)
    np.add.at(counts, (np.asarray(users, np.int64), w), 1)
    return counts


@register("choice", "replay")
class ReplayChoice(ChoiceModel):
    """EchoTrace replay (MovieLens and other real data): in cycle t each user accepts the top slate
    items, first slot first, up to their real number of interactions in time window t; users inactive
    in the window accept nothing. Needs a data-set world (movielens, interactions_csv)."""

    example_world = {"type": "movielens", "dim": 8, "n_users": 100, "n_items": 200, "initial_fraction": 0.5}

    class Params(Params):
        windows: int = Field(10, gt=0, le=MAX_STEPS, description="time windows = replayed cycles (set steps to this)")
        split: Literal["timestamps", "time"] = Field(
            "timestamps",
            description="timestamps: equal numbers of distinct timestamps (EchoTrace); "
            "time: equal spans of time",
        )
        source: Literal["held_out", "positives", "ratings"] = Field(
            "held_out",
            description="real interactions that set the activity: the held-out positives "
            "(after the initial log), all positives, or all ratings",
        )
        max_per_cycle: int | None = Field(None, gt=0, le=MAX_K, description="cap on items accepted per user and cycle")

    def on_bind(self, context) -> None:
        generator = context.generator
        timeline = getattr(generator, "timeline", None)
        if timeline is None:
            name = getattr(generator, "registry_name", type(generator).__name__)
            raise RecloopInputError(
                f"the replay choice model (EchoTrace) replays a real interaction log, but the world "
                f"'{name}' has none. Use a data-set world (type: movielens or interactions_csv), or a "
                "behavioural choice model such as mnl.",
                key="users.choice.type",
            )
        p = self.params
        users, _items, ts = timeline(p.source)
        if len(users) == 0:
            hint = (
                " With source: held_out, set the world's initial_fraction below 1 (e.g. 0.5) so that "
                "each user has later positives to replay, or use source: positives."
                if p.source == "held_out"
                else ""
            )
            raise RecloopInputError(
                f"the world has no {p.source} interactions to replay.{hint}", key="users.choice.source"
            )
        n_users = len(generator.fitted().prefs)
        self.counts = window_counts(users, ts, n_users, p.windows, p.split)
        if p.max_per_cycle is not None:
            np.minimum(self.counts, p.max_per_cycle, out=self.counts)
        self.t_range = (float(np.min(ts)), float(np.max(ts)))

    # -- the protocol --------------------------------------------------------------------------
    def quota(self, users: np.ndarray, step: int) -> np.ndarray:
        """How many recommended items each user accepts in cycle ``step`` (0 after the last window)."""
        users = np.asarray(users, np.int64)
        out = np.zeros(len(users), np.int64)
        if not 0 <= step < self.counts.shape[1]:
            return out
        known = users < self.counts.shape[0]
        out[known] = self.counts[users[known], step]
        return out

    def choose_many(self, util, valid, users, key, step: int = 0) -> np.ndarray:
        """(n, k) bool: the first ``quota`` valid slots of each slate (top of the slate first)."""
        valid = np.asarray(valid, bool)
        q = self.quota(users, step)
        rank = np.cumsum(valid, axis=1)  # 1-based rank among valid slots
        return valid & (rank <= q[:, None])

    def choose(self, util, valid, users, key):
        """Single-choice fallback (no step is known here): the top valid slot of users with any
        activity in the first window, else no click."""
        acc = self.choose_many(util, valid, users, key, step=0)
        return np.where(acc.any(axis=1), np.argmax(acc, axis=1), -1).astype(np.int64)

    def activity(self) -> dict[str, list[float]]:
        """Per window: active users and real interactions (for reports and tests)."""
        return {
            "active_users": (self.counts > 0).sum(axis=0).astype(float).tolist(),
            "interactions": self.counts.sum(axis=0).astype(float).tolist(),
        }
