"""Readable names for component parameters (``recloop list``): ``int ≥ 1``, ``float in [0, 1]``,
``one of: a, b``, ``list of str``, ``mapping``, instead of pydantic's ``Annotated[...]`` internals."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from recloop.component import ChildType

_NAMES = {bool: "bool", int: "int", float: "float", str: "str", type(None): "null", Any: "any"}


def _num(v: float) -> str:
    """A bound as written in YAML: ``1`` not ``1.0``, thousands separated (``100,000,000``)."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return f"{v:,}" if isinstance(v, int) and abs(v) >= 10_000 else f"{v:g}" if isinstance(v, float) else str(v)


def _bounds(metadata: Iterable[Any]) -> str:
    """`` ≥ 1``, `` in [0, 1]``, `` in (0, 1]`` ... from ``ge/gt/le/lt`` constraints ('' when none)."""
    c = {a: getattr(m, a) for m in metadata for a in ("ge", "gt", "le", "lt") if getattr(m, a, None) is not None}
    lo = ("[", "≥", c["ge"]) if "ge" in c else ("(", ">", c["gt"]) if "gt" in c else None
    hi = ("]", "≤", c["le"]) if "le" in c else (")", "<", c["lt"]) if "lt" in c else None
    if lo and hi:
        return f" in {lo[0]}{_num(lo[2])}, {_num(hi[2])}{hi[0]}"
    if lo or hi:
        b = lo or hi
        return f" {b[1]} {_num(b[2])}"
    return ""


def type_label(annotation: Any, metadata: Iterable[Any] = ()) -> str:
    """A readable name of a parameter type, with its numeric constraints."""
    metadata = list(metadata)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        extra = [m for a in args[1:] for m in (a.metadata if isinstance(a, FieldInfo) else [a])]
        return type_label(args[0], metadata + extra)
    if origin in (typing.Union, types.UnionType):
        opts = [a for a in args if a is not type(None)]
        inner = " or ".join(type_label(a, metadata) for a in opts)
        return f"{inner}, or null" if len(opts) < len(args) else inner
    if origin is typing.Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        return "mapping"
    if origin is not None and isinstance(origin, type) and issubclass(origin, Sequence | set | frozenset):
        items = {type_label(a) for a in args if a is not Ellipsis}
        return "list of " + " or ".join(sorted(items)) if items else "list"
    if annotation in _NAMES:
        return _NAMES[annotation] + (_bounds(metadata) if annotation in (int, float) else "")
    if isinstance(annotation, type):
        if issubclass(annotation, ChildType):
            return f"{annotation.kind} component {{type: <id>, ...}}"
        if issubclass(annotation, BaseModel | Mapping):
            return "mapping"
        if issubclass(annotation, list | tuple | set | frozenset):
            return "list"
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def default_label(value: Any) -> str:
    """A default as YAML would write it (mappings and lists in flow style)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, (dict, list, tuple)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return repr(value)


def param_line(name: str, field: FieldInfo) -> str:
    """``name: type = default — description`` for one parameter."""
    default = "required" if field.is_required() else default_label(field.get_default(call_default_factory=True))
    desc = f" — {field.description}" if field.description else ""
    return f"{field.alias or name}: {type_label(field.annotation, field.metadata)} = {default}{desc}"
