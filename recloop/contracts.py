"""The contracts between the loop and its components: what each may see, and what it hands back.

* :class:`BuildContext`: what every component of every kind receives once, when the loop binds it
  (seed and RNG factory, engine, world shape, run directory, shared services, its view of the world).
* :class:`PlatformView`: what a policy may read: the training log (provenance, steps), each user's
  consumed set and recent sequence, popularity, the step and the observable item features. User
  preferences and true utility are hidden, and reading them raises :class:`HiddenStateError`, unless
  the component declares ``uses_ground_truth = True`` (the ``ideal`` oracle) or is a metric (the
  analyst's view).
* :class:`CycleRecord`: the frozen record of one cycle that every metric receives.
* Reports (:class:`InteractionReport`, :class:`CatalogReport`): data a stage adds (LLM augmentation,
  phantom items), returned from ``produce`` and committed by the loop. No component writes to the
  log or the catalog.

This module is the core layer: it imports nothing from ``recloop.sim`` or above.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

import numpy as np
import scipy.sparse as sp

from recloop.rng import component_rng

PROVENANCE = {"organic": 0, "recommended": 1, "llm_augmented": 2}
PROVENANCE_NAMES = {v: k for k, v in PROVENANCE.items()}


class HiddenStateError(AttributeError):
    """A component read state its view does not grant (user preferences, true utility, the model)."""


def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


# -------------------------------------------------------------------------------------- training data
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
    """What happened in one cycle, as an online policy sees it (its own slates and the choices)."""

    step: int
    users: np.ndarray  # (n,) active user ids
    slates: np.ndarray  # (n, k) item ids, -1 for empty slots
    chosen_pos: np.ndarray  # (n,) position in slate, -1 = no click
    chosen_item: np.ndarray  # (n,) item id, -1 = no click
    utility: np.ndarray  # (n,) realised true utility (0 for no click)
    #: every (users, items) pair consumed this cycle: picks from slates, extra accepts of multi-accept
    #: choice models and organic picks (None: only ``chosen_item``)
    consumed: tuple[np.ndarray, np.ndarray] | None = None


# --------------------------------------------------------------------------------------------- reports
@dataclass(frozen=True)
class InteractionReport:
    """Interactions a stage adds to the training log (e.g. LLM augmentation): not consumption, so
    users' histories and popularity are unchanged. ``step`` is the log step they are filed under."""

    users: np.ndarray
    items: np.ndarray
    provenance: int
    step: int
    initial: bool = False
    source: str = ""


@dataclass(frozen=True)
class CatalogReport:
    """Items a stage adds to the catalog (e.g. phantom items for hallucinated titles). The loop appends
    them in order, so their ids are ``first_id, first_id + 1, ...`` (checked when committed)."""

    first_id: int
    attrs: np.ndarray
    genres: np.ndarray
    titles: tuple[str, ...]
    creator: np.ndarray
    group: np.ndarray
    step: int
    source: str = ""

    @property
    def ids(self) -> np.ndarray:
        return np.arange(self.first_id, self.first_id + len(self.titles), dtype=np.int64)


Report = InteractionReport | CatalogReport


@dataclass(frozen=True)
class StageReport:
    """A stage's account of its last round (LLM roles: what was asked, generated, matched, changed),
    snapshotted by the loop into the cycle record for the metrics. Stages subclass it with typed fields
    (e.g. :class:`recloop.llm.reports.AugmenterReport`)."""

    role: str  # what the stage does (augmenter, ranker, profiler, ...)
    kind: str  # its registered id


# ----------------------------------------------------------------------------------------- the views
@dataclass(frozen=True)
class WorldShape:
    n_users: int
    n_items: int
    dim: int
    n_genres: int


class ObservableItems:
    """The catalog as the platform sees it: features, titles, creator and group (read-only)."""

    __slots__ = ("_items",)
    FIELDS = ("attrs", "genres", "creator", "group", "created_at")

    def __init__(self, items):
        object.__setattr__(self, "_items", items)

    def __getattr__(self, name: str):
        items = object.__getattribute__(self, "_items")
        if name in ObservableItems.FIELDS:
            return _readonly(getattr(items, name))
        if name in ("n", "dim", "titles", "genre_names"):
            return getattr(items, name)
        if name == "capacity":
            return items.attrs.shape[0]
        raise HiddenStateError(f"items.{name} is not part of the platform view (allowed: n, dim, capacity, "
                               f"titles, genre_names, {', '.join(ObservableItems.FIELDS)}). A stage that adds "
                               "items returns a CatalogReport from produce(); the loop commits it.")

    def __setattr__(self, name, value):
        raise HiddenStateError("the catalog is read-only to components; return a CatalogReport from produce()")


