"""HyperBandit (E-HYPER; GROUNDING §5, from the official code): a time-aware hypernetwork maps time features
to the parameter matrix of a factor-UCB bandit.

* Time: cycle t is one day, weekday w = t mod 7, embedded "polar" as [sin(2πw/7 + 0.1π), cos(2πw/7 + 0.1π)]
  (the code's day-block terms are constant here: one cycle per day).
* h_ψ: an MLP (``hidden`` widths, ReLU; the code's nine 256–1024-wide layers are scaled down for CPU
  loops) from the time features to Θ(τ) ∈ R^{(d_o + d_l) × d_u}; time only, as the code's default.
* Scores: r̂_ui = [x_i^o ; v_i]ᵀ Θ(τ) u_u with x_i^o the item's observable attributes (d_o = world dim),
  u_u = [θ̂_u ; 1]: the user's ridge estimate over item attributes learned from its feedback (as
  LinUCB's; ``user_features: profile`` takes its content profile instead), with an intercept (d_u =
  d_o + 1; the code uses fixed PCA-25 user embeddings; the intercept lets a time-only Θ(τ) express a
  shift that every user shares), and v_i a latent item
  vector (d_l = ``latent``) learned online: p = Θ_L u, Φ_i ← γΦ_i + ppᵀ, b_i ← γb_i + p(r − (Θ_O u)ᵀx_i^o),
  Ψ_i = Φ_i + λI, v_i = Ψ_i⁻¹b_i; UCB = r̂ + α√(pᵀΨ_i⁻¹p), α = λ = 0.1, γ = 0.99. The bonus is exact and
  costs one product with d_l² columns ((p ⊗ p)·vec Ψ_i⁻¹).
* Refit of h_ψ on the retrain schedule, on the last ``window`` events with a click: ListNet over the shown
  slate (the code's pool; the clicked item labelled 3, the others 0), ŝ_j = x_jᵀΘ_O(τ)u, Adam, mini-batches
  of 100, at most ``epochs`` passes with early stopping at patience 1 on the most recent 20 % of the
  window (the code stops early too), weights kept across refits. Slates without a click carry no listwise signal
  and are skipped (the code labels a wrong pick −1; there is no pick without a click here).
* ``llm_warm_start: {interactions: N}`` (HyperBandit+'s LLM Start): before the first cycle, N synthetic
  interactions drawn from the run's LLM service (the registered ``llm_interactions`` service: the
  surrogate by default, the real model when the scenario's ``llm:`` block names it), logged with
  provenance ``llm_augmented`` and learned as events (a weekday drawn at random each: the LLM gives no
  time) before the real stream, as the code prepends its synthetic events.

torch is imported only when a hyperbandit is built; it runs on one thread inside the refit, so results do
not depend on the thread budget.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from recloop import registry
from recloop.contracts import PROVENANCE, Feedback, InteractionReport
from recloop.limits import MAX_DIM, MAX_ITERATIONS, MAX_SAMPLE
from recloop.registry import Params, register
from recloop.rng import component_rng

from .bandit_state import RidgeState
from .bandits import observations
from .base import Policy
from .hyper_net import HyperNet, polar_time

__all__ = ["HyperBandit"]


class WarmStart(Params):
    """HyperBandit+'s LLM Start: synthetic interactions drawn from the run's LLM before the first cycle."""

    interactions: int = Field(1000, ge=1, le=MAX_SAMPLE, description="synthetic interactions to draw")


@register("policy", "hyperbandit")
class HyperBandit(Policy):
    """E-HYPER: a time-aware hypernetwork gives the parameters of a factor-UCB bandit (HyperBandit+ with an
    LLM warm start)."""

    online = True
    example_params = {"hidden": [16], "epochs": 1}

    class Params(Params):
        alpha: float = Field(0.1, ge=0, description="α: width of the confidence bonus")
        lam: float = Field(0.1, gt=0, description="λ: Ψ_i = Φ_i + λI")
        decay: float = Field(0.99, gt=0, le=1, description="γ: decay of the item statistics")
        latent: int = Field(4, ge=0, le=MAX_DIM, description="d_l: latent item dimensions")
        hidden: list[int] = Field(default_factory=lambda: [64, 64], description="hidden widths of h_ψ")
        window: int = Field(2000, ge=1, le=MAX_SAMPLE, description="events (with a click) kept for the refit")
        epochs: int = Field(5, ge=0, le=MAX_ITERATIONS, description="passes over the window per refit")
        lr: float = Field(1e-3, gt=0, description="Adam learning rate")
        batch: int = Field(100, ge=1, le=MAX_SAMPLE, description="events per mini-batch")
        prior_weight: float = Field(1.0, ge=0, description="pseudo-count of the mean content profile")
        user_features: Literal["ridge", "profile"] = Field(
            "ridge", description="u: each user's ridge estimate over item attributes (learned from its "
                                 "feedback, as LinUCB's θ̂_u), or its content profile")
        user_lam: float = Field(1.0, gt=0, description="ridge prior of the user estimates")
        llm_warm_start: WarmStart | None = Field(None, description="draw LLM interactions before the first cycle")

    def __init__(self, params=None):
        super().__init__(params)
        self.net: HyperNet | None = None
        self.sums = np.zeros((0, 0), np.float32)
        self.counts = np.zeros(0, np.float32)
        self.phi = np.zeros((0, 0, 0))
        self.bvec = np.zeros((0, 0))
        self.events = _Events()
        self.refits = 0
        self.ridge: RidgeState | None = None

    # -- state ---------------------------------------------------------------------------------------
    def _ensure(self, view) -> None:
        d, dl = view.items.dim, self.params.latent
        if self.net is None:
            self.net = HyperNet(d, dl, d + 1, list(self.params.hidden), self.params.lr, self.context.seed)
        n_users = max(len(self.counts), view.users.capacity)
        if self.sums.shape != (n_users, d):
            self.sums, self.counts = _grow_profiles(self.sums, self.counts, n_users, d)
        if self.ridge is None:
            self.ridge = RidgeState(d, self.params.user_lam)
        self.ridge.grow(n_users)
        n_items = view.items.n
        if self.bvec.shape[1:] != (dl,):
            self.phi, self.bvec = np.zeros((0, dl, dl)), np.zeros((0, dl))
        if len(self.bvec) < n_items:
            extra = n_items - len(self.bvec)
            self.phi = np.concatenate([self.phi, np.zeros((extra, dl, dl))])
            self.bvec = np.concatenate([self.bvec, np.zeros((extra, dl))])

    def _profiles(self, users: np.ndarray) -> np.ndarray:
        w = np.float32(self.params.prior_weight)
        mean = self.sums.sum(0) / max(float(self.counts.sum()), 1.0)
        return ((self.sums[users] + w * mean) / (self.counts[users] + w)[:, None]).astype(np.float64)

    def _user_features(self, users: np.ndarray) -> np.ndarray:
        """u = [the user's ridge estimate (or content profile) ; 1]."""
        p = self.ridge.theta[users] if self.params.user_features == "ridge" else self._profiles(users)
        return np.concatenate([p, np.ones((len(p), 1))], axis=1)

    def _latent(self, n_items: int) -> tuple[np.ndarray, np.ndarray]:
        """(v_i, Ψ_i⁻¹) for the current catalog."""
        dl = self.params.latent
        psi_inv = np.linalg.inv(self.phi[:n_items] + self.params.lam * np.eye(dl)[None])
        return np.einsum("nde,ne->nd", psi_inv, self.bvec[:n_items]), psi_inv

    # -- data a stage adds ---------------------------------------------------------------------------
    def produce(self, view, *, step: int) -> list:
        ws = self.params.llm_warm_start
        if ws is None or step != 0:
            return []
        drawer = self.context.service("llm_interactions",
                                      lambda: registry.service_factory("llm_interactions")(self.context))
        users, items = drawer.draw(view, ws.interactions, step)
        return [InteractionReport(users, items, PROVENANCE["llm_augmented"], -1, initial=True,
                                  source="hyperbandit")]

    def stage_report(self):
        """The warm start's generation round, as the LLM service that drew it reports it."""
        drawer = self.context.services.get("llm_interactions") if self.params.llm_warm_start else None
        return drawer.stage_report() if drawer is not None else None

    # -- learning --------------------------------------------------------------------------------------
    def fit(self, data, view, *, step, rng, warm_start):
        self._ensure(view)
        if not warm_start or step == 0:
            self._learn_log(data, view, step)
        if len(self.events) and self.params.epochs:
            self.net.refit(self.events, np.asarray(view.items.attrs[: view.items.n], np.float32),
                           self.params.epochs, self.params.batch, component_rng(self.context.seed, "hyper", step))
            self.refits += 1

    def _learn_log(self, data, view, step: int) -> None:
        """Cold start: the log's interactions become content profiles; LLM-made ones also become events
        (HyperBandit+'s synthetic stream, with a random weekday each) on slates padded with random items."""
        users, items = np.asarray(data.users, np.int64), np.asarray(data.items, np.int64)
        synthetic = np.asarray(data.provenance) == PROVENANCE["llm_augmented"]
        if synthetic.any():
            rng = component_rng(self.context.seed, "hyper.warm", step)
            self._synthetic_events(users[synthetic], items[synthetic], view, rng)
        real = ~synthetic
        np.add.at(self.sums, users[real], np.asarray(view.items.attrs[items[real]], np.float32))
        self.counts += np.bincount(users[real], minlength=len(self.counts)).astype(np.float32)
        self.ridge.update(users[real], np.asarray(view.items.attrs[items[real]], np.float64),
                          np.ones(int(real.sum())))

    def _synthetic_events(self, users, items, view, rng) -> None:
        k, n = 5, view.items.n
        slates = rng.integers(0, n, size=(len(users), k))
        slates[:, 0] = items
        days = rng.integers(0, 7, size=len(users))
        for day in range(7):
            sel = days == day
            fb = Feedback(day, users[sel], slates[sel], np.zeros(sel.sum(), np.int64), items[sel],
                          np.zeros(sel.sum(), np.float32))
            self.update(fb, view)

    def update(self, feedback: Feedback, view) -> None:
        self._ensure(view)
        users, items, rewards = observations(feedback, "shown")
        if not len(users):
            return
        theta = self.net.theta(polar_time(feedback.step))
        d = view.items.dim
        u = self._user_features(users)
        p = u @ theta[d:].T  # Θ_L u
        resid = rewards - np.einsum("nd,nd->n", u @ theta[:d].T, np.asarray(view.items.attrs[items], np.float64))
        _decayed_update(self.phi, self.bvec, items, p, resid, self.params.decay)
        clicked = feedback.chosen_pos >= 0
        self.events.add(feedback.step, self._user_features(feedback.users[clicked]), feedback.slates[clicked],
                        feedback.chosen_pos[clicked], self.params.window)
        hit = rewards > 0
        np.add.at(self.sums, users[hit], np.asarray(view.items.attrs[items[hit]], np.float32))
        self.counts += np.bincount(users[hit], minlength=len(self.counts)).astype(np.float32)
        self.ridge.update(users, np.asarray(view.items.attrs[items], np.float64), rewards)

    # -- scoring ---------------------------------------------------------------------------------------
    def recommend(self, users, k, view, *, exclude=None, step=0, engine=None, on_chunk=None):
        self._ensure(view)
        n, d = view.items.n, view.items.dim
        theta = self.net.theta(polar_time(step))
        v, psi_inv = self._latent(n)
        items = np.concatenate([np.asarray(view.items.attrs[:n], np.float64), v], axis=1).astype(np.float32)
        quad = psi_inv.reshape(n, -1).astype(np.float32)  # vec Ψ_i⁻¹
        alpha = np.float32(self.params.alpha)

        def score(ids):
            u = self._user_features(np.asarray(ids, np.int64))
            w = (u @ theta.T).astype(np.float32)  # [Θ_O u ; Θ_L u]
            p = w[:, d:]
            s = w @ items.T
            if p.shape[1]:
                pp = (p[:, :, None] * p[:, None, :]).reshape(len(ids), -1)
                s += alpha * np.sqrt(np.maximum(pp @ quad.T, 0.0))
            return s

        return (engine or self.engine).topk(users, k, n, score, exclude=exclude, on_chunk=on_chunk)

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"net": None if self.net is None else self.net.state_dict(), "sums": self.sums,
                "counts": self.counts, "phi": self.phi, "bvec": self.bvec, "events": self.events.state_dict(),
                "ridge": None if self.ridge is None else self.ridge.state_dict(),
                "refits": self.refits}

    def load_state_dict(self, state: dict) -> None:
        p = self.params
        if state["net"] is not None:
            d = np.asarray(state["sums"]).shape[1]
            self.net = HyperNet(d, p.latent, d + 1, list(p.hidden), p.lr, self.context.seed)
            self.net.load_state_dict(state["net"])
        self.sums, self.counts = np.array(state["sums"]), np.array(state["counts"])
        self.phi, self.bvec = np.array(state["phi"]), np.array(state["bvec"])
        self.events = _Events.from_state_dict(state["events"])
        self.ridge = None if state["ridge"] is None else RidgeState.from_state_dict(state["ridge"])
        self.refits = int(state["refits"])


