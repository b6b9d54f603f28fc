"""LLM accounting of a run (requests, calls, cache hits, tokens, failures and fallbacks, per role) and
its sum over runs (the manifest's top-level ``llm``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["MALFORMED_REASONS", "empty_accounting", "sum_accounting"]

#: Reasons an answer could not be used (``backend_error``: an HTTP error or a backend exception).
MALFORMED_REASONS = ("empty", "unparsable", "too_long", "timeout", "budget", "backend_error")

_ROLE_KEYS = (
    "requests",
    "calls",
    "cache_hits",
    "prompt_tokens",
    "completion_tokens",
    "wall_s",
    "failures",
    "fallbacks",
)



def empty_accounting() -> dict[str, Any]:
    """The accounting object of a run that made no LLM requests."""
    return {
        "backend": None,
        "model": None,
        "requests": 0,
        "calls": 0,
        "cache_hits": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "failures": 0,
        "backend_failures": 0,
        "fallbacks": 0,
        "wall_s": 0.0,
        "cost_usd": 0.0,
        "budget_exhausted": False,
        "budget_denied": 0,
        "malformed": dict.fromkeys(MALFORMED_REASONS, 0),
        "roles": {},
    }


def sum_accounting(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sum accounting objects (the manifest's top-level ``llm`` over its runs)."""
    out = empty_accounting()
    backends, models = set(), set()
    for a in items:
        if not a:
            continue
        for k, v in a.items():
            if k in ("backend", "model"):
                if v:
                    (backends if k == "backend" else models).add(str(v))
            elif k == "budget_exhausted":
                out[k] = bool(out[k] or v)
            elif k == "malformed":
                for r, n in (v or {}).items():
                    out["malformed"][r] = out["malformed"].get(r, 0) + n
            elif k == "roles":
                _add_roles(out["roles"], v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    out["backend"] = ",".join(sorted(backends)) or None
    out["model"] = ",".join(sorted(models)) or None
    out["wall_s"] = round(float(out["wall_s"]), 6)
    return out


def _add_roles(dst_roles: dict[str, Any], roles: dict[str, Any] | None) -> None:
    """Add one accounting object's per-role counters into ``dst_roles`` (sum_accounting's ``roles``)."""
    for role, d in (roles or {}).items():
        dst = dst_roles.setdefault(role, {})
        for kk, vv in d.items():
            if isinstance(vv, dict):
                sub = dst.setdefault(kk, {})
                for r, n in vv.items():
                    sub[r] = sub.get(r, 0) + n
            elif isinstance(vv, (int, float)) and not isinstance(vv, bool):
                dst[kk] = dst.get(kk, 0) + vv


def _new_role() -> dict[str, Any]:
    d: dict[str, Any] = dict.fromkeys(_ROLE_KEYS, 0)
    d["wall_s"] = 0.0
    d["malformed"] = dict.fromkeys(MALFORMED_REASONS, 0)
    return d
