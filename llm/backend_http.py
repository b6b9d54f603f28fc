"""Any OpenAI-compatible LLM server over HTTP (see :mod:`.backends`).

``httpx`` is imported lazily, so importing this module is cheap and works without the ``llm`` extra.

* :class:`OpenAIBackend` talks to ``/v1/chat/completions`` (and ``/v1/completions`` with
  ``echo``/``logprobs`` for :meth:`~LLMBackend.loglik`) with retries, back-off, a concurrency limit
  and cost accounting. Per-request failures (timeouts, 5xx after retries) come back as
  ``LLMResponse(failed=True, error=...)``; they never raise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import Field

from recloop.limits import MAX_ITERATIONS, MAX_THREADS
from recloop.registry import Params as _ParamsBase
from recloop.registry import register as _register

from .backends import LLMCapabilityError, _check_pairs
from .types import GenerationParams, LLMBackend, LLMRequest, LLMResponse, as_requests

log = logging.getLogger(__name__)



class _Retryable(Exception):
    def __init__(self, error: str, retry_after: float | None = None):
        super().__init__(error)
        self.error = error
        self.retry_after = retry_after


@_register("llm_backend", "openai")
class OpenAIBackend(LLMBackend):
    """Any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama, ...) over HTTP with
    ``httpx``: a thread pool of ``concurrency`` workers, exponential back-off on connection errors,
    5xx and 429, timeouts returned as ``failed`` responses, and cost accounting.

    ``loglik`` uses ``/v1/completions`` with ``echo`` and ``logprobs`` and sums the logprobs of the
    tokens that overlap the continuation. Caveat: llama-cpp-python's server (0.3.x) reports echo
    logprobs shifted by one token for models without a BOS token, such as SmolLM2
    (abetlen/llama-cpp-python#1983), so its scores are wrong there; generation is unaffected."""

    name = "openai"

    class Params(_ParamsBase):
        base_url: str
        """Server root, with or without the trailing ``/v1``."""
        model: str
        api_key_env: str = "OPENAI_API_KEY"
        """Environment variable holding the API key (no Authorization header when it is unset)."""
        timeout_s: float = Field(30.0, gt=0)
        max_retries: int = Field(3, ge=0, le=MAX_ITERATIONS)
        backoff_s: float = Field(0.5, ge=0)
        concurrency: int = Field(4, ge=1, le=MAX_THREADS)
        price_per_1k_prompt: float = Field(0.0, ge=0)
        price_per_1k_completion: float = Field(0.0, ge=0)
        system_prompt: str | None = None
        retry_on_timeout: bool = False
        """Timeouts are final by default (a slow server would otherwise cost timeout × retries)."""

    def __init__(self, params: OpenAIBackend.Params | None = None, **fields: Any):
        params = self._take_params(params, fields)
        import httpx

        root = params.base_url.rstrip("/")
        self.base_url = root if root.endswith("/v1") else root + "/v1"
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(params.api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        n = params.concurrency
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(params.timeout_s), limits=limits)
        self._pool = ThreadPoolExecutor(max_workers=params.concurrency, thread_name_prefix="recloop-llm")
        self._cost_lock = threading.Lock()
        self.total_cost_usd = 0.0
        self.retries = 0

    @property
    def model_id(self) -> str:
        return self.params.model

    def cost_usd(self, response: LLMResponse) -> float:
        p = self.params
        return response.prompt_tokens / 1000 * p.price_per_1k_prompt + (
            response.completion_tokens / 1000 * p.price_per_1k_completion
        )

    # -- HTTP with retries ---------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries; returns the JSON body or raises ``_Retryable``/``LLMCapabilityError``."""
        import httpx

        p = self.params
        last: _Retryable | None = None
        for attempt in range(p.max_retries + 1):
            if attempt:
                with self._cost_lock:
                    self.retries += 1
                delay = p.backoff_s * 2 ** (attempt - 1)
                if last is not None and last.retry_after is not None:
                    delay = max(delay, min(last.retry_after, 60.0))
                time.sleep(delay)
            try:
                resp = self._client.post(self.base_url + path, content=json.dumps(body))
            except httpx.TimeoutException:
                last = _Retryable("timeout")
                if not p.retry_on_timeout:
                    break
                continue
            except httpx.TransportError as exc:
                last = _Retryable(f"connection_error: {type(exc).__name__}")
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                after = resp.headers.get("retry-after")
                try:
                    wait = float(after) if after is not None else None
                except ValueError:
                    wait = None
                last = _Retryable(f"http_{resp.status_code}", wait)
                continue
            if resp.status_code >= 400:
                raise _Retryable(f"http_{resp.status_code}: {resp.text[:200]}")
            try:
                return resp.json()
            except ValueError as exc:
                raise _Retryable("bad_response: not JSON") from exc
        assert last is not None
        raise last

    def _one(self, req: LLMRequest, params: GenerationParams) -> LLMResponse:
        t0 = time.perf_counter()
        messages = []
        if self.params.system_prompt is not None:
            messages.append({"role": "system", "content": self.params.system_prompt})
        messages.append({"role": "user", "content": req.prompt})
        body = {
            "model": self.params.model,
            "messages": messages,
            "max_tokens": int(params.max_tokens),
            "temperature": float(params.temperature),
            "top_p": float(params.top_p),
            "seed": int(params.seed),
        }
        try:
            data = self._post("/chat/completions", body)
            choice = data["choices"][0]
            text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
            usage = data.get("usage") or {}
        except _Retryable as exc:
            return LLMResponse.failure(exc.error, wall_s=time.perf_counter() - t0)
        except (KeyError, IndexError, TypeError, AttributeError):
            return LLMResponse.failure("bad_response: no choices", wall_s=time.perf_counter() - t0)
        out = LLMResponse(
            text=str(text),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            wall_s=time.perf_counter() - t0,
        )
        with self._cost_lock:
            self.total_cost_usd += self.cost_usd(out)
        return out

    def generate(self, requests: Sequence[LLMRequest | str], params: GenerationParams) -> list[LLMResponse]:
        reqs = as_requests(requests)
        return list(self._pool.map(lambda r: self._one(r, params), reqs))

    # -- scoring -------------------------------------------------------------------------------

    def _loglik_one(self, prompt: str, continuation: str) -> float:
        text = prompt + continuation
        body = {
            "model": self.params.model,
            "prompt": text,
            "max_tokens": 1,
            "temperature": 0.0,
            "echo": True,
            "logprobs": 1,
        }
        try:
            data = self._post("/completions", body)
        except _Retryable as exc:
            if exc.error.startswith(("http_404", "http_400", "http_405", "http_422", "http_501")):
                raise LLMCapabilityError(
                    f"the server at {self.base_url} refused /v1/completions with echo+logprobs "
                    f"({exc.error}); loglik needs a server that supports it (e.g. vLLM) or the "
                    f"transformers backend.",
                    key="llm_backend",
                ) from exc
            log.warning("loglik request failed: %s", exc.error)
            return math.nan
        try:
            lp = data["choices"][0]["logprobs"]
            tokens, offsets, values = lp["tokens"], lp["text_offset"], lp["token_logprobs"]
        except (KeyError, IndexError, TypeError) as exc:
            raise LLMCapabilityError(
                f"the server at {self.base_url} returned no echoed token logprobs from /v1/completions; "
                f"loglik is not supported there.",
                key="llm_backend",
            ) from exc
        if not offsets or offsets[0] != 0:
            raise LLMCapabilityError(
                f"the server at {self.base_url} did not echo the prompt's tokens from /v1/completions "
                f"(echo=true); loglik is not supported there.",
                key="llm_backend",
            )
        total, used = 0.0, 0
        for i, (tk, start, val) in enumerate(zip(tokens, offsets, values, strict=False)):
            end = offsets[i + 1] if i + 1 < len(offsets) else start + len(tk)
            if start >= len(text):  # the generated token after the echo
                break
            if end > len(prompt):
                if val is None:
                    raise LLMCapabilityError("the server gave no logprob for a continuation token.")
                total += float(val)
                used += 1
        return total if used else 0.0

    def loglik(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        _check_pairs(prompts, continuations)
        return list(
            self._pool.map(lambda pc: self._loglik_one(*pc), zip(prompts, continuations, strict=True))
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()


__all__ = ["OpenAIBackend"]