def _grow_profiles(sums, counts, n: int, d: int):
    out_s, out_c = np.zeros((n, d), np.float32), np.zeros(n, np.float32)
    have = len(counts)
    if have:
        out_s[:have], out_c[:have] = sums, counts
    return out_s, out_c


def _decayed_update(phi, bvec, items, p, resid, gamma: float) -> None:
    """Φ_i ← γΦ_i + ppᵀ, b_i ← γb_i + p·resid, one event at a time per item in (item, order) order,
    batched: an item with m events this cycle gets γ^m on its old statistics and γ^(m-1-j) on event j."""
    order = np.argsort(items, kind="stable")
    items, p, resid = items[order], p[order], resid[order]
    uniq, start, count = np.unique(items, return_index=True, return_counts=True)
    rank = np.arange(len(items)) - np.repeat(start, count)
    weight = gamma ** (np.repeat(count, count) - 1 - rank)
    phi[uniq] *= (gamma ** count)[:, None, None]
    bvec[uniq] *= (gamma ** count)[:, None]
    np.add.at(phi, items, weight[:, None, None] * p[:, :, None] * p[:, None, :])
    np.add.at(bvec, items, (weight * resid)[:, None] * p)


def _cat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.concatenate([a, b]) if len(a) else np.asarray(b)


class _Events:
    """The last ``window`` clicked events (day, user profile, shown slate, clicked position), for the refit."""

    def __init__(self):
        self.day = np.zeros(0, np.int64)
        self.profile = np.zeros((0, 0), np.float64)
        self.slate = np.zeros((0, 0), np.int64)
        self.pos = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.day)

    def add(self, day, profiles, slates, pos, window: int) -> None:
        if not len(pos):
            return
        if len(self.day) and self.slate.shape[1] != slates.shape[1]:
            self.__init__()  # the slate size changed: start a new window
        self.day = _cat(self.day, np.full(len(pos), day, np.int64))[-window:]
        self.profile = _cat(self.profile, profiles)[-window:]
        self.slate = _cat(self.slate, slates.astype(np.int64))[-window:]
        self.pos = _cat(self.pos, pos.astype(np.int64))[-window:]

    def state_dict(self) -> dict:
        return {"day": self.day, "profile": self.profile, "slate": self.slate, "pos": self.pos}

    @classmethod
    def from_state_dict(cls, state: dict) -> _Events:
        e = cls()
        e.day, e.profile = np.array(state["day"]), np.array(state["profile"])
        e.slate, e.pos = np.array(state["slate"]), np.array(state["pos"])
        return e