class ObservableUsers:
    """The user population as the platform sees it: ids, activity, join times, declared attributes.
    Preferences (``prefs``, ``prefs0``) are hidden."""

    __slots__ = ("_users", "_who")

    def __init__(self, users, who: str = "this component"):
        object.__setattr__(self, "_users", users)
        object.__setattr__(self, "_who", who)

    def __getattr__(self, name: str):
        users = object.__getattribute__(self, "_users")
        if name in ("active", "joined_at"):
            return _readonly(getattr(users, name))
        if name == "n":
            return users.n
        if name == "capacity":
            return users.prefs.shape[0]
        if name == "attributes":
            return MappingProxyType({k: _readonly(v) for k, v in users.attributes.items()})
        if name == "active_ids":
            return users.active_ids
        who = object.__getattribute__(self, "_who")
        raise HiddenStateError(
            f"{who} read users.{name}: user preferences and true utility are hidden from the platform. "
            "A policy that needs them (an oracle) declares `uses_ground_truth = True` and reads view.truth.")

    def __setattr__(self, name, value):
        raise HiddenStateError("the user population is read-only to components")


class ConsumedSets:
    """Read-only access to each user's consumed set (the simulator's history)."""

    __slots__ = ("_h",)
    METHODS = ("csr", "contains", "pairs", "rows_csr", "to_coo")

    def __init__(self, history):
        object.__setattr__(self, "_h", history)

    def __getattr__(self, name: str):
        h = object.__getattribute__(self, "_h")
        if name in ConsumedSets.METHODS or name in ("n_users", "nnz", "segments"):
            return getattr(h, name)
        raise HiddenStateError(f"history.{name} is not part of the platform view (read-only: "
                               f"{', '.join(ConsumedSets.METHODS)}, n_users, nnz)")

    def __setattr__(self, name, value):
        raise HiddenStateError("histories are read-only to components; the loop records consumption")


class PlatformView:
    """What a policy (or any stage) may read, live: it follows the run as the world grows.

    ``source`` is the loop's state (``world``, ``history``, ``log``, ``popularity``, ``t``); only the
    observable parts are exposed. ``ground_truth=True`` grants :attr:`truth` (the world itself)."""

    __slots__ = ("_src", "_truth", "_who")

    def __init__(self, source, *, ground_truth: bool = False, who: str = "this component"):
        object.__setattr__(self, "_src", source)
        object.__setattr__(self, "_truth", bool(ground_truth))
        object.__setattr__(self, "_who", who)

    def __setattr__(self, name, value):
        raise HiddenStateError("the platform view is read-only")

    def granting(self, ground_truth: bool, who: str | None = None) -> PlatformView:
        """The same view with ground truth granted or withheld (for a component that declares it)."""
        return PlatformView(self._src, ground_truth=ground_truth, who=who or self._who)

    @property
    def items(self) -> ObservableItems:
        return ObservableItems(self._src.world.items)

    @property
    def users(self) -> ObservableUsers:
        return ObservableUsers(self._src.world.users, self._who)

    @property
    def step(self) -> int:
        return int(self._src.t)

    @property
    def history(self) -> ConsumedSets:
        return ConsumedSets(self._src.history)

    @property
    def popularity(self) -> np.ndarray:
        """φ(i) from the consumption recorded so far, one entry per current item (read-only)."""
        pop = self._src.popularity
        n = self._src.world.items.n
        if len(pop) < n:
            pop = np.concatenate([pop, np.zeros(n - len(pop))])
        return _readonly(pop[:n])

    def training_data(self) -> TrainingData:
        """The training log as the retrain schedule selects it (provenance and steps per row)."""
        w = self._src.world
        return self._src.log.training_data(w.users.n, w.items.n)

    def sequences(self, users: np.ndarray, max_len: int) -> np.ndarray:
        """Each user's last ``max_len`` consumed items in order, most recent last, left-padded with -1:
        (len(users), max_len) int32, from the log's organic and recommended rows."""
        return recent_sequences(self._src.log, np.asarray(users, np.int64), int(max_len))

    def provenance_shares(self) -> np.ndarray:
        """Share of the training log by provenance (organic, recommended, llm_augmented)."""
        return self._src.log.provenance_shares()

    def log_counts(self) -> np.ndarray:
        """Interactions ever logged, by provenance code."""
        return self._src.log.counts.copy()

    @property
    def truth(self):
        """The simulator's world (preferences, true utility): only for components granted it."""
        if not self._truth:
            raise HiddenStateError(
                f"{self._who} read view.truth: user preferences and true utility are hidden from the platform. "
                "A policy that needs them (an oracle) declares `uses_ground_truth = True`.")
        return self._src.world

    @property
    def shape(self) -> WorldShape:
        w = self._src.world
        return WorldShape(w.users.n, w.items.n, w.items.dim, w.items.genres.shape[1])


