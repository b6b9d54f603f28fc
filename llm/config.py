"""Building the backend configured by the scenario's ``llm:`` block (:func:`build_backend`; see
:mod:`.service`). The block's schema, :class:`LLMConfig`, lives with the scenario schema in
:mod:`recloop.sim.llm_settings` and is re-exported here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from recloop import registry
from recloop.errors import RecloopInputError
from recloop.sim.llm_settings import BudgetConfig, GenerationConfig, LLMConfig

from .surrogate import SurrogateLLM, SurrogateParams
from .types import LLMBackend

__all__ = ["BudgetConfig", "GenerationConfig", "LLMConfig", "build_backend", "load_params_file"]


# ---------------------------------------------------------------------------------------------- backend


def load_params_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Surrogate parameters from a JSON file: either the parameters themselves or an object holding
    them under ``params``/``surrogate``/``surrogate_params`` (what ``recloop llm calibrate`` writes)."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise RecloopInputError(
            "surrogate params_file not found.", file=str(p), key="llm.backend.params_file"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise RecloopInputError(
            f"cannot read surrogate params_file ({exc}).", file=str(p), key="llm.backend.params_file"
        ) from None
    if not isinstance(data, dict):
        raise RecloopInputError(
            "params_file must hold a JSON object.", file=str(p), key="llm.backend.params_file"
        )
    for key in ("params", "surrogate", "surrogate_params"):
        if isinstance(data.get(key), dict):
            data = data[key]
            break

    return {k: v for k, v in data.items() if k in SurrogateParams.model_fields}


def build_backend(cfg: dict[str, Any], *, world=None, timeout_s: float | None = None) -> LLMBackend:
    """Instantiate the configured backend (the surrogate gets the world's titles as its catalog)."""
    cfg = dict(cfg)
    name = registry.get("llm_backend", str(cfg["type"])).name
    if name == "surrogate":

        cfg.pop("type")
        pf = cfg.pop("params_file", None)
        merged = {**(load_params_file(pf) if pf else {}), **cfg}
        titles = world.items.titles if world is not None else None
        return SurrogateLLM(SurrogateParams(**merged), titles=titles)
    spec = registry.get("llm_backend", name)
    if timeout_s is not None and "timeout_s" in spec.params.model_fields and "timeout_s" not in cfg:
        cfg["timeout_s"] = float(timeout_s)
    if name == "transformers":  # one loaded model per process, shared by the runs of a scenario
        key = json.dumps(cfg, sort_keys=True, default=str)
        backend = _SHARED_LOCAL.get(key)
        if backend is None:
            backend = _SHARED_LOCAL[key] = registry.build("llm_backend", cfg)
        return backend
    return registry.build("llm_backend", cfg)


_SHARED_LOCAL: dict[str, LLMBackend] = {}
