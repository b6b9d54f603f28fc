"""Versioned string-id registry for every pluggable component (Gymnasium-style).

Each component kind (``policy``, ``choice``, ``dynamics``, ``creator``, ``world``, ``metric``,
``reranker``, ``llm_backend``, ...) has its own namespace. A component is a class with a nested
pydantic ``Params`` model (extra keys forbidden); YAML selects it with ``type: <id>`` and the other
keys become its parameters. Third parties register through the ``recloop.plugins`` entry-point group:
each entry point names a module (or a callable) that registers its components when loaded.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ConfigDict

from recloop.errors import RecloopInputError, did_you_mean

KINDS = (
    "world",
    "policy",
    "reranker",
    "choice",
    "dynamics",
    "population",
    "creator",
    "metric",
    "llm_backend",
)


class Params(BaseModel):
    """Base class for component parameters: typed, validated, extra keys forbidden."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Spec:
    kind: str
    name: str
    cls: type
    doc: str

    @property
    def params(self) -> type[Params]:
        return getattr(self.cls, "Params", Params)


_REGISTRY: dict[str, dict[str, Spec]] = {k: {} for k in KINDS}
_LOADED = {"builtins": False, "plugins": False}

# Modules whose import registers the built-in components.
BUILTIN_MODULES = (
    "recloop.sim.worlds",
    "recloop.agents.choice",
    "recloop.agents.dynamics",
    "recloop.agents.population",
    "recloop.agents.creators",
    "recloop.agents.replay",
    "recloop.agents.periodic",
    "recloop.recommenders.classic",
    "recloop.recommenders.knn",
    "recloop.recommenders.mf",
    "recloop.recommenders.pipeline",
    "recloop.recommenders.rerankers",
    "recloop.recommenders.lafb",
    "recloop.recommenders.bandits",
    "recloop.recommenders.hyperbandit",
    "recloop.recommenders.conformal_set",
    "recloop.recommenders.sequential",
    "recloop.analysis.collectors",
    "recloop.analysis.user_collectors",
    "recloop.analysis.familiarity_metrics",
    "recloop.analysis.bandit_metrics",
    "recloop.analysis.conformal_metric",
    "recloop.analysis.conformal_compress_metric",
    "recloop.llm.role_augment",
    "recloop.llm.role_rank",
    "recloop.llm.collectors",
    "recloop.llm.role_profile",
    "recloop.llm.profile_metrics",
    "recloop.llm.warm_start",
    "recloop.llm.item_text",
)


def register(kind: str, name: str):
    """Class decorator: register ``cls`` as component ``name`` of ``kind``.

    Names may carry a version suffix (``mnl-v1``); the bare name resolves to the newest version.
    """
    if kind not in _REGISTRY:
        raise ValueError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")

    def deco(cls):
        params = getattr(cls, "Params", None)
        if params is not None and params.model_config.get("extra") != "forbid":
            raise TypeError(f"{cls.__name__}.Params must forbid extra keys (subclass recloop.registry.Params)")
        doc = (cls.__doc__ or "").strip()
        _check_unique(kind, name, cls)
        _REGISTRY[kind][name] = Spec(kind, name, cls, doc)
        cls.registry_kind = kind
        cls.registry_name = name
        return cls

    return deco


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_unique(kind: str, name: str, cls: type) -> None:
    """Two different classes may not claim one id (the same class re-registered, e.g. a reloaded
    module or a re-run notebook cell, replaces its earlier self)."""
    old = _REGISTRY[kind].get(name)
    if old is not None and _qualname(old.cls) != _qualname(cls):
        raise ValueError(f"{kind} '{name}' is already registered by {_qualname(old.cls)}; {_qualname(cls)} "
                         "cannot register the same name. Choose another name (or a versioned one, "
                         f"'{name}-v2').")


def load_builtins() -> None:
    """Import the modules that register the built-in components. An ImportError inside them is a bug
    and propagates; optional dependencies (torch, transformers, ...) are imported only when used."""
    if _LOADED["builtins"]:
        return
    _LOADED["builtins"] = True
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)


def load_plugins() -> None:
    """Load third-party components from the ``recloop.plugins`` entry-point group."""
    if _LOADED["plugins"]:
        return
    _LOADED["plugins"] = True
    for ep in entry_points(group="recloop.plugins"):
        try:
            obj = ep.load()
        except ImportError as exc:  # a broken plugin names itself instead of failing somewhere deep
            raise ImportError(f"the recloop plugin entry point '{ep.name}' ({ep.value}) failed to import: "
                              f"{exc}") from exc
        if callable(obj):
            obj()


_SERVICES: dict[str, Any] = {}


def register_service(name: str, factory) -> None:
    """Register the factory of a shared run service (``factory(context) -> service``): a higher layer
    (the LLM code) provides it, the loop and ``recloop validate`` build it by name."""
    _SERVICES[name] = factory


def service_factory(name: str):
    """The factory registered for service ``name`` (built-in services are loaded first)."""
    _ensure_loaded()
    if name not in _SERVICES:
        raise KeyError(f"no service '{name}' is registered")
    return _SERVICES[name]


def _ensure_loaded() -> None:
    load_builtins()
    load_plugins()


def names(kind: str) -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY[kind])


def fingerprint() -> tuple:
    """What is registered now, as a hashable key (models built from the registry are cached on it)."""
    _ensure_loaded()
    return tuple((k, n, id(s.cls)) for k in KINDS for n, s in sorted(_REGISTRY[k].items()))


def specs(kind: str | None = None) -> list[Spec]:
    _ensure_loaded()
    kinds = [kind] if kind else list(KINDS)
    return [_REGISTRY[k][n] for k in kinds for n in sorted(_REGISTRY[k])]


def get(kind: str, name: str, *, where: str | None = None, file: str | None = None) -> Spec:
    """Look up a component; unknown names raise a user-facing error with the closest valid id."""
    _ensure_loaded()
    table = _REGISTRY[kind]
    if name in table:
        return table[name]
    versions = sorted(n for n in table if n.startswith(name + "-v"))
    if versions:
        return table[versions[-1]]
    allowed = ", ".join(sorted(table)) or "(none registered)"
    raise RecloopInputError(
        f"unknown {kind} type '{name}'.{did_you_mean(name, table)} Allowed {kind} types: {allowed}.",
        file=file,
        key=where,
    )


def build(kind: str, config: dict[str, Any] | BaseModel, context=None):
    """Instantiate a component from a ``{type: ..., **params}`` mapping and, given a
    :class:`~recloop.contracts.BuildContext`, bind it (every kind the same way)."""
    if isinstance(config, BaseModel):
        config = config.model_dump()
    config = dict(config)
    name = config.pop("type")
    spec = get(kind, name)
    params = spec.params.model_validate(config)
    obj = spec.cls(params)
    if context is not None:
        obj.bind(context)
    return obj
