"""Plain data types shared by every LLM backend (requests, responses, generation parameters)
and the abstract :class:`LLMBackend` interface.

Nothing here imports torch, transformers or httpx, so these types are cheap to use everywhere
(surrogate backends, caches, parsers, tests that run without a model).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from recloop.component import Component


@dataclass
class LLMRequest:
    """One prompt for an LLM.

    ``task`` names the role that produced it (``generate``, ``rerank``, ``profile``, ...).
    ``payload`` carries structured fields that a surrogate backend uses (user id, candidate ids,
    relevance, popularity); real backends ignore it and see only ``prompt``.
    """

    prompt: str
    task: str = "generate"
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class LLMResponse:
    """What a backend returned for one request.

    A failed request never raises: it comes back with ``failed=True`` and a short ``error`` code
    (``timeout``, ``http_503``, ``budget_exhausted``, ...) and empty ``text``.
    ``cached`` is True when the response was replayed from a :class:`ResponseCache`.
    """

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failed: bool = False
    error: str = ""
    cached: bool = False
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LLMResponse:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        return cls(**known)

    @classmethod
    def failure(cls, error: str, wall_s: float = 0.0) -> LLMResponse:
        """A failed response with an error code and no text."""
        return cls(text="", failed=True, error=error, wall_s=wall_s)


@dataclass(frozen=True)
class GenerationParams:
    """Decoding parameters. ``temperature == 0`` means greedy decoding (``seed`` is then irrelevant
    for the text but still part of the cache key)."""

    max_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if int(self.max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """True when decoding is deterministic argmax (temperature 0)."""
        return self.temperature == 0.0

    def key(self) -> dict[str, Any]:
        """A stable, JSON-serialisable dict (sorted keys, canonical number types) for hashing."""
        return {
            "max_tokens": int(self.max_tokens),
            "seed": int(self.seed),
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
        }


def as_requests(items: Sequence[LLMRequest | str]) -> list[LLMRequest]:
    """Accept plain prompt strings where requests are expected."""
    return [it if isinstance(it, LLMRequest) else LLMRequest(prompt=str(it)) for it in items]


class LLMBackend(Component, abc.ABC):
    """A batched text generator with log-likelihood scoring.

    Subclasses set ``name`` and ``model_id`` (both enter cache keys) and implement
    :meth:`generate` and :meth:`loglik`. ``uses_payload`` is True for backends whose output depends
    on ``LLMRequest.payload``/``task`` (surrogates), so that caches key on them too.
    """

    name: str = "base"
    uses_payload: bool = False
    #: whether :meth:`loglik` can work; False means it raises NotImplementedError (roles then use
    #: ``rank`` requests). A remote backend may still find its server refusing (LLMCapabilityError).
    supports_loglik: bool = True

    @property
    @abc.abstractmethod
    def model_id(self) -> str:
        """A stable identifier of the model (enters cache keys)."""

    @abc.abstractmethod
    def generate(self, requests: Sequence[LLMRequest], params: GenerationParams) -> list[LLMResponse]:
        """One response per request, in order. Per-request failures come back with ``failed=True``."""

    @abc.abstractmethod
    def loglik(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Sum log-probability (nats) of each continuation given its prompt (raw text, no template)."""

    def _take_params(self, params, fields: dict[str, Any]):
        """Accept ``Backend(Backend.Params(...))`` or ``Backend(field=value, ...)`` (or both: keywords win);
        an unknown keyword is a TypeError naming the parameters. Sets ``self.params``."""
        unknown = sorted(set(fields) - set(self.Params.model_fields))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown parameters {unknown}; its parameters are "
                            f"{', '.join(self.Params.model_fields)}")
        if params is None:
            params = self.Params(**fields)
        elif not isinstance(params, self.Params):
            params = self.Params(**{**dict(params), **fields})
        elif fields:
            params = params.model_copy(update=fields)
        Component.__init__(self, params)
        return params

    def state_dict(self) -> dict[str, Any]:
        """Run state to checkpoint: none by default (weights and connections are not run state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless by default
        """Restore :meth:`state_dict`."""

    def cost_usd(self, response: LLMResponse) -> float:
        """The price of one response (0 for local models)."""
        return 0.0

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release resources (threads, connections). Safe to call twice."""

    def __enter__(self) -> LLMBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["GenerationParams", "LLMBackend", "LLMRequest", "LLMResponse", "as_requests"]
