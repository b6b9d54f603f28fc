"""Turning pydantic validation errors on a scenario into one paragraph naming the file, the full dotted
key and what is allowed (values echoed clipped); plus the int64/finite guard on every number."""

from __future__ import annotations

import math
from typing import Annotated, Any, Union

from pydantic import ValidationError

from recloop import registry
from recloop.errors import RecloopInputError, clip, did_you_mean, echo
from recloop.limits import POLICY_NAME_PATTERN


def _strip_optional(tp):
    """``tp`` without ``Annotated`` wrappers and without ``None`` in a union (``X | None`` -> ``X``)."""
    import types
    import typing

    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _walk(model, loc) -> tuple[list, list[str]]:
    """Follow a pydantic error location through the scenario model.

    Returns the user-facing key path (discriminated-union tags such as ``als`` dropped, dict keys such as
    a policy's name kept) and the field names valid at the last step (for 'did you mean' hints).
    """
    import typing

    cur: Any = model
    clean: list = []
    allowed: list[str] = []
    for part in loc:
        base = _strip_optional(cur)
        if typing.get_origin(base) in (list, dict):  # the part is an index or a key (a policy's name)
            clean.append(part)
            cur = typing.get_args(base)[-1] if typing.get_args(base) else Any
            continue
        members = _models_in(base)
        if isinstance(part, str) and len(members) > 1:  # a discriminated union: the part is the tag
            tagged = [m for m in members if "type" in m.model_fields
                      and typing.get_args(m.model_fields["type"].annotation) == (part,)]
            if tagged:
                cur = tagged[0]
                continue
        clean.append(part)
        if len(members) == 1:
            allowed = [f.alias or n for n, f in members[0].model_fields.items()]
            field = members[0].model_fields.get(part) if isinstance(part, str) else None
            cur = field.annotation if field is not None else Any
        else:
            allowed, cur = [], Any
    return clean, allowed


def _models_in(tp) -> list:
    """The pydantic models a (union) annotation admits, not looking inside lists or dicts."""
    import types
    import typing

    from pydantic import BaseModel

    out, stack = [], [tp]
    while stack:
        t = stack.pop()
        origin = typing.get_origin(t)
        if origin is Annotated:
            stack.append(typing.get_args(t)[0])
        elif origin in (Union, types.UnionType):
            stack.extend(typing.get_args(t))
        elif isinstance(t, type) and issubclass(t, BaseModel):
            out.append(t)
    return out


def _key_text(parts: list) -> str:
    return clip(".".join(str(p) for p in parts) or "(top level)")


def _policy_name_message(loc: list) -> str:
    name = loc[-2] if len(loc) >= 2 else ""
    return (f"key 'policies.{clip(name, 120)}': the policy name {echo(name, 120)} is not allowed: names must match "
            f"{POLICY_NAME_PATTERN[1:-1]} (1 to 100 letters, digits, '_', '.' or '-'), because they name files "
            "of the run directory.")


