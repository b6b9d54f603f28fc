"""User state dynamics (reference §D): drift, satiation and familiarity, vectorised over users.

Each dynamic may ``adjust`` the utility users perceive on a slate (satiation lowers it, familiarity
raises it) and ``update`` its state after choices. State lives in arrays (users x topics or users x
creators) and is checkpointed through ``state_dict``.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from recloop.component import Component
from recloop.registry import Params, register
from recloop.sim.kernels import slerp_rows


class Dynamics(Component):
    """Base: ``adjust`` perceived utility on a slate, ``update`` state after choices. Bound with the
    simulator's view (ground truth granted): ``init`` allocates state for the bound world's users."""

    class Params(Params):
        pass

    uses_ground_truth = True

    def on_bind(self, context) -> None:
        if context.view is not None:
            self.init(context.view.truth)

    def init(self, world) -> None:
        """Allocate state for the world's users."""

    def adjust(self, users: np.ndarray, slates: np.ndarray, util: np.ndarray, world) -> np.ndarray:
        return util

    def update(self, users: np.ndarray, chosen: np.ndarray, world, step: int) -> None:
        """``chosen`` (n,) item ids, -1 for no click."""

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("params", "context")}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def slerp(x: np.ndarray, a: np.ndarray, p: float) -> np.ndarray:
    """U-DRIFT: rotate rows of x toward rows of a by fraction p (spherical interpolation), keep ‖x‖."""
    nx = np.linalg.norm(x, axis=1, keepdims=True)
    na = np.linalg.norm(a, axis=1, keepdims=True)
    xh = x / np.where(nx > 0, nx, 1)
    ah = a / np.where(na > 0, na, 1)
    cos = np.clip(np.sum(xh * ah, axis=1, keepdims=True), -1.0, 1.0)
    # antipodal guard: nudge a tiny bit so sin(Ω) is not 0
    cos = np.where(cos < -1 + 1e-7, -1 + 1e-7, cos)
    omega = np.arccos(cos)
    so = np.sin(omega)
    small = so < 1e-7
    w1 = np.where(small, 1 - p, np.sin((1 - p) * omega) / np.where(small, 1, so))
    w2 = np.where(small, p, np.sin(p * omega) / np.where(small, 1, so))
    out = w1 * xh + w2 * ah
    nout = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.where(nout > 0, nout, 1) * nx).astype(x.dtype)


@register("dynamics", "drift")
class Drift(Dynamics):
    """U-DRIFT (T-RECS): each consumed item rotates the user's true preferences toward it by ``rate``."""

    class Params(Params):
        rate: float = Field(0.05, ge=0, le=1, description="slerp fraction per consumption")

    def update(self, users, chosen, world, step):
        hit = chosen >= 0
        if not hit.any() or self.params.rate == 0:
            return

        # in place, without (n, d) temporaries; same maths as :func:`slerp` (tested against it)
        slerp_rows(world.users.prefs, np.ascontiguousarray(users[hit], dtype=np.int64), world.items.attrs,
                   np.ascontiguousarray(chosen[hit], dtype=np.int64), float(self.params.rate))


@register("dynamics", "satiation")
class Satiation(Dynamics):
    """U-SATIATION (rebounding bandits): per-topic satiation s ← γ(s + a); utility − λ·⟨s, p(g|i)⟩.

    ``a`` is the consumed item's genre distribution, so satiation accumulates per topic and decays
    (rebounds) while the topic is not consumed.
    """

    class Params(Params):
        decay: float = Field(0.5, ge=0, le=1, description="γ")
        strength: float = Field(0.5, ge=0, description="λ: utility lost per unit of satiation")

    def init(self, world):
        self.s = np.zeros((world.users.prefs.shape[0], world.items.genres.shape[1]), np.float32)

    def _ensure(self, world):
        need = world.users.prefs.shape[0]
        if self.s.shape[0] < need:
            self.s = np.concatenate([self.s, np.zeros((need - self.s.shape[0], self.s.shape[1]), np.float32)])

    def adjust(self, users, slates, util, world):
        self._ensure(world)
        g = world.items.genres[np.maximum(slates, 0)]
        return util - self.params.strength * np.einsum("nkg,ng->nk", g, self.s[users])

    def update(self, users, chosen, world, step):
        self._ensure(world)
        a = np.zeros((len(users), self.s.shape[1]), np.float32)
        hit = chosen >= 0
        a[hit] = world.items.genres[chosen[hit]]
        self.s[users] = self.params.decay * (self.s[users] + a)


@register("dynamics", "familiarity")
class Familiarity(Dynamics):
    """U-FAMILIARITY (our parametrisation): utility + η_f·(1 − exp(−n_{u,creator}/κ)).

    n counts the user's past consumptions of the item's creator (counts kept as uint16).
    """

    class Params(Params):
        kappa: float = Field(3.0, gt=0)
        strength: float = Field(0.5, ge=0, description="η_f")

    def init(self, world):
        n_creators = max(1, int(world.items.creator[: world.items.n].max()) + 1)
        self.counts = np.zeros((world.users.prefs.shape[0], n_creators), np.uint16)

    def _ensure(self, world):
        need = world.users.prefs.shape[0]
        if self.counts.shape[0] < need:
            pad = np.zeros((need - self.counts.shape[0], self.counts.shape[1]), np.uint16)
            self.counts = np.concatenate([self.counts, pad])

    def familiarity(self, users, slates, world):
        cr = world.items.creator[np.maximum(slates, 0)]
        n = np.where(cr >= 0, self.counts[users[:, None], np.maximum(cr, 0)], 0).astype(np.float32)
        return 1.0 - np.exp(-n / self.params.kappa)

    def adjust(self, users, slates, util, world):
        self._ensure(world)
        return util + self.params.strength * self.familiarity(users, slates, world)

    def update(self, users, chosen, world, step):
        self._ensure(world)
        hit = chosen >= 0
        cr = world.items.creator[chosen[hit]]
        ok = cr >= 0
        u, c = users[hit][ok], cr[ok]
        np.add.at(self.counts, (u, c), 1)
