"""Outcome metrics of familiarity debiasing (E-LAFB, GROUNDING §3 [O]): the novel share of consumption
("Novel WT share"), novel exposure, and the exposure of emerging creators.

Registered as the metric component ``familiarity`` (off by default: name it in ``metrics.include``).
Stateless: "before this cycle" is read from the record (histories minus this cycle's consumption, and
φ before the cycle), so the metrics need no checkpointed state and are exact after a resume.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from recloop.analysis.collectors import MetricComponent
from recloop.contracts import CycleRecord
from recloop.registry import Params, register

NAN = float("nan")


def _share(mask: np.ndarray) -> float:
    return float(mask.mean()) if mask.size else NAN


def seen_creator_keys(users: np.ndarray, history, creator: np.ndarray, cycle_pairs: tuple[np.ndarray, np.ndarray],
                      stride: int) -> np.ndarray:
    """Sorted keys row·stride + creator of the creators each user in ``users`` (sorted, unique) had consumed
    *before* this cycle: their consumed sets after it, minus the pairs consumed in it (``cycle_pairs`` as
    (row, item))."""
    indptr, items = history.csr(users)
    items = np.asarray(items, np.int64)
    owner = np.repeat(np.arange(len(users), dtype=np.int64), np.diff(indptr))
    n_items = int(max(items.max(initial=-1), cycle_pairs[1].max(initial=-1))) + 1
    now = np.unique(cycle_pairs[0] * n_items + cycle_pairs[1])
    before = ~np.isin(owner * n_items + items, now, assume_unique=False)
    cr = creator[items[before]].astype(np.int64)
    ok = cr >= 0
    return np.unique(owner[before][ok] * stride + cr[ok])


@register("metric", "familiarity")
class FamiliarityMetrics(MetricComponent):
    """Novel share of consumption, novel exposure and emerging-creator exposure (E-LAFB outcomes [O]).

    * ``novel_share``: of this cycle's consumption (picks, further accepts, organic picks) of items that
      have a creator, the share whose creator the user had never consumed before the cycle: the "Novel WT
      share" of LAFB, with one consumption for one unit of watch time. Over the metric user sample, or
      every active user (``all_users``; reads all their histories each cycle).
    * ``novel_exposure``: the same share over the slate slots shown to those users.
    * ``emerging_creator_exposure``: the share of this cycle's exposure (slate slots on items with a
      creator) that goes to emerging creators, those with fewer than F = ``emerging_threshold``
      consumptions before the cycle (a consumption = a distinct (user, item) pair, i.e. Σ φ(i) over the
      creator's items).

    With ``users.repeat_consumption`` an item re-consumed this cycle does not count as seen before.
    Worlds without creators give NaN.
    """

    METRICS = {
        "novel_share": "E-LAFB novel share: share of this cycle's consumption (items with a creator) whose "
                       "creator the user had never consumed before (sampled users; 'Novel WT share')",
        "novel_exposure": "E-LAFB share of slate slots (items with a creator) whose creator the user had never "
                          "consumed before the cycle (sampled users)",
        "emerging_creator_exposure": "E-LAFB exposure share of emerging creators: slate slots on creators "
                                     "with fewer than F consumptions before the cycle (F = emerging_threshold)",
    }
    default = False

    class Params(Params):
        emerging_threshold: int = Field(20, ge=1, le=10**12,
                                        description="F: a creator is emerging below F consumptions")
        all_users: bool = Field(False, description="novel shares over every active user, not the metric sample")

    def compute(self, rec: CycleRecord) -> list[tuple[str, str, float]]:
        creator = np.asarray(rec.world.items.creator[: rec.world.items.n], np.int64)
        novel, novel_slots = self._novel(rec, creator)
        return [("novel_share", "", _share(novel)), ("novel_exposure", "", _share(novel_slots)),
                ("emerging_creator_exposure", "", self._emerging(rec, creator))]

    def _users(self, rec: CycleRecord, consumers: np.ndarray) -> np.ndarray:
        if self.params.all_users:
            return np.union1d(np.asarray(rec.users, np.int64), consumers)
        return np.asarray(rec.user_sample, np.int64)

    def _novel(self, rec: CycleRecord, creator: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per consumed pair and per shown slot of the users measured: is the creator new to the user?"""
        cu, ci = (np.asarray(a, np.int64) for a in rec.consumed)
        users = self._users(rec, cu)
        empty = np.zeros(0, bool)
        if len(users) == 0 or len(creator) == 0:
            return empty, empty
        stride = int(creator.max(initial=-1)) + 1
        mine = np.isin(cu, users)
        rows, ci = np.searchsorted(users, cu[mine]), ci[mine]
        seen = seen_creator_keys(users, rec.history, creator, (rows, ci), max(stride, 1))
        cc = creator[ci]
        novel = ~np.isin(rows[cc >= 0] * stride + cc[cc >= 0], seen)
        shown = np.isin(users, rec.users)
        sl = rec.slates[np.searchsorted(rec.users, users[shown])]
        slot_rows = np.broadcast_to(np.flatnonzero(shown)[:, None], sl.shape)
        sc = np.where(sl >= 0, creator[np.maximum(sl, 0)], -1)
        has = sc >= 0
        return novel, ~np.isin(slot_rows[has] * stride + sc[has], seen)

    def _emerging(self, rec: CycleRecord, creator: np.ndarray) -> float:
        """Exposure share of creators with fewer than F consumptions (Σ φ over their items) before the cycle."""
        has = creator >= 0
        if not has.any():
            return NAN
        pop = np.zeros(len(creator))
        before = np.asarray(rec.popularity_before, np.float64)[: len(creator)]
        pop[: len(before)] = before
        total = np.bincount(creator[has], weights=pop[has])
        emerging = total < self.params.emerging_threshold
        e = rec.exposure
        shown = float(e[has].sum())
        if shown <= 0:
            return NAN
        return float(e[has][emerging[creator[has]]].sum()) / shown
