"""One LLM service per simulated run: backend + response cache + budget + accounting + failure log.

The scenario's ``llm:`` block (:class:`LLMConfig`) says which backend to use and how::

    llm:
      backend: {type: surrogate, h: 0.1, beta: 0.5}   # or {type: surrogate, params_file: calib.json}
                                                      # or {type: transformers} / {type: openai, ...}
      cache: auto            # on for real models, off for the surrogate (true/false force it)
      cache_dir: null        # default <run_dir>/llm_cache; a shared folder lets runs replay each other
      budget: {max_calls: 5000, max_tokens: null, max_cost_usd: null}
      generation: {max_tokens: 64, temperature: 0.0}
      timeout_s: null        # per request; answers slower than this count as "timeout" failures
      max_output_chars: 2000 # longer answers count as "too_long" failures

Every LLM role (R1 augmenter, R2 profiler, R3 ranker) gets the same :class:`LLMService` through
:func:`get_service`: a shared service of the run's :class:`~recloop.contracts.BuildContext`
(``context.services["llm"]``, one per ``FeedbackLoop``). :meth:`LLMService.generate` returns one
:class:`LLMResponse` per request and never raises for a bad answer: malformed answers come back with
``failed=True`` and ``error`` set to the reason (``empty``, ``too_long``, ``timeout``, ``budget``,
``backend_error``), are counted per role and logged with their prompt to ``<run_dir>/llm_failures.jsonl``.
Roles report parse failures themselves with :meth:`LLMService.log_failure` (reason ``unparsable``) and
count the fallbacks they take with :meth:`LLMService.count_fallback`.

Accounting (:attr:`LLMService.accounting`) is checkpointed with the run (``FeedbackLoop.state()``), so a
resumed run reports the totals of the whole run; the cache makes the replayed part free.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recloop import registry
from recloop.sim.llm_accounting import MALFORMED_REASONS, _new_role

from .cache import Budget, CachedBackend
from .config import LLMConfig, build_backend
from .surrogate import SurrogateLLM
from .types import GenerationParams, LLMBackend, LLMRequest, LLMResponse, as_requests

__all__ = ["LLMService", "get_service", "has_service"]


def _json_safe(x: Any) -> Any:
    """Payload values as exact JSON (numpy arrays -> lists; floats rounded to 6 significant digits so
    that cache keys do not depend on the last bits of a BLAS sum)."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind == "f":
            return [float(f"{v:.6g}") for v in x.tolist()]
        return x.tolist()
    if isinstance(x, (np.floating, float)):
        return float(f"{float(x):.6g}")
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


