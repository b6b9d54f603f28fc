"""The policy interface every recommender implements (reference §E).

A policy is trained with :meth:`Policy.fit` on a retrain schedule, may learn online each cycle with
:meth:`Policy.update`, and scores users against the catalog either through factors (the BLAS fast path:
score = <U_u, V_i> + b_i) or through :meth:`Policy.score` on a chunk of users. The engine does the
chunking and the fused top-k, so a policy never builds a users x items matrix.
"""

from __future__ import annotations

import numpy as np

from recloop.component import Component
from recloop.contracts import PROVENANCE, PROVENANCE_NAMES, BuildContext, Feedback, PlatformView, TrainingData
from recloop.registry import Params
from recloop.sim.engine import ScoringEngine

__all__ = ["PROVENANCE", "PROVENANCE_NAMES", "Feedback", "Policy", "PolicyContext", "TrainingData"]

#: the build context a policy receives (the same :class:`~recloop.contracts.BuildContext` as every kind)
PolicyContext = BuildContext


class Policy(Component):
    """Base class for recommendation policies (registered with ``@register("policy", name)``).

    Every method that takes ``view`` receives a :class:`~recloop.contracts.PlatformView`: the log,
    histories, popularity and the observable item features. User preferences are hidden unless the
    class declares ``uses_ground_truth = True`` (then ``view.truth`` is the world)."""

    class Params(Params):
        pass

    #: True when the policy learns from every cycle's feedback through :meth:`update`.
    online: bool = False

    @property
    def score_temperature(self) -> float | None:
        """T when the policy's scores are the logits of its own next-item probabilities, P(i | u) =
        softmax(score / T) over the catalog (e.g. a sequential model trained with the full softmax loss);
        None when its scores are not probabilities (the conformal metric then fits a temperature)."""
        return None

    @property
    def engine(self) -> ScoringEngine:
        ctx = self.context
        return ctx.engine if ctx is not None and ctx.engine is not None else _default_engine()

    # -- training -----------------------------------------------------------------------------
    def fit(self, data: TrainingData, view: PlatformView, *, step: int, rng: np.random.Generator,
            warm_start: bool) -> None:
        """(Re)train on ``data``; ``warm_start`` continues from the current parameters."""

    def update(self, feedback: Feedback, view: PlatformView) -> None:
        """Online learning from one cycle (no-op unless ``online``)."""

    # -- scoring ------------------------------------------------------------------------------
    def factors(self, view: PlatformView) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """(user_factors, item_factors, item_bias) for the BLAS fast path, or None."""
        return None

    def score(self, users: np.ndarray, view: PlatformView, step: int = 0) -> np.ndarray:
        """Dense scores (len(users), n_items) for a chunk of users."""
        f = self.factors(view)
        if f is None:
            raise NotImplementedError(f"{type(self).__name__} must implement factors() or score()")
        U, V, b = f
        s = U[users].astype(np.float32) @ V.T.astype(np.float32)
        return s + b if b is not None else s

    def score_pairs(self, users: np.ndarray, items: np.ndarray, view: PlatformView, step: int = 0) -> np.ndarray:
        """Scores for given candidates: ``items`` is (n, m) aligned with ``users`` (n,); -1 → -inf."""
        f = self.factors(view)
        safe = np.maximum(items, 0)
        if f is not None:
            U, V, b = f
            s = np.einsum("nmf,nf->nm", V[safe].astype(np.float32), U[users].astype(np.float32))
            if b is not None:
                s = s + b[safe]
        else:
            s = np.take_along_axis(self.score(users, view, step), safe, axis=1)
        return np.where(items < 0, -np.inf, s).astype(np.float32)

    def recommend(
        self, users: np.ndarray, k: int, view: PlatformView, *, exclude=None, step: int = 0,
        engine: ScoringEngine | None = None, on_chunk=None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ranked slates (len(users), k) of item ids (-1 = empty) and their scores; ``on_chunk`` is the
        engine's sink (called with each chunk's slates, e.g. the users' choice)."""
        engine = engine or self.engine
        n = view.items.n
        f = self.factors(view)
        if f is not None:
            U, V, b = f
            return engine.topk_factors(users, k, U, V[:n], None if b is None else b[:n], exclude=exclude,
                                       on_chunk=on_chunk)
        return engine.topk(users, k, n, lambda ids: self.score(ids, view, step), exclude=exclude, on_chunk=on_chunk)


_ENGINE: list[ScoringEngine] = []


def _default_engine() -> ScoringEngine:
    """An engine for a policy used on its own, outside a run (notebooks, tests)."""
    if not _ENGINE:
        _ENGINE.append(ScoringEngine())
    return _ENGINE[0]
