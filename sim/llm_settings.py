"""The scenario's ``llm:`` block (:class:`LLMConfig`: backend, cache, budget, decoding, output limits).

The schema lives with the scenario schema (the ``sim`` layer); the LLM layer builds the backend and the
service from it (:mod:`recloop.llm.config`, :mod:`recloop.llm.service`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from recloop import registry
from recloop.limits import MAX_BUDGET, MAX_SAMPLE, MAX_TOKENS, Seed
from recloop.registry import Params

__all__ = ["BudgetConfig", "GenerationConfig", "LLMConfig"]


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