class LLMService:
    """The run's LLM: ``generate`` / ``loglik`` through the response cache, with accounting per role.

    Parameters
    ----------
    config: the scenario's :class:`LLMConfig`.
    run_dir: the run directory (cache default ``<run_dir>/llm_cache``, failure log
        ``<run_dir>/llm_failures.jsonl``); None keeps both in memory only (no cache unless
        ``cache_dir`` is given).
    seed: the run seed (default decoding seed).
    world: the simulated world (the surrogate reads its titles).
    backend: an already built backend (tests); default: built from ``config.backend``.
    label: who uses it (policy name and seed), written into the failure log.
    """

    def __init__(
        self,
        config: LLMConfig | dict | None = None,
        *,
        run_dir: str | os.PathLike[str] | None = None,
        seed: int = 0,
        world=None,
        backend: LLMBackend | None = None,
        label: str = "",
    ):
        if config is None:
            config = LLMConfig()
        elif isinstance(config, dict):
            config = LLMConfig.model_validate(config)
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.seed = int(seed)
        self.world = world
        self.label = label
        self.inner = (
            backend
            if backend is not None
            else build_backend(config.backend, world=world, timeout_s=config.timeout_s)
        )
        use_cache = config.cache if config.cache != "auto" else not self.inner.uses_payload
        cache_dir = config.cache_dir
        if cache_dir is None and self.run_dir is not None:
            cache_dir = str(self.run_dir / "llm_cache")
        if not use_cache:
            cache_dir = None
        self.cache_dir = cache_dir
        b = config.budget
        budget = Budget(b.max_calls, b.max_tokens, b.max_cost_usd) if b is not None else None
        self.backend = CachedBackend(self.inner, cache_dir, budget)
        g = config.generation
        self.params = GenerationParams(
            max_tokens=g.max_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            seed=self.seed if g.seed is None else int(g.seed),
        )
        self.roles: dict[str, dict[str, Any]] = {}
        self.malformed = dict.fromkeys(MALFORMED_REASONS, 0)
        self.fallbacks = 0
        self.requests = 0
        self.logged = 0
        self.failure_records: list[dict[str, Any]] = []  # in-memory copy of the last failures (tests)
        self._base = self._zero_base()
        self._lock = threading.RLock()
        self._catalog_fp: tuple[int, Any, str, str] | None = None
        self.step: int | None = None  # roles may set the current cycle (written into the failure log)

    def bind_world(self, world) -> None:
        """Follow the live world (a resumed run replaces the world object with the checkpoint's): the
        catalog fingerprint comes from it, and so does the surrogate's catalog, cut to the size it was
        built with (as in an uninterrupted run, later phantom or creator items stay unknown to it)."""
        if world is None or world is self.world:
            return
        self.world = world
        self._catalog_fp = None

        if isinstance(self.inner, SurrogateLLM):
            self.inner.bind_catalog(world.items.titles)

    def on_restore(self) -> None:
        """After a resume replaced the world: re-read the catalog through the bound view."""
        view, self.world = self.world, None
        self.bind_world(view)

    def manifest(self) -> dict[str, Any]:
        """The run manifest's entry: ``{"llm": accounting}``."""
        return {"llm": self.accounting}

    # -- facts -------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def uses_payload(self) -> bool:
        """True for the surrogate: requests must carry the structured ``payload`` (roles may then
        skip building long prompts, which the surrogate does not read)."""
        return bool(self.inner.uses_payload)

    @property
    def supports_loglik(self) -> bool:
        """Whether ``loglik`` is available (the surrogate has none: use a ``rank`` request instead)."""
        return bool(self.inner.supports_loglik)

    def catalog_fingerprint(self) -> str:
        """A short hash of the current catalog titles (put in surrogate payloads so cache keys change
        when the catalog does). Catalogs only grow by appending, so the hash is extended with the new
        titles (the first title guards against a replaced catalog)."""
        titles = self.world.items.titles if self.world is not None else []
        n = len(titles)
        st = self._catalog_fp
        first = str(titles[0]) if n else ""
        if st is None or st[0] > n or st[3] != first:
            st = (0, hashlib.sha256(), "", first)
        if st[0] != n or not st[2]:
            h = st[1]
            for t in titles[st[0] : n]:
                h.update(str(t).encode("utf-8", "replace"))
                h.update(b"\x00")
            st = (n, h, h.copy().hexdigest()[:16], first)
            self._catalog_fp = st
        return st[2]

    def _role(self, role: str) -> dict[str, Any]:
        d = self.roles.get(role)
        if d is None:
            d = self.roles[role] = _new_role()
        return d

    # -- generation --------------------------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[LLMRequest | str],
        role: str,
        *,
        step: int | None = None,
        params: GenerationParams | None = None,
    ) -> list[LLMResponse]:
        """One response per request, through the cache and the budget, never raising for bad answers.

        Responses that cannot be used come back with ``failed=True`` and ``error`` one of ``empty``,
        ``too_long``, ``timeout``, ``budget``, ``backend_error`` (counted and logged here). Payload
        arrays are converted to JSON (so cache keys are exact and stable).
        """
        reqs = as_requests(requests)
        if not reqs:
            return []
        if step is not None:
            self.step = step
        if self.uses_payload and self.backend.cache is not None:  # exact, stable cache keys
            reqs = [LLMRequest(r.prompt, r.task, _json_safe(r.payload)) for r in reqs]
        acc = self.backend.accounting
        before = (acc.calls, acc.cache_hits, acc.prompt_tokens, acc.completion_tokens, acc.wall_s)
        t0 = time.perf_counter()
        try:
            responses = self.backend.generate(reqs, params or self.params)
        except Exception as exc:  # noqa: BLE001 - a backend crash must not end the run
            err = f"backend_error: {type(exc).__name__}: {exc}"
            responses = [LLMResponse.failure(err) for _ in reqs]
        wall = time.perf_counter() - t0
        r = self._role(role)
        with self._lock:
            self.requests += len(reqs)
            r["requests"] += len(reqs)
            r["calls"] += acc.calls - before[0]
            r["cache_hits"] += acc.cache_hits - before[1]
            r["prompt_tokens"] += acc.prompt_tokens - before[2]
            r["completion_tokens"] += acc.completion_tokens - before[3]
            r["wall_s"] += wall
        out: list[LLMResponse] = []
        limit = self.config.max_output_chars
        tmo = self.config.timeout_s
        for req, resp in zip(reqs, responses, strict=True):
            reason = None
            if resp.failed:
                e = (resp.error or "").lower()
                if "budget" in e:
                    reason = "budget"
                elif "timeout" in e or "timed out" in e:
                    reason = "timeout"
                else:
                    reason = "backend_error"
            elif tmo is not None and resp.wall_s > tmo:  # cached answers keep their wall time: replays agree
                reason = "timeout"
            elif not (resp.text or "").strip():
                reason = "empty"
            elif len(resp.text) > limit:
                reason = "too_long"
            if reason is not None:
                self.log_failure(role, reason, req.prompt, resp.text, error=resp.error, payload=req.payload)
                resp = LLMResponse(
                    text=resp.text,
                    prompt_tokens=resp.prompt_tokens,
                    completion_tokens=resp.completion_tokens,
                    failed=True,
                    error=reason,
                    cached=resp.cached,
                    wall_s=resp.wall_s,
                )
            out.append(resp)
        return out

    def loglik(
        self, prompts: Sequence[str], continuations: Sequence[str], role: str, *, step: int | None = None
    ) -> np.ndarray:
        """Log-likelihoods (nats) of each continuation given its prompt; NaN where unavailable
        (budget spent, backend error: counted and logged once per call)."""
        n = len(prompts)
        if n == 0:
            return np.zeros(0)
        if step is not None:
            self.step = step
        acc = self.backend.accounting
        before = (acc.calls, acc.cache_hits, acc.budget_denied, acc.wall_s)
        t0 = time.perf_counter()
        err = ""
        try:
            vals = np.asarray(self.backend.loglik(list(prompts), list(continuations)), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001
            vals = np.full(n, np.nan)
            err = f"{type(exc).__name__}: {exc}"
        wall = time.perf_counter() - t0
        r = self._role(role)
        with self._lock:
            self.requests += n
            r["requests"] += n
            r["calls"] += acc.calls - before[0]
            r["cache_hits"] += acc.cache_hits - before[1]
            r["wall_s"] += wall
        bad = np.flatnonzero(~np.isfinite(vals))
        if len(bad):
            denied = acc.budget_denied - before[2]
            for j, i in enumerate(bad.tolist()):
                reason = (
                    "budget"
                    if j >= len(bad) - denied
                    else ("timeout" if "timeout" in err.lower() else "backend_error")
                )
                self.log_failure(
                    role, reason, prompts[i], "", error=err or "nan loglik", continuation=continuations[i]
                )
        return vals

    # -- failures ----------------------------------------------------------------------------------
    def log_failure(
        self, role: str, reason: str, prompt: str, text: str, *, error: str = "", **extra: Any
    ) -> None:
        """Count a malformed answer and append it (with its prompt) to ``<run_dir>/llm_failures.jsonl``."""
        reason = str(getattr(reason, "value", reason))
        r = self._role(role)
        with self._lock:
            self.malformed[reason] = self.malformed.get(reason, 0) + 1
            r["malformed"][reason] = r["malformed"].get(reason, 0) + 1
            r["failures"] += 1
            if self.logged >= self.config.max_failure_log:
                return
            self.logged += 1
            rec = {
                "policy": self.label,
                "step": self.step,
                "role": role,
                "reason": reason,
                "error": error,
                "prompt": str(prompt)[:4000],
                "text": str(text or "")[:4000],
            }
            for k, v in extra.items():
                if k == "payload" and isinstance(v, dict):
                    v = {kk: vv for kk, vv in v.items() if kk in ("task", "user", "seed", "n", "catalog")}
                rec[k] = _json_safe(v)
            self.failure_records.append(rec)
            if len(self.failure_records) > 200:
                del self.failure_records[:100]
            if self.run_dir is not None:
                try:
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                    with open(self.run_dir / "llm_failures.jsonl", "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
                except OSError:  # a full disk must not end the run either
                    pass

    def count_fallback(self, role: str, n: int = 1) -> None:
        """Record that a role used its documented fallback ``n`` times (R1: no augmentation for a user;
        R3: the base order)."""
        with self._lock:
            self.fallbacks += int(n)
            self._role(role)["fallbacks"] += int(n)

    # -- accounting --------------------------------------------------------------------------------
    @staticmethod
    def _zero_base() -> dict[str, Any]:
        return {
            "calls": 0,
            "cache_hits": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "backend_failures": 0,
            "wall_s": 0.0,
            "cost_usd": 0.0,
            "budget_denied": 0,
            "budget_exhausted": False,
        }

    @property
    def accounting(self) -> dict[str, Any]:
        """Totals of this run: calls (sent to the model), cache hits, tokens, failures (malformed
        answers of any reason), wall time, cost, budget state, malformed counts by reason, per role."""
        a = self.backend.accounting
        base = self._base
        return {
            "backend": self.name,
            "model": self.model_id,
            "requests": self.requests,
            "calls": base["calls"] + a.calls,
            "cache_hits": base["cache_hits"] + a.cache_hits,
            "prompt_tokens": base["prompt_tokens"] + a.prompt_tokens,
            "completion_tokens": base["completion_tokens"] + a.completion_tokens,
            "failures": int(sum(self.malformed.values())),
            "backend_failures": base["backend_failures"] + a.failures,
            "fallbacks": self.fallbacks,
            "wall_s": round(base["wall_s"] + a.wall_s, 6),
            "cost_usd": base["cost_usd"] + a.cost_usd,
            "budget_exhausted": bool(base["budget_exhausted"] or a.budget_exhausted),
            "budget_denied": base["budget_denied"] + a.budget_denied,
            "malformed": dict(self.malformed),
            "roles": copy.deepcopy(self.roles),
        }

    def run_report(self) -> dict[str, Any]:
        """For the run manifest: ``{"llm": accounting}``."""
        return {"llm": self.accounting}

    def state_dict(self) -> dict[str, Any]:
        """Accounting, failure-log count and the backend's own state (the surrogate's catalog digest and
        fabricated-title pools: they shape later answers, so a resume must not rebuild them differently)."""
        acc = self.accounting
        save = getattr(self.inner, "state_dict", None)
        return {"accounting": acc, "logged": self.logged, "backend": save() if callable(save) else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the totals of a checkpoint: the model's counters continue from them (the budget
        too: calls spent before the checkpoint stay spent), and the backend's state (the bound world first)."""
        acc = state.get("accounting") or {}
        a = self.backend.accounting
        with a._lock:
            a.calls = int(acc.get("calls", 0))
            a.cache_hits = int(acc.get("cache_hits", 0))
            a.prompt_tokens = int(acc.get("prompt_tokens", 0))
            a.completion_tokens = int(acc.get("completion_tokens", 0))
            a.failures = int(acc.get("backend_failures", 0))
            a.wall_s = float(acc.get("wall_s", 0.0))
            a.cost_usd = float(acc.get("cost_usd", 0.0))
            a.budget_exhausted = bool(acc.get("budget_exhausted", False))
            a.budget_denied = int(acc.get("budget_denied", 0))
        self._base = self._zero_base()
        self.requests = int(acc.get("requests", 0))
        self.fallbacks = int(acc.get("fallbacks", 0))
        self.malformed = {**dict.fromkeys(MALFORMED_REASONS, 0), **(acc.get("malformed") or {})}
        self.roles = copy.deepcopy(acc.get("roles") or {})
        self.logged = int(state.get("logged", 0))
        load = getattr(self.inner, "load_state_dict", None)
        if state.get("backend") is not None and callable(load):
            load(state["backend"])

    def close(self) -> None:
        self.backend.close()


# ------------------------------------------------------------------------------------------ per run


def _scenario_llm(context) -> LLMConfig:
    sc = getattr(context, "scenario", None)
    cfg = getattr(sc, "llm", None) if sc is not None else None
    if cfg is None:
        return LLMConfig()
    if isinstance(cfg, LLMConfig):
        return cfg
    if hasattr(cfg, "model_dump"):
        cfg = cfg.model_dump()
    return LLMConfig.model_validate(cfg)


SERVICE = "llm"


def new_service(context) -> LLMService:
    """A new :class:`LLMService` for a run, from the scenario's ``llm:`` block in the build context."""
    return LLMService(
        _scenario_llm(context),
        run_dir=context.run_dir,
        seed=context.seed,
        world=context.view,
        label=f"{context.name}/seed={context.seed}",
    )


registry.register_service(SERVICE, new_service)


def get_service(context) -> LLMService:
    """The run's :class:`LLMService`: a shared service of the build context (``context.services["llm"]``),
    built on first use from the scenario's ``llm:`` block, so every LLM stage of a run shares it."""
    return context.service(SERVICE, lambda: new_service(context))


def has_service(context) -> bool:
    """Whether an LLM stage of this run has created the service."""
    return context is not None and SERVICE in getattr(context, "services", {})
