"""LLM roles for recloop: backends (a real local model, OpenAI-compatible servers), a response
cache with budgets, and the parsing/matching of LLM output to catalog items.

Importing this package is cheap: torch, transformers and httpx are imported only when a backend
is used. Importing it also registers the ``llm_backend`` components (``transformers``, ``openai``).
"""

from __future__ import annotations

import importlib
import importlib.util

from .backend_http import OpenAIBackend
from .backend_local import TransformersBackend, find_smollm2_gguf
from .backends import LLMBackend, LLMCapabilityError
from .cache import Accounting, Budget, CachedBackend, ResponseCache
from .types import GenerationParams, LLMRequest, LLMResponse

# Sibling modules that register components of their own (written separately); import them when present.
for _mod in ("surrogate",):
    if importlib.util.find_spec(f"{__name__}.{_mod}") is not None:
        importlib.import_module(f"{__name__}.{_mod}")
del _mod

__all__ = [
    "Accounting",
    "Budget",
    "CachedBackend",
    "GenerationParams",
    "LLMBackend",
    "LLMCapabilityError",
    "LLMRequest",
    "LLMResponse",
    "OpenAIBackend",
    "ResponseCache",
    "TransformersBackend",
    "find_smollm2_gguf",
]
