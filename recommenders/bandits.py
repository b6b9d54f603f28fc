"""Contextual linear bandits as platform policies: LinUCB (E-LINUCB), linear Thompson sampling (E-LINTS)
and ε-greedy (E-EPS), over the observable item features (the catalog's attributes).

Two modes:

* ``per_user`` — a ridge model θ_u per user over x_i (exact; A⁻¹ is d × d per user, so for worlds up to
  M: 10,000 users × d = 32 take 80 MB);
* ``shared`` — one θ over x_ui = [x_i ; p_u ∘ x_i], joining the user's content profile p_u (the running
  mean of the attributes of what it consumed, as in ``content``) with the item features, so one 2d × 2d
  model serves any number of users (large worlds).

Feedback (every cycle, batched; :mod:`.bandit_state`): the chosen item is reward 1, the other shown
items 0; with ``feedback: cascade`` only the positions up to the click (all of them when nothing was
clicked) count as examined. ``fit`` on a cold start learns the log's interactions as rewards of 1; warm
refits keep the online state. Slates are the top-k of the acquisition score through the engine: LinUCB
with exact pruning of its confidence bonus (:mod:`.bandit_ucb`), LinTS and ε-greedy on the BLAS path.
Exploration noise is counter-based (seed, step, user, ...), so slates do not depend on the chunking.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from recloop.contracts import Feedback, TrainingData
from recloop.limits import MAX_DIM
from recloop.registry import Params, register
from recloop.rng import derive_key, hash_u64, hash_uniform
from recloop.sim import kernels
from recloop.sim.backends import exclusion_csr

from .bandit_state import RidgeState
from .bandit_ucb import quadratic_features, ucb_tile
from .base import Policy

__all__ = ["EpsilonGreedy", "LinTS", "LinUCB"]

BLOCK = 65_536  #: observations per block of the shared model's update


class _LinearBandit(Policy):
    """Shared plumbing: the ridge state, the content profiles of ``shared`` mode, feedback, checkpoints."""

    online = True

    class Params(Params):
        mode: Literal["per_user", "shared"] = Field("per_user", description="a model per user, or one shared")
        lam: float = Field(1.0, gt=0, description="λ: ridge prior A = λI")
        feedback: Literal["shown", "cascade"] = Field(
            "shown", description="shown: every shown item is observed; cascade: only positions up to the click")
        prior_weight: float = Field(1.0, ge=0, le=MAX_DIM, description="shared: pseudo-count of the mean profile")

    def __init__(self, params=None):
        super().__init__(params)
        self.state: RidgeState | None = None
        self.sums = np.zeros((0, 0), np.float32)  # shared mode: content profile sums and counts
        self.counts = np.zeros(0, np.float32)

    # -- shapes ----------------------------------------------------------------------------------
    @property
    def shared(self) -> bool:
        return self.params.mode == "shared"

    def _ensure(self, view) -> None:
        d = view.items.dim
        if self.state is None:
            self.state = RidgeState(2 * d if self.shared else d, self.params.lam)
        if not self.shared:
            self.state.grow(view.users.capacity)
            return
        self.state.grow(1)
        n = max(len(self.counts), view.users.capacity)
        if self.sums.shape != (n, d):
            sums, counts = np.zeros((n, d), np.float32), np.zeros(n, np.float32)
            have = len(self.counts)
            if have:
                sums[:have], counts[:have] = self.sums, self.counts
            self.sums, self.counts = sums, counts

    def _profiles(self, users: np.ndarray) -> np.ndarray:
        """Shared mode's p_u: the smoothed mean attributes of what each user consumed."""
        w = np.float32(self.params.prior_weight)
        mean = self.sums.sum(0) / max(float(self.counts.sum()), 1.0)
        return ((self.sums[users] + w * mean) / (self.counts[users] + w)[:, None]).astype(np.float64)

    def _features(self, users: np.ndarray, items: np.ndarray, view) -> np.ndarray:
        """x for (user, item) pairs: the item's attributes, joined with the profile in shared mode."""
        if not self.shared:
            return np.asarray(view.items.attrs[items], np.float64)
        d = view.items.dim  # shared: float32 blocks (its XᵀX is a float32 product)
        out = np.empty((len(items), 2 * d), np.float32)
        out[:, :d] = view.items.attrs[items]
        np.multiply(self._profiles(users), out[:, :d], out=out[:, d:], casting="unsafe")
        return out

    # -- learning ----------------------------------------------------------------------------------
    def fit(self, data: TrainingData, view, *, step, rng, warm_start):
        self._ensure(view)
        if warm_start and int(self.state.n_obs.sum()) > 0:
            return  # online updates keep the model current
        self.state = None
        self._ensure(view)
        if self.shared:
            self.sums[:] = 0
            self.counts[:] = 0
        users, items = np.asarray(data.users, np.int64), np.asarray(data.items, np.int64)
        self._observe(users, items, np.ones(len(users)), view)

    def update(self, feedback: Feedback, view) -> None:
        self._ensure(view)
        users, items, rewards = observations(feedback, self.params.feedback)
        self._observe(users, items, rewards, view)

    def _observe(self, users, items, rewards, view) -> None:
        if not len(users):
            return
        if self.shared:  # one model: A and b accumulate block by block (memory bounded by the block)
            for lo in range(0, len(users), BLOCK):
                sl = slice(lo, lo + BLOCK)
                self.state.accumulate(0, self._features(users[sl], items[sl], view), rewards[sl])
            self.state.solve(0)
        else:
            self.state.update(users, self._features(users, items, view), rewards)
        if self.shared:  # profiles move after the observation that used them
            hit = rewards > 0
            np.add.at(self.sums, users[hit], np.asarray(view.items.attrs[items[hit]], np.float32))
            self.counts += np.bincount(users[hit], minlength=len(self.counts)).astype(np.float32)

    # -- scoring helpers ---------------------------------------------------------------------------
    def _means(self, users: np.ndarray) -> np.ndarray:
        """w_u with m_ui = w_uᵀ x_i: θ̂_u, or θ_a + θ_b ∘ p_u in shared mode (float32)."""
        st = self.state
        if not self.shared:
            return st.theta[users].astype(np.float32)
        d = st.dim // 2
        th = st.theta[0]
        return (th[:d][None, :] + th[d:][None, :] * self._profiles(users)).astype(np.float32)

    def _bonus_matrices(self, users: np.ndarray) -> np.ndarray:
        """S_u with bonus² = x_iᵀ S_u x_i: A_u⁻¹, or M_uᵀ A⁻¹ M_u with M_u = [I; diag(p_u)] (shared)."""
        st = self.state
        if not self.shared:
            return st.a_inv[users]
        d = st.dim // 2
        a = st.a_inv[0]
        P, Q, R = a[:d, :d], a[:d, d:], a[d:, d:]
        p = self._profiles(users)
        return (P[None] + p[:, None, :] * Q[None] + (Q.T[None] * p[:, :, None]).swapaxes(1, 2)
                + p[:, :, None] * R[None] * p[:, None, :])

    def greedy_factors(self, view):
        """The mean-only ranking's factors (what a greedy policy would show), for the metrics."""
        self._ensure(view)
        users = np.arange(view.users.n)
        return self._means(users), np.asarray(view.items.attrs[: view.items.n], np.float32), None

    def factors(self, view):
        return None

    def state_dict(self) -> dict:
        return {"state": None if self.state is None else self.state.state_dict(), "sums": self.sums,
                "counts": self.counts}

    def load_state_dict(self, state: dict) -> None:
        s = state["state"]
        self.state = None if s is None else RidgeState.from_state_dict(s)
        self.sums, self.counts = np.array(state["sums"]), np.array(state["counts"])


