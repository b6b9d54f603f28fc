"""Conformance checks of LLM backends (see :mod:`recloop.conformance`).

Every backend is built from its Params and bound like any component, then generates for a small batch
of prompts: one response per request, in order, text returned, requests left unmodified, the same text
again under greedy decoding, token counts and cost sane, log-likelihoods finite where supported, state
through the safe checkpoint format, ``close`` safe to call twice. A backend that needs a resource names
how to reach it in ``conformance_setup`` (a context manager yielding its example params): the
``openai`` backend is checked against a local OpenAI-compatible server around the surrogate; the
``transformers`` backend loads the installed SmolLM2 model.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

from recloop import registry
from recloop.conformance_base import (
    check_contract,
    check_state_roundtrip,
    example_config,
    passed,
    tiny_context,
    tiny_state,
    tiny_world,
)
from recloop.llm.backends import LLMCapabilityError
from recloop.llm.openai_stub import OpenAICompatServer
from recloop.llm.surrogate import SurrogateLLM
from recloop.llm.types import GenerationParams, LLMBackend, LLMRequest, LLMResponse

PROMPTS = ["A user enjoyed Toy Story and Heat. Recommend 3 movies.", "Name one science fiction film."]
GREEDY = GenerationParams(max_tokens=12, temperature=0.0, seed=0)


@contextlib.contextmanager
def _setup(name: str, params: dict | None) -> Iterator[dict]:
    """Example params for backend ``name``: its ``conformance_setup`` (a context manager) if it has one."""
    cls = registry.get("llm_backend", name).cls
    setup = getattr(cls, "conformance_setup", None) or SETUPS.get(name)
    if params is not None or setup is None:
        yield example_config("llm_backend", name, params)
        return
    with setup() as extra:
        yield example_config("llm_backend", name, extra)


@contextlib.contextmanager
def openai_stub() -> Iterator[dict]:
    """Params of the ``openai`` backend pointed at a local OpenAI-compatible server over the surrogate."""
    _, world = tiny_world(0)
    with OpenAICompatServer(SurrogateLLM(titles=list(world.items.titles)), model_name="surrogate") as srv:
        yield {"base_url": srv.url, "model": "surrogate", "timeout_s": 30.0}


#: built-in backends that need a resource to be checked
SETUPS = {"openai": openai_stub}


def check_llm_backend(name: str, params: dict | None = None, seed: int = 9) -> None:
    gen, world = tiny_world(seed)
    with _setup(name, params) as cfg:
        ctx = tiny_context(seed, tiny_state(world), gen)
        backend = check_contract("llm_backend", name, cfg, ctx)
        assert isinstance(backend, LLMBackend), f"llm_backend {name}: must subclass recloop.llm.types.LLMBackend"
        try:
            _check_generation(name, backend)
            _check_loglik(name, backend)
            check_state_roundtrip("llm_backend", name, backend, lambda: registry.build("llm_backend", cfg, ctx))
        finally:
            backend.close()
            backend.close()
        passed("close() is safe to call twice")


def _check_generation(name: str, backend: LLMBackend) -> None:
    assert isinstance(backend.model_id, str) and backend.model_id, f"llm_backend {name}: model_id must be a string"
    passed("model_id is a non-empty string")
    reqs = [LLMRequest(p) for p in PROMPTS]
    before = copy.deepcopy(reqs)
    out = backend.generate(reqs, GREEDY)
    assert reqs == before, f"llm_backend {name}: generate() modified its requests"
    passed("requests left unmodified")
    assert len(out) == len(reqs) and all(isinstance(r, LLMResponse) for r in out), \
        f"llm_backend {name}: generate() must return one LLMResponse per request"
    assert all(isinstance(r.text, str) and not r.failed for r in out), f"llm_backend {name}: a request failed"
    assert all(r.prompt_tokens >= 0 and r.completion_tokens >= 0 for r in out), f"llm_backend {name}: token counts"
    passed("one response per request, in order, with text and token counts")
    again = backend.generate(list(reversed(reqs)), GREEDY)[::-1]
    assert [r.text for r in again] == [r.text for r in out], f"llm_backend {name}: greedy decoding not deterministic"
    passed("seeded determinism")  # greedy decoding, independent of batch order
    cost = [backend.cost_usd(r) for r in out]
    assert all(isinstance(c, float) and c >= 0 and math.isfinite(c) for c in cost), f"llm_backend {name}: cost"
    passed("cost per response is a finite float >= 0")


def _check_loglik(name: str, backend: LLMBackend) -> None:
    """A backend that declares no log-likelihoods (``supports_loglik = False``) must raise
    NotImplementedError; one that declares them must return them, or (a remote backend) say with
    LLMCapabilityError that its server refuses."""
    try:
        ll = backend.loglik(["The capital of France is"], [" Paris"])
    except NotImplementedError:
        assert not backend.supports_loglik, f"llm_backend {name}: declares supports_loglik but raised"
        passed("loglik: declared unsupported, and raises NotImplementedError")
        return
    except LLMCapabilityError:
        assert backend.supports_loglik, f"llm_backend {name}: declares no loglik but raised LLMCapabilityError"
        passed("loglik: the server refuses it, said with LLMCapabilityError")
        return
    assert backend.supports_loglik, f"llm_backend {name}: declares supports_loglik = False but returned values"
    assert len(ll) == 1 and all(isinstance(v, float) and math.isfinite(v) and v <= 0 for v in ll), \
        f"llm_backend {name}: loglik must return one finite log-probability <= 0 per prompt"
    passed("loglik: one finite log-probability per prompt")


CHECKS = {"llm_backend": check_llm_backend}
