"""Choice models (reference §D): which slate item, if any, each user picks. Vectorised over users.

Noise is counter-based (:func:`recloop.rng.hash_uniform` on (step key, user, position)), so a
user's draw is the same whatever the chunking, the worker count or the policy being compared
(common random numbers).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field
from scipy.special import ndtri

from recloop.component import Component
from recloop.registry import Params, register
from recloop.rng import hash_gumbel, hash_uniform


class ChoiceModel(Component):
    """Base: ``choose(util, valid, users, key) -> positions`` (n,), -1 meaning no click.

    A model may instead define ``choose_many(util, valid, users, key, step) -> (n, k) bool`` to accept
    several slate items in one cycle (e.g. the EchoTrace replay protocol); the simulator then logs every
    accepted item and reports the first as the user's choice.
    """

    class Params(Params):
        pass

    uses_ground_truth = True  # users act on their true preferences

    def choose(self, util: np.ndarray, valid: np.ndarray, users: np.ndarray, key: np.uint64) -> np.ndarray:
        raise NotImplementedError

    def probabilities(self, util: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
        """Choice probabilities (n, k+1), last column = no click, when the model has a closed form."""
        return None


def position_log_weights(k: int, eta: float) -> np.ndarray:
    """log θ_j with θ_j = (1/j)^η (Joachims et al. 2017), j = 1..k."""
    return (-eta * np.log(np.arange(1, k + 1, dtype=np.float64))).astype(np.float32)


@register("choice", "mnl")
class MultinomialLogit(ChoiceModel):
    """U-MNL: logit choice among the slate and a no-click option, with position bias θ_j=(1/j)^η."""

    class Params(Params):
        temperature: float = Field(0.05, gt=0, description="τ: lower = users follow utility more strictly")
        no_click_utility: float | None = Field(
            0.0, description="v_0 of the no-click option; null disables no-click (a user always picks)"
        )
        position_bias: float = Field(0.0, ge=0, description="η in θ_j=(1/j)^η; 0 = no position bias")

    def _logits(self, util, valid):
        p = self.params
        k = util.shape[1]
        z = util / p.temperature + position_log_weights(k, p.position_bias)
        return np.where(valid, z, -np.inf).astype(np.float32)

    def choose(self, util, valid, users, key):
        n, k = util.shape
        z = self._logits(util, valid)
        g = hash_gumbel(key, users[:, None], np.arange(k + 1)[None, :])
        z = z + g[:, :k]
        best = np.argmax(z, axis=1)
        if self.params.no_click_utility is not None:
            z0 = self.params.no_click_utility / self.params.temperature + g[:, k]
            best = np.where(z0 > z[np.arange(n), best], -1, best)
        best = np.where(valid.any(axis=1), best, -1)
        return best.astype(np.int64)

    def probabilities(self, util, valid):
        z = self._logits(util, valid).astype(np.float64)
        v0 = self.params.no_click_utility
        z0 = np.full((z.shape[0], 1), -np.inf if v0 is None else v0 / self.params.temperature)
        full = np.concatenate([z, z0], axis=1)
        full -= full.max(axis=1, keepdims=True)
        e = np.exp(full)
        return e / e.sum(axis=1, keepdims=True)


@register("choice", "cascade")
class Cascade(ChoiceModel):
    """U-CASCADE: scan top-down, click position j with prob r_j Π_{i<j}(1−r_i), then stop.

    r_j = attention · clip(scale · util_j, 0, 1) (a shifted-identity RecSim ``f``; our choice).
    """

    class Params(Params):
        attention: float = Field(1.0, ge=0, le=1, description="probability of examining a position")
        scale: float = Field(1.0, gt=0, description="click probability per unit of utility")

    def click_probs(self, util, valid):
        r = self.params.attention * np.clip(self.params.scale * util, 0.0, 1.0)
        return np.where(valid, r, 0.0)

    def choose(self, util, valid, users, key):
        k = util.shape[1]
        r = self.click_probs(util, valid)
        u = hash_uniform(key, users[:, None], np.arange(k)[None, :])
        clicks = u < r
        first = np.argmax(clicks, axis=1)
        return np.where(clicks.any(axis=1), first, -1).astype(np.int64)

    def probabilities(self, util, valid):
        r = self.click_probs(util, valid).astype(np.float64)
        survive = np.cumprod(np.concatenate([np.ones((r.shape[0], 1)), 1 - r], axis=1), axis=1)
        p = r * survive[:, :-1]
        return np.concatenate([p, survive[:, -1:]], axis=1)


@register("choice", "chaney")
class ChaneyChoice(ChoiceModel):
    """U-CHANEY: pick argmax_j pos(j)^{-0.8}·Ṽ_uj with known utility Ṽ = ν·V, ν ~ Beta(mean 0.98, sd σ).

    Users always pick (no no-click option); the realised utility is the true V.
    """

    class Params(Params):
        attention_exp: float = Field(-0.8, description="exponent on the position")
        known_mean: float = Field(0.98, gt=0, lt=1, description="mean of the known fraction ν")
        known_sd: float = Field(1e-5, ge=0, description="sd of ν (normal approximation of the Beta)")

    def choose(self, util, valid, users, key):
        k = util.shape[1]
        p = self.params
        u = hash_uniform(key, users[:, None], np.arange(k)[None, :])
        nu = np.clip(p.known_mean + p.known_sd * ndtri(u), 0.0, 1.0)
        w = np.arange(1, k + 1, dtype=np.float64) ** p.attention_exp
        score = np.where(valid, w * nu * util, -np.inf)
        best = np.argmax(score, axis=1)
        return np.where(valid.any(axis=1), best, -1).astype(np.int64)