def observations(fb: Feedback, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, rewards) observed in a cycle: the chosen item 1, other shown items 0; ``cascade``
    keeps only the positions up to the click (every position when nothing was clicked)."""
    slates = np.asarray(fb.slates)
    n, k = slates.shape
    pos = np.asarray(fb.chosen_pos)
    seen = slates >= 0
    if mode == "cascade":
        last = np.where(pos >= 0, pos, k - 1)
        seen &= np.arange(k)[None, :] <= last[:, None]
    rows, cols = np.nonzero(seen)
    rewards = (cols == pos[rows]).astype(np.float64)
    return np.asarray(fb.users, np.int64)[rows], slates[rows, cols].astype(np.int64), rewards


@register("policy", "linucb")
class LinUCB(_LinearBandit):
    """E-LINUCB: p = θ̂ᵀx + α√(xᵀA⁻¹x); slate = top-k by p over the whole catalog (exact, with pruning)."""

    class Params(_LinearBandit.Params):
        alpha: float = Field(1.0, ge=0, description="α: width of the confidence bonus")
        directions: int = Field(2, ge=0, le=MAX_DIM, description="eigen-directions in the pruning bound "
                                                                 "(more: tighter bound, costlier)")

    def recommend(self, users, k, view, *, exclude=None, step=0, engine=None, on_chunk=None):
        self._ensure(view)
        engine = engine or self.engine
        n = view.items.n
        X = np.asarray(view.items.attrs[:n], np.float32)
        X64 = X.astype(np.float64)
        norms2 = np.einsum("id,id->i", X64, X64)
        alpha, dirs = float(self.params.alpha), int(self.params.directions)
        seen = {"rows": 0, "full": 0}  # this call's tiles so far, in user order (so chunking cannot matter)
        phi = quadratic_features(X64)

        def score(ids):
            ids = np.asarray(ids, np.int64)
            mean = self._means(ids) @ X.T
            prune = seen["rows"] < 2 * len(ids) or seen["full"] < 0.75 * seen["rows"]
            out, full = ucb_tile(mean, self._bonus_matrices(ids), X64, norms2, alpha, k,
                                 exclusion_csr(exclude, ids), dirs, prune, phi)
            seen["rows"] += len(ids)
            seen["full"] += full
            return out

        return engine.topk(users, k, n, score, exclude=exclude, on_chunk=on_chunk)


def _normals(key: np.uint64, users: np.ndarray, dim: int) -> np.ndarray:
    """Standard normals indexed by (key, user, dimension): Box–Muller on counter-based uniforms
    (a Numba kernel; NumPy where Numba is missing)."""
    users = np.asarray(users, np.int64)
    if kernels.HAVE_NUMBA:
        out = np.empty((len(users), dim))
        kernels.hash_normals(np.uint64(key), users, dim, out)
        return out
    j = np.arange(dim)[None, :]
    u1 = hash_uniform(key, users[:, None], 2 * j)
    u2 = hash_uniform(key, users[:, None], 2 * j + 1)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


@register("policy", "lints")
class LinTS(_LinearBandit):
    """E-LINTS: θ̃_u ~ N(θ̂, v²A⁻¹) drawn per user and cycle; slate = top-k by θ̃ᵀx (the BLAS path)."""

    class Params(_LinearBandit.Params):
        v: float = Field(0.5, ge=0, description="v: scale of the posterior draw")

    def _sampled(self, users: np.ndarray, step: int) -> np.ndarray:
        st = self.state
        z = _normals(derive_key(self.context.seed, "lints", step), users, st.dim)
        if self.shared:
            L = np.linalg.cholesky(st.a_inv[0])
            theta = st.theta[0][None, :] + self.params.v * z @ L.T
            d = st.dim // 2
            return theta[:, :d] + theta[:, d:] * self._profiles(users)
        L = np.linalg.cholesky(st.a_inv[users])
        return st.theta[users] + self.params.v * np.einsum("nde,ne->nd", L, z)

    def recommend(self, users, k, view, *, exclude=None, step=0, engine=None, on_chunk=None):
        self._ensure(view)
        users = np.asarray(users, np.int64)
        U = np.zeros((view.users.capacity, view.items.dim), np.float32)
        U[users] = self._sampled(users, step)
        X = np.asarray(view.items.attrs[: view.items.n], np.float32)
        return (engine or self.engine).topk_factors(users, k, U, X, None, exclude=exclude, on_chunk=on_chunk)


@register("policy", "egreedy")
class EpsilonGreedy(_LinearBandit):
    """E-EPS: the greedy slate by θ̂ᵀx; each slot explores with probability ε: a uniformly drawn item (not
    excluded, not shown in another slot) takes it, so one slot keeps its greedy item with probability
    1 − ε + ε/n_items (0.91 for ε = 0.1 and 10 items)."""

    class Params(_LinearBandit.Params):
        epsilon: float = Field(0.1, ge=0, le=1, description="ε: probability that a slot explores")

    def recommend(self, users, k, view, *, exclude=None, step=0, engine=None, on_chunk=None):
        self._ensure(view)
        users = np.asarray(users, np.int64)
        U = np.zeros((view.users.capacity, view.items.dim), np.float32)
        U[users] = self._means(users)
        X = np.asarray(view.items.attrs[: view.items.n], np.float32)
        seed, eps, n_items = self.context.seed, float(self.params.epsilon), view.items.n

        def explore(sl, items, scores):  # the policy's own stage: edits the chunk's slates in place
            explore_slots(items, users[sl], eps, n_items, derive_key(seed, "egreedy", step), exclude)
            if on_chunk is not None:
                on_chunk(sl, items, scores)

        return (engine or self.engine).topk_factors(users, k, U, X, None, exclude=exclude, on_chunk=explore)


def explore_slots(items: np.ndarray, users: np.ndarray, eps: float, n_items: int, key: np.uint64, exclude,
                  tries: int = 8) -> None:
    """Each slot of ``items`` (n, k) explores with probability ``eps``: a uniform random item takes it
    unless it is excluded or shown in another slot (then it is drawn again, ``tries`` times; the greedy
    item stays if all fail). Drawing the slot's own item keeps it. Slots are taken left to right."""
    n, k = items.shape
    flip = hash_uniform(key, users[:, None], np.arange(k)[None, :]) < eps
    for col in range(k):
        rows = np.flatnonzero(flip[:, col] & (items[:, col] >= 0))
        for t in range(tries):
            if not len(rows):
                break
            cand = (hash_u64(key, users[rows], 1 + col * tries + t) % np.uint64(n_items)).astype(np.int64)
            others = np.delete(items[rows], col, axis=1)
            ok = ~(others == cand[:, None]).any(axis=1)
            if exclude is not None:
                ok &= ~np.asarray(exclude.contains(users[rows], cand), bool)
            items[rows[ok], col] = cand[ok]
            rows = rows[~ok]
