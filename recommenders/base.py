"""The policy interface every recommender implements (reference §E).

A policy is trained with :meth:`Policy.fit` on a retrain schedule, may learn online each cycle with
:meth:`Policy.update`, and scores users against the catalog either through factors (the BLAS fast path:
score = <U_u, V_i> + b_i) or through :meth:`Policy.score` on a chunk of users. The engine does the
chunking and the fused top-k, so a policy never builds a users x items matrix.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from recloop.registry import Params
from recloop.sim.engine import ScoringEngine

PROVENANCE = {"organic": 0, "recommended": 1, "llm_augmented": 2}
PROVENANCE_NAMES = {v: k for k, v in PROVENANCE.items()}


@dataclass
class PolicyContext:
    """What a policy knows about the run when it is built."""

    seed: int
    name: str = "policy"
    engine: ScoringEngine = field(default_factory=ScoringEngine)
    dim: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingData:
    """Logged interactions a policy trains on (COO columns), with provenance per row."""

    users: np.ndarray
    items: np.ndarray
    steps: np.ndarray
    provenance: np.ndarray
    n_users: int
    n_items: int

    @classmethod
    def empty(cls, n_users: int, n_items: int) -> TrainingData:
        z = np.zeros(0, np.int64)
        return cls(z, z, z.astype(np.int32), z.astype(np.int8), n_users, n_items)

    def __len__(self) -> int:
        return len(self.users)

    def matrix(self, binary: bool = True) -> sp.csr_matrix:
        """users x items sparse matrix (counts, or 1 where any interaction)."""
        m = sp.csr_matrix(
            (np.ones(len(self.users), np.float32), (self.users, self.items)), shape=(self.n_users, self.n_items)
        )
        m.sum_duplicates()
        if binary:
            m.data[:] = 1.0
        return m

    def popularity(self) -> np.ndarray:
        """φ(i): number of distinct users who interacted with i (the Elliot convention)."""
        if len(self.users) == 0:
            return np.zeros(self.n_items, np.float64)
        key = np.unique(self.users.astype(np.int64) * self.n_items + self.items)
        return np.bincount(key % self.n_items, minlength=self.n_items).astype(np.float64)


@dataclass
class Feedback:
    """What happened in one cycle, for online policies and metrics."""

    step: int
    users: np.ndarray  # (n,) active user ids
    slates: np.ndarray  # (n, k) item ids, -1 for empty slots
    chosen_pos: np.ndarray  # (n,) position in slate, -1 = no click
    chosen_item: np.ndarray  # (n,) item id, -1 = no click
    utility: np.ndarray  # (n,) realised true utility (0 for no click)
    #: every (users, items) pair consumed this cycle: picks from slates, extra accepts of multi-accept
    #: choice models and organic picks (None: only ``chosen_item``)
    consumed: tuple[np.ndarray, np.ndarray] | None = None


class Policy:
    """Base class for recommendation policies (registered with ``@register("policy", name)``)."""

    class Params(Params):
        pass

    #: True when the policy learns from every cycle's feedback through :meth:`update`.
    online: bool = False
    #: True when the policy needs the simulator's ground truth (the ideal oracle does).
    uses_ground_truth: bool = False

    def __init__(self, params: Params | None = None, *, context: PolicyContext | None = None, **_: Any):
        self.params = params if params is not None else type(self).Params()
        self.context = context or PolicyContext(seed=0)

    # -- training -----------------------------------------------------------------------------
    def fit(self, data: TrainingData, world, *, step: int, rng: np.random.Generator, warm_start: bool) -> None:
        """(Re)train on ``data``; ``warm_start`` continues from the current parameters."""

    def update(self, feedback: Feedback, world) -> None:
        """Online learning from one cycle (no-op unless ``online``)."""

    # -- scoring ------------------------------------------------------------------------------
    def factors(self, world) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """(user_factors, item_factors, item_bias) for the BLAS fast path, or None."""
        return None

    def score(self, users: np.ndarray, world, step: int = 0) -> np.ndarray:
        """Dense scores (len(users), n_items) for a chunk of users."""
        f = self.factors(world)
        if f is None:
            raise NotImplementedError(f"{type(self).__name__} must implement factors() or score()")
        U, V, b = f
        s = U[users].astype(np.float32) @ V.T.astype(np.float32)
        return s + b if b is not None else s

    def score_pairs(self, users: np.ndarray, items: np.ndarray, world, step: int = 0) -> np.ndarray:
        """Scores for given candidates: ``items`` is (n, m) aligned with ``users`` (n,); -1 → -inf."""
        f = self.factors(world)
        safe = np.maximum(items, 0)
        if f is not None:
            U, V, b = f
            s = np.einsum("nmf,nf->nm", V[safe].astype(np.float32), U[users].astype(np.float32))
            if b is not None:
                s = s + b[safe]
        else:
            s = np.take_along_axis(self.score(users, world, step), safe, axis=1)
        return np.where(items < 0, -np.inf, s).astype(np.float32)

    def recommend(
        self, users: np.ndarray, k: int, world, *, exclude=None, step: int = 0, engine: ScoringEngine | None = None,
        on_chunk=None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ranked slates (len(users), k) of item ids (-1 = empty) and their scores."""
        engine = engine or self.context.engine
        f = self.factors(world)
        if f is not None:
            U, V, b = f
            return engine.topk_factors(users, k, U, V[: world.items.n], None if b is None else b[: world.items.n],
                                       exclude=exclude, on_chunk=on_chunk)
        return engine.topk(users, k, world.items.n, lambda ids: self.score(ids, world, step), exclude=exclude,
                           on_chunk=on_chunk)

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (default: the instance's attributes minus the context)."""
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in ("context", "params")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(copy.deepcopy(state))
