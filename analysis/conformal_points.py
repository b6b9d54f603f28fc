"""The points of the ``conformal`` metric in one cycle (reference C-SPLIT, C-EXCH): who is a point, with
which label, in which sample, in which group and stratum.

* A point is a user who consumed something in the cycle; its label is the first item it consumed (the
  slate pick, else a further accept or an organic pick, in the loop's order). Users who consume nothing
  are not points. One point per user.
* Each cycle the points are shuffled with a generator derived from (run seed, cycle) and cut into
  disjoint temperature-fit, calibration and test samples (shrunk in proportion when the cycle has fewer
  points than asked for), each kept in user order.
* User groups: a categorical user attribute of the world (``gender`` first, else the first attribute
  with at most 20 values), else the M-POPLIFT popularity groups (niche / diverse / blockbuster, from
  the share of short-head items in the user's consumption before the cycle).
* Strata: set size (0 | 1 | 2–5 | 6–20 | 21–100 | >100), the label's popularity before the cycle (head:
  the 20 % most consumed items; tail: the 50 % least; mid: the rest) and the user group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recloop.analysis import metrics as M
from recloop.rng import component_rng

__all__ = ["SIZE_BINS", "Samples", "cycle_points", "popularity_stratum", "size_stratum", "split", "user_groups"]

#: set-size strata: (label, smallest size, largest size)
SIZE_BINS = (("0", 0, 0), ("1", 1, 1), ("2-5", 2, 5), ("6-20", 6, 20), ("21-100", 21, 100),
             (">100", 101, np.iinfo(np.int64).max))


def cycle_points(rec) -> tuple[np.ndarray, np.ndarray]:
    """(users, labels): each user who consumed something this cycle (sorted) and its first consumed item."""
    u, i = (np.asarray(a, np.int64) for a in rec.consumed)
    if not len(u):
        hit = rec.chosen_item >= 0
        u, i = np.asarray(rec.users[hit], np.int64), np.asarray(rec.chosen_item[hit], np.int64)
    users, first = np.unique(u, return_index=True)
    labels = i[first]
    ok = labels < rec.world.items.n
    return users[ok], labels[ok]


@dataclass(frozen=True)
class Samples:
    """Indices (into the cycle's points) of the three disjoint samples, each in user order."""

    temp: np.ndarray
    cal: np.ndarray
    test: np.ndarray


def split(n: int, seed: int, step: int, n_temp: int, n_cal: int, n_test: int) -> Samples:
    """Disjoint random samples of the ``n`` points (seeded by run seed and cycle)."""
    want = n_temp + n_cal + n_test
    if want > n:  # fewer points than asked for: every sample shrinks in proportion
        scale = n / want
        n_temp, n_cal = int(n_temp * scale), int(n_cal * scale)
        n_test = n - n_temp - n_cal if n_test else 0
    perm = component_rng(seed, "metric.conformal.split", step).permutation(n)
    a, b = n_temp, n_temp + n_cal
    return Samples(np.sort(perm[:a]), np.sort(perm[a:b]), np.sort(perm[b:b + n_test]))


def draws(seed: int, step: int, n: int, what: str) -> np.ndarray:
    """Uniform draws for randomised APS, one per point of a sample."""
    return component_rng(seed, f"metric.conformal.u.{what}", step).random(n)


# ----------------------------------------------------------------------------------------- user groups
def group_attribute(world, choice: str) -> str | None:
    """The user attribute that defines groups (None: popularity groups)."""
    attrs = dict(world.users.attributes or {})
    if choice not in ("auto", "popularity", "none"):
        if choice not in attrs:
            raise ValueError(f"the world has no user attribute '{choice}' (it has: {', '.join(attrs) or 'none'})")
        return choice
    if choice != "auto":
        return None
    names = ["gender"] if "gender" in attrs else []
    names += [k for k in attrs if k != "gender"]
    n = world.users.n
    for k in names:
        if len(np.unique(np.asarray(attrs[k])[:n])) <= 20:
            return k
    return None


def user_groups(rec, users: np.ndarray, attribute: str | None, before) -> np.ndarray:
    """Group label (str) of each user: its attribute value, or its M-POPLIFT popularity group."""
    if attribute is not None:
        return np.asarray(rec.world.users.attributes[attribute])[users].astype(str)
    pop = np.zeros(rec.world.items.n)
    pb = rec.popularity_before[: rec.world.items.n]
    pop[: len(pb)] = pb
    head = M.short_head_mask(pop)
    r, c = before.pairs(users)
    lens = np.bincount(r, minlength=len(users))
    share = np.bincount(r, weights=head[c].astype(float), minlength=len(users)) / np.maximum(lens, 1)
    share[lens == 0] = np.nan
    names = np.array(["niche", "diverse", "blockbuster", "new"])
    return names[M.user_popularity_groups(share)]  # -1 (no history yet) → "new"


# -------------------------------------------------------------------------------------------- strata
def size_stratum(sizes: np.ndarray) -> np.ndarray:
    """The set-size stratum label of each size."""
    out = np.empty(len(sizes), dtype=object)
    for name, lo, hi in SIZE_BINS:
        out[(sizes >= lo) & (sizes <= hi)] = name
    return out.astype(str)


def popularity_stratum(rec, labels: np.ndarray) -> np.ndarray:
    """head (top 20 % of items by popularity before the cycle, ties by lower id) | mid | tail (bottom 50 %)."""
    n = rec.world.items.n
    pop = np.zeros(n)
    pb = rec.popularity_before[:n]
    pop[: len(pb)] = pb
    rank = np.empty(n, np.int64)
    rank[np.argsort(-pop, kind="stable")] = np.arange(n)
    r = rank[labels]
    return np.where(r < 0.2 * n, "head", np.where(r >= 0.5 * n, "tail", "mid"))
