"""On-disk response cache, call/token/cost accounting and budgets for any :class:`LLMBackend`.

Every response is stored under sha256(backend name, model id, prompt, generation params) as one
JSON file in a sharded folder (``ab/abcdef....json``), written atomically (tmp file + ``os.replace``),
so that runs and tests replay without the model and concurrent writers never leave half files.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import LLMBackend, as_requests
from .types import GenerationParams, LLMRequest, LLMResponse

CACHE_FORMAT = 1


def _digest(fields: dict[str, Any]) -> str:
    blob = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def key_fields(
    backend_name: str,
    model_id: str,
    request: LLMRequest,
    params: GenerationParams,
    *,
    uses_payload: bool = False,
) -> dict[str, Any]:
    """What a generation cache key hashes. ``task``/``payload`` enter only for backends that read them."""
    fields: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "backend": backend_name,
        "model": model_id,
        "prompt": request.prompt,
        "params": params.key(),
    }
    if uses_payload:
        fields["task"] = request.task
        fields["payload"] = request.payload
    return fields


class ResponseCache:
    """A directory of cached responses, one JSON file per key under a two-character shard folder."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    # -- keys ----------------------------------------------------------------------------------

    def key(
        self,
        backend: LLMBackend | str,
        model_id: str | None,
        request: LLMRequest | str,
        params: GenerationParams,
    ) -> str:
        """sha256 hex key of (backend name, model id, prompt, params) for a generation request."""
        req = as_requests([request])[0]
        if isinstance(backend, LLMBackend):
            name, mid, payload = backend.name, backend.model_id, backend.uses_payload
        else:
            name, mid, payload = backend, model_id or "", False
        return _digest(key_fields(name, mid, req, params, uses_payload=payload))

    @staticmethod
    def loglik_key(backend: LLMBackend, prompt: str, continuation: str) -> str:
        """sha256 hex key of a log-likelihood query."""
        return _digest(
            {
                "format": CACHE_FORMAT,
                "backend": backend.name,
                "model": backend.model_id,
                "loglik": [prompt, continuation],
            }
        )

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    # -- raw records ---------------------------------------------------------------------------

    def get_record(self, key: str) -> dict[str, Any] | None:
        """The stored JSON for ``key`` or None (a missing or unreadable file is a miss)."""
        try:
            with open(self.path(key), encoding="utf-8") as fh:
                return json.load(fh)
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def put_record(self, key: str, record: dict[str, Any]) -> None:
        """Write atomically: a temporary file in the same folder, then ``os.replace``."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(record, fh, ensure_ascii=False, sort_keys=True)
        os.replace(tmp, target)

    # -- responses -----------------------------------------------------------------------------

    def get(self, key: str) -> LLMResponse | None:
        rec = self.get_record(key)
        if rec is None or "response" not in rec:
            return None
        resp = LLMResponse.from_dict(rec["response"])
        resp.cached = True
        return resp

    def put(self, key: str, response: LLMResponse, meta: dict[str, Any] | None = None) -> None:
        data = response.to_dict()
        data["cached"] = False
        self.put_record(key, {"response": data, "meta": meta or {}})

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("??/*.json"))


@dataclass
class Budget:
    """Limits on inner-model use; ``None`` means unlimited. Tokens count prompt + completion."""

    max_calls: int | None = None
    max_tokens: int | None = None
    max_cost_usd: float | None = None


@dataclass
class Accounting:
    """Running totals of a :class:`CachedBackend`. ``calls`` counts requests sent to the inner model."""

    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: int = 0
    wall_s: float = 0.0
    cost_usd: float = 0.0
    budget_exhausted: bool = False
    budget_denied: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "cache_hits": self.cache_hits,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "failures": self.failures,
            "wall_s": self.wall_s,
            "cost_usd": self.cost_usd,
        }


class CachedBackend(LLMBackend):
    """Wrap a backend with a :class:`ResponseCache`, :class:`Accounting` and an optional :class:`Budget`.

    Hits are served without the model (``cached=True``); misses go to the inner backend in one
    batch; failed responses are not cached. Once the budget is spent, further misses come back as
    ``LLMResponse(failed=True, error="budget_exhausted")`` without calling the model, and
    ``accounting.budget_exhausted`` turns True. With a token or cost limit, misses are sent in
    chunks of ``chunk_size`` so that the budget is checked between chunks.
    """

    def __init__(
        self,
        backend: LLMBackend,
        cache: ResponseCache | str | os.PathLike[str] | None,
        budget: Budget | None = None,
        *,
        chunk_size: int = 8,
    ):
        self.inner = backend
        self.cache = ResponseCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self.budget = budget or Budget()
        self.accounting = Accounting()
        self.chunk_size = max(1, int(chunk_size))
        self.name = backend.name
        self.uses_payload = backend.uses_payload

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    def cost_usd(self, response: LLMResponse) -> float:
        return self.inner.cost_usd(response)

    # -- budget --------------------------------------------------------------------------------

    def _allowance(self) -> int | None:
        """How many more inner requests the budget allows now (None = unlimited)."""
        b, a = self.budget, self.accounting
        if b.max_tokens is not None and a.prompt_tokens + a.completion_tokens >= b.max_tokens:
            return 0
        if b.max_cost_usd is not None and a.cost_usd >= b.max_cost_usd:
            return 0
        if b.max_calls is not None:
            return max(0, b.max_calls - a.calls)
        return None

    def _metered(self) -> bool:
        return self.budget.max_tokens is not None or self.budget.max_cost_usd is not None

    def _record(self, responses: Sequence[LLMResponse], wall_s: float) -> None:
        a = self.accounting
        with a._lock:
            a.calls += len(responses)
            a.wall_s += wall_s
            for r in responses:
                a.prompt_tokens += r.prompt_tokens
                a.completion_tokens += r.completion_tokens
                a.cost_usd += self.inner.cost_usd(r)
                if r.failed:
                    a.failures += 1

    # -- generation ----------------------------------------------------------------------------

    def generate(self, requests: Sequence[LLMRequest | str], params: GenerationParams) -> list[LLMResponse]:
        reqs = as_requests(requests)
        out: list[LLMResponse | None] = [None] * len(reqs)
        misses: dict[str, list[int]] = {}  # key -> positions (duplicate prompts are sent once)
        for i, req in enumerate(reqs):
            key = self.cache.key(self.inner, None, req, params) if self.cache is not None else f"nocache-{i}"
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                out[i] = hit
            else:
                misses.setdefault(key, []).append(i)
        hits = sum(r is not None for r in out)
        with self.accounting._lock:
            self.accounting.cache_hits += hits

        pending = list(misses.items())
        while pending:
            allowed = self._allowance()
            n = len(pending) if allowed is None else min(len(pending), allowed)
            if self._metered():
                n = min(n, self.chunk_size)
            if n <= 0:
                break
            batch, pending = pending[:n], pending[n:]
            t0 = time.perf_counter()
            responses = self.inner.generate([reqs[pos[0]] for _, pos in batch], params)
            self._record(responses, time.perf_counter() - t0)
            for (key, positions), resp in zip(batch, responses, strict=True):
                if not resp.failed and self.cache is not None:
                    meta = {"backend": self.inner.name, "model": self.inner.model_id}
                    meta.update(prompt=reqs[positions[0]].prompt, params=params.key())
                    self.cache.put(key, resp, meta)
                for pos in positions:
                    out[pos] = resp
        if pending:
            with self.accounting._lock:
                self.accounting.budget_exhausted = True
                self.accounting.budget_denied += sum(len(p) for _, p in pending)
            for _, positions in pending:
                for pos in positions:
                    out[pos] = LLMResponse.failure("budget_exhausted")
        return [r for r in out if r is not None]

    def loglik(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Cached log-likelihoods; misses go to the inner backend in one call (NaN is not cached).
        Budget exhaustion yields NaN for the denied queries."""
        if len(prompts) != len(continuations):
            raise ValueError("loglik needs as many prompts as continuations")
        out: list[float | None] = [None] * len(prompts)
        miss: list[tuple[int, str]] = []
        for i, (p, c) in enumerate(zip(prompts, continuations, strict=True)):
            key = self.cache.loglik_key(self.inner, p, c) if self.cache is not None else ""
            rec = self.cache.get_record(key) if self.cache is not None else None
            if rec is not None and "loglik" in rec:
                out[i] = float(rec["loglik"])
            else:
                miss.append((i, key))
        with self.accounting._lock:
            self.accounting.cache_hits += len(prompts) - len(miss)
        allowed = self._allowance()
        send = miss if allowed is None else miss[:allowed]
        if send:
            t0 = time.perf_counter()
            vals = self.inner.loglik([prompts[i] for i, _ in send], [continuations[i] for i, _ in send])
            with self.accounting._lock:
                self.accounting.calls += len(send)
                self.accounting.wall_s += time.perf_counter() - t0
                self.accounting.failures += sum(v != v for v in vals)
            for (i, key), v in zip(send, vals, strict=True):
                out[i] = v
                if self.cache is not None and v == v:
                    meta = {"prompt": prompts[i], "continuation": continuations[i]}
                    self.cache.put_record(key, {"loglik": v, "meta": meta})
        if len(send) < len(miss):
            with self.accounting._lock:
                self.accounting.budget_exhausted = True
                self.accounting.budget_denied += len(miss) - len(send)
        return [float("nan") if v is None else v for v in out]

    def close(self) -> None:
        self.inner.close()


__all__ = ["Accounting", "Budget", "CachedBackend", "ResponseCache", "key_fields"]