def _one_error(err: dict, model) -> tuple[str, str]:
    """(dotted key, one sentence) for one pydantic error."""
    loc = list(err["loc"])
    etype = err["type"]
    if loc and loc[-1] == "[key]":
        if len(loc) == 3 and loc[0] == "policies":
            return f"policies.{loc[1]}", _policy_name_message(loc)
        loc = loc[:-1]
    clean, allowed = _walk(model, loc)
    key = _key_text(clean)
    if etype == "extra_forbidden":
        hint = did_you_mean(str(loc[-1]), allowed)
        return key, f"key '{key}' is not allowed here.{hint} Allowed keys: {', '.join(allowed)}."
    if etype in ("union_tag_invalid", "literal_error") and (loc and loc[-1] == "type" or "tag" in etype):
        kind = _kind_at(clean)
        bad = err.get("input")
        bad = bad.get("type") if isinstance(bad, dict) else bad
        opts = registry.names(kind) if kind else []
        if not key.endswith(".type") and key != "type":
            key = f"{key}.type"  # the key that holds the unknown id
        return key, (f"key '{key}': unknown {kind or 'component'} type {echo(bad)}.{did_you_mean(str(bad), opts)} "
                     f"Allowed: {', '.join(opts)}.")
    if etype == "union_tag_not_found":
        kind = _kind_at(clean)
        opts = registry.names(kind) if kind else []
        return key, f"key '{key}' needs a 'type:' naming the component. Allowed types: {', '.join(opts)}."
    if etype == "missing":
        return key, f"key '{key}' is required but missing."
    if not clean and etype == "value_error":  # a check across keys (policy vs policies, ...)
        return key, clip(err["msg"].removeprefix("Value error, "), 600) + "."
    got = err.get("input")
    got_s = "a mapping" if isinstance(got, dict) else echo(got)
    return key, f"key '{key}': {clip(err['msg'].removeprefix('Value error, '), 400)} (got {got_s})."


def format_validation_error(exc: ValidationError, file: str | None, model) -> RecloopInputError:
    """Turn pydantic's errors into one paragraph naming the file, the key and what is allowed.

    Echoed values and keys are cut to about 200 characters, and at most four errors are shown.
    """
    errors = exc.errors()
    msgs = [_one_error(err, model)[1] for err in errors[:4]]
    more = len(errors) - 4
    if more > 0:
        msgs.append(f"({more} more error(s) not shown.)")
    return RecloopInputError(" ".join(msgs), file=file)


_KIND_KEYS = {"world": "world", "policy": "policy", "policies": "policy", "creators": "creator",
              "choice": "choice", "dynamics": "dynamics", "population": "population",
              "retrieval": "policy", "ranker": "policy", "base": "policy", "reranker": "reranker"}


def _kind_at(loc: list) -> str | None:
    for part in reversed([p for p in loc if isinstance(p, str)]):
        if part in _KIND_KEYS:
            return _KIND_KEYS[part]
    return None


def _unregistered_type_key(data: Any) -> str | None:
    """The dotted key of the first ``type:`` naming no registered component (for nested blocks such as a
    pipeline's ``retrieval``, whose validators report an unknown type without its place)."""
    known = {n for kind in registry.KINDS for n in registry.names(kind)}
    stack: list[tuple[list, Any]] = [([], data)]
    while stack:
        path, val = stack.pop()
        if isinstance(val, dict):
            t = val.get("type")
            if isinstance(t, str) and t not in known and not any(n.startswith(f"{t}-v") for n in known):
                return _key_text([*path, "type"])
            stack.extend(reversed([([*path, k], v) for k, v in val.items()]))
        elif isinstance(val, list):
            stack.extend(reversed([([*path, i], v) for i, v in enumerate(val)]))
    return None


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_numbers(data: Any, file: str | None = None) -> None:
    """Refuse integers outside int64 and non-finite floats anywhere in a scenario mapping.

    The schema bounds every known size and count; this guard also covers parameters without a bound
    (a plugin's, say), so ``10**100`` or ``.nan`` is a one-paragraph error, never a crash downstream.
    """
    stack: list[tuple[list, Any]] = [([], data)]
    while stack:
        path, val = stack.pop()
        if isinstance(val, dict):
            stack.extend(([*path, k], v) for k, v in val.items())
        elif isinstance(val, list):
            stack.extend(([*path, i], v) for i, v in enumerate(val))
        elif isinstance(val, int) and not isinstance(val, bool) and not INT64_MIN <= val <= INT64_MAX:
            raise RecloopInputError(f"the number {echo(val)} is out of range; numbers in a scenario must lie "
                                    f"between {INT64_MIN} and {INT64_MAX}.", file=file, key=_key_text(path))
        elif isinstance(val, float) and not math.isfinite(val):
            raise RecloopInputError(f"{val} is not allowed; give a finite number.", file=file, key=_key_text(path))


