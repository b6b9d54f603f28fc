"""One base class for every kind of component (policy, re-ranker, choice model, dynamics, population,
creators, world, metric, LLM backend), in the spirit of LensKit's components and Gymnasium's ``Env``.

A component has:

* a typed ``Params`` (pydantic, extra keys forbidden); nested components are typed fields,
  ``retrieval: Child("policy")``, validated against the registry and described in ``recloop schema`` as
  a union discriminated by ``type``;
* a bind step, :meth:`Component.bind`, with the run's :class:`~recloop.contracts.BuildContext` (the same
  for every kind); children are bound with it too;
* :meth:`Component.children`, its nested components (the loop walks them for reports and checkpoints);
* :meth:`Component.state_dict` / :meth:`Component.load_state_dict` in the safe checkpoint format (arrays
  and plain values; see :mod:`recloop.sim.checkpoint`);
* :meth:`Component.produce`, the data it adds before a retrain, as typed reports the loop commits.

Construction takes the Params only (``cls(params)``); everything about the run arrives with ``bind``.
"""

from __future__ import annotations

import contextvars
import copy
from typing import Any

from pydantic_core import core_schema

from recloop import registry
from recloop.contracts import BuildContext, Report, StageReport
from recloop.errors import RecloopInputError, did_you_mean
from recloop.registry import Params

__all__ = ["Child", "ChildType", "Component", "check_child"]


class Component:
    """Base class of every registered component."""

    class Params(Params):
        pass

    #: set by ``@register``
    registry_kind: str = ""
    registry_name: str = ""
    #: True when the component needs the simulator's ground truth (granted through ``view.truth``).
    uses_ground_truth: bool = False

    def __init__(self, params: Params | None = None):
        self.params = params if params is not None else type(self).Params()
        self.context: BuildContext = BuildContext(seed=0, name=self.registry_name or type(self).__name__)

    # -- binding ---------------------------------------------------------------------------------
    def bind(self, context: BuildContext):
        """Receive the run's build context (children first, then :meth:`on_bind`); returns self."""
        self.context = context
        for child in self.children():
            child.bind(context)
        self.on_bind(context)
        return self

    def on_bind(self, context: BuildContext) -> None:
        """Hook: set up what depends on the run (services, samples, sizes)."""

    def children(self) -> list[Component]:
        """Nested components (a wrapper's base, a pipeline's stages), in a fixed order."""
        return []

    # -- data a stage adds -----------------------------------------------------------------------
    def produce(self, view, *, step: int) -> list[Report]:
        """Reports of data to add before a retrain (default: the children's, in order). The loop commits
        them (log, catalog) before :meth:`fit`; a component never writes to the log or the catalog."""
        out: list[Report] = []
        for child in self.children():
            out.extend(child.produce(view, step=step))
        return out

    def stage_report(self) -> StageReport | None:
        """A stage's account of its last round, for the metrics (default: none)."""
        return None

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (worker processes) keeps params and state but not the run: the copy is unbound
        (its context keeps only the seed and name)."""
        state = self.__dict__.copy()
        ctx = state.get("context")
        if isinstance(ctx, BuildContext):
            state["context"] = BuildContext(seed=ctx.seed, name=ctx.name)
        return state

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (default: the instance's attributes minus params and context)."""
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in ("context", "params")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(copy.deepcopy(state))


# ----------------------------------------------------------------------------------- typed children
def check_child(kind: str, value: Any) -> dict:
    """Validate a nested component block ``{type: <id>, ...params}`` against the registry; returns it."""
    if not isinstance(value, dict) or "type" not in value:
        allowed = ", ".join(registry.names(kind))
        raise ValueError(f"must be a mapping with a 'type:' naming a {kind}; allowed: {allowed}")
    spec = registry.get(kind, value["type"])
    cfg = {k: v for k, v in value.items() if k != "type"}
    try:
        spec.params.model_validate(cfg)
    except Exception as exc:  # pydantic ValidationError → one line
        errs = getattr(exc, "errors", lambda: [])()
        fields = list(spec.params.model_fields)
        detail = "; ".join(_child_error(e, fields) for e in errs) or str(exc)
        raise ValueError(f"{kind} '{value['type']}': {detail} (allowed keys: {', '.join(fields) or 'none'})") from None
    return dict(value)


def _child_error(err: dict, fields: list[str]) -> str:
    """One error of a nested block: an unknown key gets the closest allowed one."""
    where = ".".join(map(str, err["loc"]))
    if err.get("type") == "extra_forbidden":
        return f"'{where}' is not allowed here.{did_you_mean(str(err['loc'][-1]), fields)}"
    return f"{where}: {err['msg']}"


_IN_UNION: contextvars.ContextVar[frozenset] = contextvars.ContextVar("recloop_child_union", default=frozenset())


def _union_schema(kind: str) -> dict[str, Any]:
    """JSON schema of a nested ``kind`` component: one option per registered id, discriminated by
    ``type`` (an option's own nested components of the same kind are named, not expanded)."""
    names = registry.names(kind)
    brief = {"type": "object", "description": f"a {kind} component: {{type: <id>, ...params}}",
             "properties": {"type": {"enum": names}}, "required": ["type"]}
    if kind in _IN_UNION.get():
        return brief
    token = _IN_UNION.set(_IN_UNION.get() | {kind})
    try:
        options = []
        for spec in registry.specs(kind):
            sch = spec.params.model_json_schema()
            props = {"type": {"const": spec.name}, **sch.get("properties", {})}
            opt = {"title": f"{kind} {spec.name}", "type": "object", "properties": props,
                   "required": ["type", *sch.get("required", [])], "additionalProperties": False}
            if spec.doc:
                opt["description"] = spec.doc.splitlines()[0]
            options.append(_inline_refs(opt, sch.get("$defs", {})))
    finally:
        _IN_UNION.reset(token)
    return {"description": brief["description"], "oneOf": options, "discriminator": {"propertyName": "type"}}


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    """``node`` with its ``#/$defs/..`` references replaced by the definitions (options stand alone)."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/") and ref[8:] in defs:
            return _inline_refs(defs[ref[8:]], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


class ChildType:
    """Base of the types :func:`Child` makes: validated against the registry, described as a union."""

    kind = ""
    by_name = False

    @classmethod
    def validate(cls, value: Any) -> Any:
        if cls.by_name and isinstance(value, str):
            try:
                registry.get(cls.kind, value)
            except RecloopInputError as exc:  # an unknown id: the closest valid one is named, at this key
                raise ValueError(exc.detail) from None
            return value
        return check_child(cls.kind, value)

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        return core_schema.no_info_plain_validator_function(cls.validate)

    @classmethod
    def __get_pydantic_json_schema__(cls, schema, handler):
        union = _union_schema(cls.kind)
        if not cls.by_name:
            return union
        return {"description": union["description"] + ", or just its id",
                "anyOf": [{"type": "string", "enum": registry.names(cls.kind)}, union]}


_CHILD_TYPES: dict[tuple[str, bool], type] = {}


def Child(kind: str, *, by_name: bool = False) -> type:  # noqa: N802  (a type factory, used like a type)
    """The type of a nested component field of ``kind``: ``base: Child("policy")``. With ``by_name``, a
    bare id (``exposure``) stands for the component with its default parameters."""
    key = (kind, by_name)
    if key not in _CHILD_TYPES:
        name = f"{kind.title()}Component" + ("OrId" if by_name else "")
        _CHILD_TYPES[key] = type(name, (ChildType,), {"kind": kind, "by_name": by_name})
    return _CHILD_TYPES[key]
