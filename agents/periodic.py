"""Periodic (weekly) user tastes, U-TIMEVAR: θ_u(t) = θ_u + B·c(t), one cycle = one day.

Registered as the user dynamic ``periodic``. The offset B·c(t) is the same for every user (B is shared,
not per user as in the reference's B_u), so a *time-only* model (E-HYPER's hypernetwork fed the polar
weekday embedding) can express the variation exactly; it comes back to the same value every 7 cycles.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from recloop.agents.dynamics import Dynamics
from recloop.registry import Params, register

#: days in the period (weekday w = t mod 7)
PERIOD = 7
#: phase of the HyperBandit+ "polar" weekday embedding (GROUNDING §E-HYPER)
POLAR_PHASE = 0.1 * np.pi


def weekday_code(cycles: np.ndarray, harmonics: int) -> np.ndarray:
    """c(t) = [sin(2πjw/7 + 0.1π), cos(2πjw/7 + 0.1π)] for j = 1..H, w = t mod 7 → (len(t), 2H) float64.

    For H = 1 this is HyperBandit+'s polar weekday embedding. A per-harmonic phase would add nothing:
    shifting the phase rotates each (sin, cos) pair, which the seeded matrix B absorbs. Every harmonic
    j ≤ 3 sums to zero over a week, so the mean offset over the week is 0."""
    w = (np.asarray(cycles, np.int64) % PERIOD).astype(np.float64).reshape(-1, 1)
    j = np.arange(1, harmonics + 1, dtype=np.float64).reshape(1, -1)
    angle = 2.0 * np.pi * j * w / PERIOD + POLAR_PHASE
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)


def low_rank_matrix(rng: np.random.Generator, dim: int, code_dim: int, rank: int) -> np.ndarray:
    """B = P·Qᵀ with P (d x r), Q (code_dim x r) standard normal: a seeded (d x code_dim) matrix of rank
    r (r capped at min(d, code_dim))."""
    r = max(1, min(rank, dim, code_dim))
    return rng.standard_normal((dim, r)) @ rng.standard_normal((code_dim, r)).T


@register("dynamics", "periodic")
class Periodic(Dynamics):
    """U-TIMEVAR (weekly tastes): θ_u(t) = θ_u + B·c(t mod 7), B shared by all users, one cycle = one day.

    * c(w) is the polar weekday code of :func:`weekday_code` (``harmonics`` pairs of sin/cos).
    * B (d x 2H) = P·Qᵀ of rank ``rank``, drawn from the run seed (``label`` names the stream), scaled so
      that the weekly RMS of ‖B·c(w)‖ is ``amplitude`` times the users' mean ‖θ_u‖ at bind.
    * θ_u := the generated preferences − B·c(0): binding changes nothing and cycle 0 sees the world as
      generated; ``update`` after cycle t sets prefs = θ_u + B·c(t+1) (stored offsets B·(c(w) − c(0))),
      so with no other dynamic the tastes return bit for bit to their start every 7 cycles.
    * Composition: the dynamic keeps each user's θ_u and the offset it applied last. A row that another
      dynamic moved since (``drift``'s rotation) is taken as moved in its base (θ_u ← prefs − last offset),
      so drift accumulates in θ_u while the weekly offset is replaced, never added twice. Satiation and
      familiarity act on perceived utility only and compose untouched. Order in ``users.dynamics`` only
      decides whether drift sees a cycle's new offset before or after it rotates.
    * New users (population ``dynamic``) join without an offset: their drawn preferences are their θ_u and
      they follow the week from the next update, so their first cycle shows their base tastes.

    Offsets can leave the simplex of a ``chaney`` world (utilities may go negative).
    """

    class Params(Params):
        amplitude: float = Field(0.3, ge=0.0, le=10.0,
                                 description="weekly RMS of ‖B·c(t)‖ as a fraction of the mean ‖θ_u‖")
        rank: int = Field(2, ge=1, le=64, description="rank r of B (capped at min(dim, 2·harmonics))")
        harmonics: int = Field(1, ge=1, le=3, description="weekly harmonics H in c(t) (code_dim = 2H)")
        label: str = Field("periodic", min_length=1, max_length=100,
                           description="seed label: dynamics with different labels draw independent B")

    def init(self, world) -> None:
        n, d = world.users.n, world.users.dim
        H = self.params.harmonics
        rng = self.context.rng(f"dynamics.periodic.{self.params.label}")
        B = low_rank_matrix(rng, d, 2 * H, self.params.rank)
        code = weekday_code(np.arange(PERIOD), H)
        rms = float(np.sqrt(np.mean(np.sum((code @ B.T) ** 2, axis=1))))
        norms = np.linalg.norm(np.asarray(world.users.prefs[:n], np.float64), axis=1)
        target = self.params.amplitude * (float(norms.mean()) if n else 0.0)
        self.B = B * (target / rms) if rms > 0 else B * 0.0
        self.offsets = ((code - code[0]) @ self.B.T).astype(np.float32)  # row 0 is exactly 0
        self.base = np.zeros((0, d), np.float32)
        self.day = 0

    def offset(self, step: int) -> np.ndarray:
        """The offset B·(c(t) − c(0)) applied to every user at cycle ``step`` (d,) float32."""
        return self.offsets[int(step) % PERIOD]

    def update(self, users, chosen, world, step):
        self._sync(world, (int(step) + 1) % PERIOD)

    def _sync(self, world, day: int) -> None:
        """Fold other dynamics' moves into θ_u, add new users, then set prefs = θ_u + offset(day)."""
        prefs, n = world.users.prefs, world.users.n
        last, new = self.offsets[self.day], self.offsets[day]
        n_s = min(len(self.base), n)
        if n_s:
            live = prefs[:n_s]
            moved = np.flatnonzero(np.any(live != self.base[:n_s] + last, axis=1))
            if len(moved):
                self.base[moved] = live[moved] - last
        if n > len(self.base):
            self.base = np.concatenate([self.base, np.array(prefs[len(self.base):n], np.float32)])
        prefs[:n] = self.base[:n] + new
        self.day = int(day)

    def state_dict(self) -> dict:
        return {"B": self.B.copy(), "offsets": self.offsets.copy(), "base": self.base.copy(), "day": int(self.day)}

    def load_state_dict(self, state: dict) -> None:
        self.B = np.array(state["B"], np.float64)
        self.offsets = np.array(state["offsets"], np.float32)
        self.base = np.array(state["base"], np.float32).reshape(-1, self.offsets.shape[1])
        self.day = int(state["day"])
