"""The scenario's ``llm:`` block (:class:`LLMConfig`: backend, cache, budget, decoding, output limits) and
building the configured backend from it (:func:`build_backend`; see :mod:`.service`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from recloop import registry
from recloop.limits import MAX_BUDGET, MAX_SAMPLE, MAX_TOKENS, Seed
from recloop.registry import Params

from .types import LLMBackend

__all__ = ["BudgetConfig", "GenerationConfig", "LLMConfig", "build_backend", "load_params_file"]


class BudgetConfig(Params):
    """Limits on calls to the model (cache hits are free); ``null`` = unlimited. Once spent, further
    requests fail with reason ``budget`` and the roles take their fallbacks; the run goes on."""

    max_calls: int | None = Field(None, ge=0, le=MAX_BUDGET, description="requests sent to the model")
    max_tokens: int | None = Field(None, ge=0, le=MAX_BUDGET, description="prompt + completion tokens")
    max_cost_usd: float | None = Field(None, ge=0, description="cost (paid endpoints)")


class GenerationConfig(Params):
    """Decoding parameters for every generation request."""

    max_tokens: int = Field(64, ge=1, le=MAX_TOKENS, description="new tokens per answer")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Seed | None = Field(None, description="decoding seed; default: the run seed")


class LLMConfig(Params):
    """The scenario's ``llm:`` block: backend, response cache, budget, decoding, output limits."""

    backend: dict = Field(
        default_factory=lambda: {"type": "surrogate"},
        description="an llm_backend component: surrogate (SurrogateParams or params_file: a JSON written "
        "by `recloop llm calibrate`), transformers, openai",
    )
    cache: bool | Literal["auto"] = Field(
        "auto",
        description="keep responses on disk: auto = on for real models, off for the surrogate (which "
        "is deterministic and cheaper to recompute than a file read); true/false force it",
    )
    cache_dir: str | None = Field(None, description="response cache folder; default <run_dir>/llm_cache")
    budget: BudgetConfig | None = None
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    timeout_s: float | None = Field(
        None, gt=0, description="per-request time limit (passed to HTTP backends; slower answers = timeout)"
    )
    max_output_chars: int = Field(2000, ge=1, le=MAX_TOKENS, description="longer answers count as too_long failures")
    max_failure_log: int = Field(
        2000, ge=0, le=MAX_SAMPLE, description="failure lines written per run (all are counted)")

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, v):
        if not isinstance(v, dict) or "type" not in v:
            raise ValueError(
                "must be a mapping with a 'type:' naming an llm_backend; allowed: "
                + ", ".join(registry.names("llm_backend"))
            )
        spec = registry.get("llm_backend", str(v["type"]))
        cfg = {k: val for k, val in v.items() if k not in ("type", "params_file")}
        if "params_file" in v:
            if spec.name != "surrogate":
                raise ValueError("'params_file' is only valid for the surrogate backend")
            if not isinstance(v["params_file"], str):
                raise ValueError("'params_file' must be a path (string)")
        try:
            spec.params.model_validate(cfg)
        except Exception as exc:  # pydantic ValidationError -> one line
            errs = getattr(exc, "errors", lambda: [])()
            detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errs) or str(exc)
            allowed = ", ".join(spec.params.model_fields)
            raise ValueError(
                f"llm_backend '{v['type']}': {detail} (allowed keys: {allowed or 'none'})"
            ) from None
        return v


# ---------------------------------------------------------------------------------------------- backend


def load_params_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Surrogate parameters from a JSON file: either the parameters themselves or an object holding
    them under ``params``/``surrogate``/``surrogate_params`` (what ``recloop llm calibrate`` writes)."""
    from recloop.errors import RecloopInputError

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
    from .surrogate import SurrogateParams

    return {k: v for k, v in data.items() if k in SurrogateParams.model_fields}


def build_backend(cfg: dict[str, Any], *, world=None, timeout_s: float | None = None) -> LLMBackend:
    """Instantiate the configured backend (the surrogate gets the world's titles as its catalog)."""
    cfg = dict(cfg)
    name = registry.get("llm_backend", str(cfg["type"])).name
    if name == "surrogate":
        from .surrogate import SurrogateLLM, SurrogateParams

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
