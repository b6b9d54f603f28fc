"""Classic reference policies (reference §E): random, popularity, ideal (oracle), content filtering."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from recloop.recommenders.base import Feedback, Policy, TrainingData
from recloop.registry import Params, register
from recloop.rng import derive_key, hash_uniform
from recloop.sim.backends import exclusion_csr


@register("policy", "random")
class RandomPolicy(Policy):
    """E-RAND: uniform random slates of unconsumed items; counter-based, so chunking-invariant."""

    def score(self, users, world, step=0):
        key = derive_key(self.context.seed, "policy.random", step)
        return hash_uniform(key, users[:, None], np.arange(world.items.n)[None, :], dtype=np.float32)


@register("policy", "popularity")
class PopularityPolicy(Policy):
    """E-POP: rank by φ(i), the number of distinct users who interacted with i in the training data;
    ties break by lower item id."""

    def __init__(self, params=None):
        super().__init__(params)
        self.pop = np.zeros(0, np.float32)

    def fit(self, data: TrainingData, world, *, step, rng, warm_start):
        self.pop = data.popularity().astype(np.float32)

    def factors(self, world):
        n = world.items.n
        pop = np.zeros(n, np.float32)
        pop[: min(n, len(self.pop))] = self.pop[:n]
        users = np.zeros((world.users.capacity, 1), np.float32)
        return users, np.zeros((n, 1), np.float32), pop


@register("policy", "ideal")
class IdealPolicy(Policy):
    """The oracle: ranks by true utility V_ui = <x_u, a_i> (the reference every study needs).

    Ties break by a hash of (seed, step, user, item), never by item id: in worlds with exactly one-hot
    item attributes (Chaney's at d = 10) many items tie, and lowest-id tie-breaking would hand users who
    share a top attribute identical slates, inflating ideal's homogenization. Rows whose top k + 1 scores
    hold a tie are re-ranked from a per-user product (so the result does not depend on chunking)."""

    uses_ground_truth = True

    def factors(self, view):
        truth = view.truth  # granted: uses_ground_truth
        return truth.users.prefs, truth.items.attrs[: truth.items.n], None

    def recommend(self, users, k, view, *, exclude=None, step=0, engine=None, on_chunk=None):
        engine = engine or self.engine
        users = np.asarray(users, np.int64)
        U, V, _ = self.factors(view)
        out_i = np.full((len(users), k), -1, np.int64)
        out_s = np.full((len(users), k), -np.inf, np.float32)
        key = derive_key(self.context.seed if self.context is not None else 0, "policy.ideal.ties", step)

        def stage(sl, cand, scores):
            items, sc = cand[:, :k].copy(), scores[:, :k].copy()
            finite = np.isfinite(scores)
            tied = ((scores[:, 1:] == scores[:, :-1]) & finite[:, 1:]).any(axis=1)
            for r in np.flatnonzero(tied):
                items[r], sc[r] = _hashed_ties(users[sl][r], U, V, k, exclude, key)
            out_i[sl], out_s[sl] = items, sc
            if on_chunk is not None:
                on_chunk(sl, out_i[sl], out_s[sl])

        engine.topk_factors(users, k + 1, U, V, exclude=exclude, on_chunk=stage)
        return out_i, out_s


def _hashed_ties(user: int, U, V, k: int, exclude, key) -> tuple[np.ndarray, np.ndarray]:
    """One user's top-k by (true utility, then hash(key, user, item)), from a product of its own."""
    s = (V @ U[user]).astype(np.float32)
    ex = exclusion_csr(exclude, np.array([user]))
    if ex is not None and len(ex[1]):
        s[ex[1][ex[0][0]:ex[0][1]]] = -np.inf
    top = min(k, int(np.isfinite(s).sum()))
    items = np.full(k, -1, np.int64)
    vals = np.full(k, -np.inf, np.float32)
    if top == 0:
        return items, vals
    kth = np.partition(s, len(s) - top)[len(s) - top]
    cand = np.flatnonzero(s >= kth)
    tie = hash_uniform(key, np.full(len(cand), user), cand, dtype=np.float32)
    order = np.lexsort((cand, tie, -s[cand]))[:top]
    items[:top], vals[:top] = cand[order], s[cand[order]]
    return items, vals


@register("policy", "content")
class ContentFiltering(Policy):
    """Content-based filtering (the T-RECS ContentFiltering analogue): a user's estimated profile is
    the running mean of the attributes of the items it consumed; score = <profile, a_i>.

    Online: profiles update every cycle in O(n_users · d); ``fit`` rebuilds them from the log.
    """

    online = True

    class Params(Params):
        prior_weight: float = Field(1.0, ge=0, description="pseudo-count of the population mean profile")

    def __init__(self, params=None):
        super().__init__(params)
        self.sums = None
        self.counts = None

    def _ensure(self, world):
        n, d = world.users.capacity, world.items.dim
        if self.sums is None:
            self.sums = np.zeros((n, d), np.float32)
            self.counts = np.zeros(n, np.float32)
        elif self.sums.shape[0] < n:
            pad = n - self.sums.shape[0]
            self.sums = np.concatenate([self.sums, np.zeros((pad, d), np.float32)])
            self.counts = np.concatenate([self.counts, np.zeros(pad, np.float32)])

    def fit(self, data, world, *, step, rng, warm_start):
        self._ensure(world)
        if warm_start and self.counts.sum() > 0:
            return  # online updates already keep the profiles current
        self.sums[:] = 0
        self.counts[:] = 0
        np.add.at(self.sums, data.users, world.items.attrs[data.items])
        self.counts += np.bincount(data.users, minlength=len(self.counts)).astype(np.float32)

    def update(self, feedback: Feedback, world):
        self._ensure(world)
        hit = feedback.chosen_item >= 0
        u = feedback.users[hit]
        self.sums[u] += world.items.attrs[feedback.chosen_item[hit]]  # a user picks at most once per cycle
        self.counts[u] += 1

    def factors(self, world):
        self._ensure(world)
        mean = (self.sums.sum(0) / max(self.counts.sum(), 1.0)).astype(np.float32)
        w = np.float32(self.params.prior_weight)
        prof = self.sums + w * mean  # one users x d temporary, updated in place
        prof /= (self.counts + w)[:, None]
        return prof, world.items.attrs[: world.items.n], None