def recent_sequences(log, users: np.ndarray, max_len: int) -> np.ndarray:
    """See :meth:`PlatformView.sequences` (``log`` has ``initial`` and ``chunks`` of (step, u, i, prov))."""
    out = np.full((len(users), max_len), -1, np.int32)
    parts = [c for c in log.initial + log.chunks if len(c[1])]
    if not parts or not len(users) or max_len == 0:
        return out
    u = np.concatenate([c[1] for c in parts])
    i = np.concatenate([c[2] for c in parts])
    keep = (np.concatenate([c[3] for c in parts]) != PROVENANCE["llm_augmented"]) & np.isin(u, users)
    u, i = u[keep], i[keep]
    order = np.argsort(u, kind="stable")  # per user, log order (time order) kept
    u, i = u[order], i[order]
    starts = np.searchsorted(u, users, "left")
    ends = np.searchsorted(u, users, "right")
    for r, (lo, hi) in enumerate(zip(starts.tolist(), ends.tolist())):
        lo = max(lo, hi - max_len)
        if hi > lo:
            out[r, max_len - (hi - lo):] = i[lo:hi]
    return out


# ------------------------------------------------------------------------------------- build context
@dataclass
class BuildContext:
    """What every component receives when it is bound: the same fields for every kind."""

    seed: int
    name: str = "component"
    engine: Any = None  # a recloop.sim.engine.ScoringEngine (the run's)
    shape: WorldShape | None = None
    run_dir: str | None = None
    scenario: Any = None  # the resolved scenario (read-only)
    view: PlatformView | None = None
    services: dict[str, Any] = field(default_factory=dict)
    #: the world generator, for simulator-side components that draw from it (replay choice, creators)
    generator: Any = None

    def rng(self, *labels: str | int) -> np.random.Generator:
        """A generator derived from (run seed, labels): the same draws on every resume and chunking."""
        return component_rng(self.seed, *labels)

    @property
    def dim(self) -> int:
        return self.shape.dim if self.shape is not None else 0

    def service(self, name: str, factory: Callable[[], Any]) -> Any:
        """The run's shared service ``name`` (e.g. ``"llm"``), built by ``factory`` on first use."""
        if name not in self.services:
            self.services[name] = factory()
        return self.services[name]

    def child(self, name: str) -> BuildContext:
        """The context of a nested component: same run, services and view; its own name."""
        return BuildContext(self.seed, name, self.engine, self.shape, self.run_dir, self.scenario, self.view,
                            self.services, self.generator)

    def with_view(self, view: PlatformView | None) -> BuildContext:
        """The same context with another view (ground truth granted or withheld)."""
        ctx = self.child(self.name)
        ctx.view = view
        return ctx


