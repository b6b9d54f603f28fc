"""Every check that ``recloop run`` makes while setting a run up, without simulating (``recloop validate``).

A run builds, for each policy, the world, the scoring engine, the policy (and its LLM service), the
user models, the creators and the metric suite, and checks the slate size against the catalog. Each
of those can reject input (a missing data file, ``k`` larger than the catalog, an uninstalled model).
:func:`check_scenario` builds them the same way, but

* a large synthetic world is built at a reduced size (its declared ``n_items`` is still checked against
  ``k``), so validating a 10^6-user scenario takes a second, not a minute;
* nothing is trained, simulated or written (the LLM response cache is switched off; no run directory).

Every error names the scenario file and the full dotted key (``world.path``, ``policies.mf.factors``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from recloop import registry
from recloop.contracts import BuildContext, PlatformView, WorldShape
from recloop.errors import RecloopInputError, qualify
from recloop.rng import component_rng
from recloop.sim.engine import ScoringEngine
from recloop.sim.log import InteractionLog
from recloop.sim.measure import MetricSuite
from recloop.sim.state import History

#: A synthetic world with more (users + items) x dim entries than this is built at a reduced size.
CHEAP_WORLD_ENTRIES = 2_000_000
#: Users and items of the reduced world.
REDUCED_SIZE = 1000


@contextlib.contextmanager
def _at(file: str | None, prefix: str, roots: set[str]) -> Iterator[None]:
    """Re-issue input errors raised inside the block for ``file``, with keys made full under ``prefix``."""
    try:
        yield
    except RecloopInputError as exc:
        if exc.key and exc.key.startswith("llm_backend."):  # the backend's own name for the llm.backend block
            exc.key = exc.key.removeprefix("llm_backend.")
        raise qualify(exc, file=file, prefix=prefix, roots=roots) from None


def k_error(k: int, n_items: int, file: str | None) -> RecloopInputError:
    """The error for a slate larger than the catalog (the wording ``recloop run`` uses)."""
    return RecloopInputError(
        f"k={k} is larger than the catalog ({n_items} items). Set 'k' to at most {n_items} or "
        "enlarge the world's n_items.", file=file, key="k")


def _reduced(generator) -> tuple[Any, int | None]:
    """(generator to build, declared n_items) — a smaller copy of a large synthetic world.

    Data-set worlds (those with a ``table``) are built whole: their size comes from the data, and
    reading and fitting the data is exactly what must be checked.
    """
    p = generator.params
    n_users, n_items, dim = (getattr(p, f, None) for f in ("n_users", "n_items", "dim"))
    if hasattr(generator, "table") or not all(isinstance(v, int) for v in (n_users, n_items)):
        return generator, None
    if (n_users + n_items) * (dim if isinstance(dim, int) else 1) <= CHEAP_WORLD_ENTRIES:
        return generator, None
    small = p.model_copy(update={"n_users": min(n_users, REDUCED_SIZE), "n_items": min(n_items, REDUCED_SIZE)})
    return type(generator)(small), n_items


def _engine(sc) -> ScoringEngine:
    eng = sc.engine
    try:
        return ScoringEngine(eng.backend, chunk_rows=eng.chunk_rows, chunk_mib=eng.chunk_mib,
                             workers=eng.threads)
    except (ValueError, ImportError) as exc:  # a backend this machine cannot use
        raise RecloopInputError(f"{exc}.", key="backend") from None


def _components(policy) -> list:
    """The policy and its stages, recursively (pipelines, LLM wrappers around a base policy)."""
    out, todo = [], [policy]
    while todo:
        comp = todo.pop(0)
        out.append(comp)
        todo.extend(comp.children())
    return out


@dataclass
class _Setup:
    """What the checks share: the scenario, its file, and the parts built so far."""

    sc: Any
    file: str | None
    roots: set[str]
    seed: int
    generator: Any = None
    world: Any = None
    context: Any = None

    def at(self, prefix: str):
        return _at(self.file, prefix, self.roots)


def _validating(sc):
    """The scenario as validation builds it: the LLM response cache off (validating writes nothing)."""
    if sc.llm is None:
        return sc
    return sc.model_copy(update={"llm": sc.llm.model_copy(update={"cache": False})})


def _context(s: _Setup, engine: ScoringEngine) -> BuildContext:
    """The build context a run gives its components, over a world that has not started (no log yet)."""
    w = s.world
    state = SimpleNamespace(world=w, history=History(w.users.n), log=InteractionLog(), t=0,
                            popularity=np.zeros(w.items.n))
    shape = WorldShape(w.users.n, w.items.n, w.items.dim, w.items.genres.shape[1])
    return BuildContext(s.seed, "validate", engine, shape, None, _validating(s.sc),
                        view=PlatformView(state, ground_truth=True, who="the simulator"), generator=s.generator)


def check_scenario(sc, file: str | None = None) -> None:
    """Build what a run of ``sc`` builds, short of simulating; raise :class:`RecloopInputError` on bad input.

    A component may define ``preflight()`` to check what it needs later in a run (a model package, say)
    without loading it; it is called here.
    """
    s = _Setup(sc, file, set(type(sc).model_fields) | {"extends"}, sc.seeds()[0])
    try:
        _check_world(s)
        with s.at("engine"):
            s.context = _context(s, _engine(sc))
        if sc.llm is not None:
            with s.at("llm.backend"):
                ctx = s.context
                ctx.service("llm", lambda: registry.service_factory("llm")(ctx))
        _check_policies(s)
        _check_users(s)
        _check_metrics(s)
    finally:
        for svc in (s.context.services.values() if s.context is not None else ()):
            with contextlib.suppress(Exception):
                svc.close()


def _check_world(s: _Setup) -> None:
    with s.at("world"):
        s.generator = registry.build("world", s.sc.world)
        built, declared = _reduced(s.generator)
        s.world = built.build(component_rng(s.seed, "world"))
    n_items = declared if declared is not None else s.world.items.n
    if s.sc.k > n_items:
        raise k_error(s.sc.k, n_items, s.file)


def _check_policies(s: _Setup) -> None:
    sc = s.sc
    for name, cfg in sc.policy_configs().items():
        with s.at(f"policies.{name}" if sc.policies is not None else "policy"):
            policy = registry.build("policy", cfg)
            ctx = s.context.child(name)
            ctx.view = ctx.view.granting(policy.uses_ground_truth, who=f"policy '{name}'")
            policy.bind(ctx)
            for comp in _components(policy):
                check = getattr(comp, "preflight", None)
                if callable(check):
                    check()


def _check_users(s: _Setup) -> None:
    users, ctx = s.sc.users, s.context
    with s.at("users.choice"):
        registry.build("choice", users.choice, ctx)
    for i, cfg in enumerate(users.dynamics):
        with s.at(f"users.dynamics.{i}"):
            registry.build("dynamics", cfg, ctx)
    with s.at("users.population"):
        registry.build("population", users.population, ctx)
    if s.sc.creators is not None:
        with s.at("creators"):
            registry.build("creator", s.sc.creators, ctx)


def _check_metrics(s: _Setup) -> None:
    for i, entry in enumerate(s.sc.metrics.include or []):
        with s.at(f"metrics.include.{i}"):
            registry.get("metric", entry if isinstance(entry, str) else entry["type"])
    with s.at("metrics"):
        MetricSuite(s.sc.metrics, s.context)
