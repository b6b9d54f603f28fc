"""Shared pieces of the conformance kit (:mod:`recloop.conformance`): the report, tiny seeded worlds and
build contexts, and the contract every component of every kind passes."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from recloop import registry
from recloop.component import Component
from recloop.contracts import BuildContext, PlatformView, TrainingData, WorldShape
from recloop.rng import component_rng
from recloop.sim.checkpoint import roundtrip
from recloop.sim.engine import ScoringEngine
from recloop.sim.log import InteractionLog
from recloop.sim.state import History

__all__ = ["ConformanceReport", "check_contract", "check_state_roundtrip", "passed", "tiny_context", "tiny_world"]


@dataclass
class ConformanceReport:
    """What :func:`check_component` checked: the checks the component passed, in order (printable)."""

    kind: str
    name: str
    passed: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.passed)

    def __contains__(self, check: str) -> bool:
        return check in self.passed

    def __str__(self) -> str:
        lines = [f"{self.kind} '{self.name}': {len(self.passed)} conformance checks passed"]
        return "\n".join(lines + [f"  ✓ {c}" for c in self.passed])


_REPORT: ContextVar[ConformanceReport | None] = ContextVar("conformance_report", default=None)


def passed(check: str) -> None:
    """Record a passed check in the report of the running :func:`check_component` (once per name)."""
    rep = _REPORT.get()
    if rep is not None and check not in rep.passed:
        rep.passed.append(check)


# ------------------------------------------------------------------------------------- tiny worlds
TINY_WORLD = {"type": "chaney", "n_users": 60, "n_items": 80, "dim": 6, "n_creators": 5}


def example_config(kind: str, name: str, params: dict | None) -> dict[str, Any]:
    """``{type: name, **example_params, **params}`` for a registered component."""
    spec = registry.get(kind, name)
    base = dict(getattr(spec.cls, "example_params", {}) or {})
    base.update(params or {})
    return {"type": name, **base}


def tiny_world(seed: int = 0, world: dict | None = None):
    gen = registry.build("world", world or TINY_WORLD)
    return gen, gen.build(component_rng(seed, "world"))


def tiny_log(world, seed: int = 0, per_user: int = 4) -> TrainingData:
    rng = component_rng(seed, "conformance.log")
    n_u, n_i = world.users.n, world.items.n
    users = np.repeat(np.arange(n_u), per_user)
    items = rng.integers(0, n_i, size=len(users))
    return TrainingData(users, items, np.zeros(len(users), np.int32), np.zeros(len(users), np.int8), n_u, n_i)


def tiny_state(world, data: TrainingData | None = None) -> SimpleNamespace:
    """A loop's state (what a :class:`PlatformView` reads) over ``world`` with ``data`` as its log."""
    history, log = History(world.users.n), InteractionLog()
    pop = np.zeros(world.items.n)
    if data is not None and len(data):
        history.add(data.users, data.items)
        log.add(-1, data.users, data.items, data.provenance, initial=True)
        pop = data.popularity()
    return SimpleNamespace(world=world, history=history, log=log, popularity=pop, t=0)


def tiny_context(seed: int, state, generator=None, chunk_rows: int = 17) -> BuildContext:
    """The simulator's build context over ``state`` (ground truth granted; see :func:`view_for`)."""
    w = state.world
    shape = WorldShape(w.users.n, w.items.n, w.items.dim, w.items.genres.shape[1])
    return BuildContext(seed, "conformance", ScoringEngine("numpy", chunk_rows=chunk_rows), shape, None, None,
                        view=PlatformView(state, ground_truth=True, who="the simulator"), generator=generator)


def view_for(component: Component, context: BuildContext, who: str) -> BuildContext:
    """``context`` with the view a run gives ``component``: ground truth only if it declares it."""
    return context.with_view(context.view.granting(bool(component.uses_ground_truth), who=who))


# ------------------------------------------------------------------------------- the component contract
def check_contract(kind: str, name: str, cfg: dict[str, Any], context: BuildContext):
    """Build ``cfg`` of ``kind`` as a run does (Params alone, then bind) and check the component contract;
    returns the bound component."""
    spec = registry.get(kind, name)
    assert issubclass(spec.cls, Component), f"{kind} {name}: must subclass recloop.component.Component"
    params_cls = spec.params
    assert params_cls.model_config.get("extra") == "forbid", f"{kind} {name}: Params must forbid extra keys"
    try:
        params_cls.model_validate({**{k: v for k, v in cfg.items() if k != "type"}, "_no_such_key": 1})
    except Exception:  # noqa: BLE001 - pydantic's ValidationError: the unknown key was refused
        pass
    else:
        raise AssertionError(f"{kind} {name}: Params accepted an unknown key")
    passed("typed Params (extra keys forbidden)")
    comp = registry.build(kind, cfg)
    assert comp.context is not context, f"{kind} {name}: bound before bind()"
    if kind == "policy":
        context = view_for(comp, context, f"{kind} '{name}'")
    assert comp.bind(context) is comp and comp.context is context, f"{kind} {name}: bind() must return self"
    for child in comp.children():
        assert isinstance(child, Component), f"{kind} {name}: children() must be components"
        assert child.context is context, f"{kind} {name}: a child was not bound with the build context"
    passed("built from Params, bound through the build context (children too)")
    return comp


def check_state_roundtrip(kind: str, name: str, comp, make) -> None:
    """``state_dict`` survives the safe checkpoint format and loads into a fresh component."""
    state = roundtrip(comp.state_dict())
    fresh = make()
    fresh.load_state_dict(state)
    passed("checkpoint round-trip (safe format: arrays and plain values)")
    return fresh