# ------------------------------------------------------------------------------------- cycle record
class PolicyProbe:
    """The analyst's read-only handle on the serving policy: its user embeddings and scores, never the
    policy object itself."""

    __slots__ = ("_policy", "_view")

    def __init__(self, policy, view: PlatformView):
        object.__setattr__(self, "_policy", policy)
        object.__setattr__(self, "_view", view)

    def __setattr__(self, name, value):
        raise HiddenStateError("the policy probe is read-only")

    def user_factors(self) -> np.ndarray | None:
        """The policy's user embeddings (rows = user ids): its own, else its first stage's (a pipeline's
        retrieval); None when it has none (or only a constant one, e.g. popularity)."""
        first = next(iter(getattr(self._policy, "children", lambda: [])()), None)
        for pol in (self._policy, first):
            f = pol.factors(self._view) if pol is not None and hasattr(pol, "factors") else None
            if f is not None and f[0].shape[1] > 1 and f[0].any():
                return _readonly(np.asarray(f[0]))
        return None

    def score_pairs(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self._policy.score_pairs(users, items, self._view, self._view.step)

    def factors(self):
        """The policy's (user, item, bias) scoring factors, read-only, or None when it scores otherwise
        (then :meth:`scores` gives dense rows for a chunk of users)."""
        fn = getattr(self._policy, "factors", None)
        f = fn(self._view) if callable(fn) else None
        return None if f is None else tuple(None if a is None else _readonly(np.asarray(a)) for a in f)

    def scores(self, users: np.ndarray) -> np.ndarray:
        """The policy's scores of every current item for a chunk of users, (len(users), n_items): the
        caller chunks (e.g. the conformal metric, through the engine's chunks)."""
        return self._policy.score(np.asarray(users, np.int64), self._view, self._view.step)

    def score_temperature(self) -> float | None:
        """T when the policy's scores are logits of its own probabilities (softmax(score / T)), else None."""
        t = getattr(self._policy, "score_temperature", None)
        return None if t is None else float(t)

    def greedy_factors(self):
        """(user, item, bias) factors of the policy's mean-only ranking, for a bandit (``greedy_factors``);
        None for a policy that does not explore."""
        fn = getattr(self._policy, "greedy_factors", None)
        return fn(self._view) if callable(fn) else None

    def stage_reports(self) -> tuple[StageReport, ...]:
        return tuple(r for s in _walk(self._policy) if (r := _stage_report(s)) is not None)


def _walk(component):
    yield component
    for c in getattr(component, "children", lambda: [])():
        yield from _walk(c)


def _stage_report(component) -> StageReport | None:
    fn = getattr(component, "stage_report", None)
    return fn() if callable(fn) else None


@dataclass(frozen=True)
class CycleRecord:
    """One cycle, as every metric sees it (built once, after the cycle's consumption is committed).

    ``world`` is the ground truth (the analyst may read it); ``policy`` a read-only probe of the serving
    policy; ``history`` the consumed sets after the cycle; ``popularity_before`` φ before it."""

    step: int
    seed: int
    k: int
    users: np.ndarray  # (n,) the active users, sorted
    slates: np.ndarray  # (n, k) item ids in shown order (positions = columns), -1 = empty slot
    chosen_pos: np.ndarray  # (n,) position picked, -1 = no click
    chosen_item: np.ndarray  # (n,) item picked, -1 = no click
    utility: np.ndarray  # (n,) realised true utility
    consumed: tuple[np.ndarray, np.ndarray]  # every (user, item) consumed this cycle (organic too)
    popularity_before: np.ndarray  # φ before the cycle
    popularity: np.ndarray  # φ after it
    history: ConsumedSets  # consumed sets after the cycle
    user_sample: np.ndarray  # the fixed metric user sample, restricted to this cycle's active users
    fixed_sample: np.ndarray  # the whole fixed sample
    world: Any  # ground truth (the analyst's view)
    policy: PolicyProbe  # read-only probe of the serving policy
    engine: Any  # the scoring engine (for oracle top-k)
    platform: PlatformView  # the platform's state as the analyst sees it (training log)
    repeat_consumption: bool
    choice_probs: np.ndarray | None = None  # (n, k+1) where the choice model has them (last: no click)
    #: the choice model's closed form ``(util (n, k), valid) -> (n, k+1)`` probabilities, where it has one
    choice_probabilities: Callable[[np.ndarray, np.ndarray], np.ndarray | None] | None = None
    #: the world with the preferences users had when served (before the advance phase moved them), for a
    #: metric with ``needs_serve_time_truth = True``; None otherwise
    truth_at_serve: Any = None
    reports: tuple[Report, ...] = ()  # data committed by stages at the last retrain
    stages: tuple[StageReport, ...] = ()  # the stages' accounts of their last round
    services: Mapping[str, Any] = field(default_factory=dict)  # the run's shared services (LLM)

    @cached_property
    def provenance_shares(self) -> np.ndarray:
        """Share of the training log by provenance (organic, recommended, llm_augmented)."""
        return self.platform.provenance_shares()

    @cached_property
    def log_counts(self) -> np.ndarray:
        """Interactions ever logged, by provenance code (cumulative, whatever the window)."""
        return self.platform.log_counts()

    @cached_property
    def exposure(self) -> np.ndarray:
        """How often each current item was shown this cycle (float64, zeros included)."""
        n = self.world.items.n
        sl = self.slates[self.slates >= 0]
        if len(sl) and int(sl.max()) >= n:
            raise ValueError(f"slate contains item id {int(sl.max())} >= n_items={n}")
        return np.bincount(sl, minlength=n).astype(float)

    @cached_property
    def full_slates(self) -> bool:
        return bool((self.slates >= 0).all())

    @property
    def feedback(self) -> Feedback:
        return Feedback(self.step, self.users, self.slates, self.chosen_pos, self.chosen_item, self.utility,
                        self.consumed)
