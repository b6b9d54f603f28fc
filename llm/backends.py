"""What the LLM backends share (:mod:`.backend_local`: a real local model through ``transformers``;
:mod:`.backend_http`: any OpenAI-compatible server): the capability error, argument checks and
the user cache folders.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from recloop.errors import RecloopInputError

from .types import LLMBackend, as_requests


class LLMCapabilityError(RecloopInputError):
    """The configured backend or server cannot do what was asked (e.g. no logprobs for loglik)."""


def _check_pairs(prompts: Sequence[str], continuations: Sequence[str]) -> None:
    if len(prompts) != len(continuations):
        raise ValueError(
            f"loglik needs as many prompts as continuations ({len(prompts)} != {len(continuations)})"
        )



def user_cache_dir(sub: str, env_var: str) -> Path:
    """``$<env_var>``, else ``$XDG_CACHE_HOME/recloop/<sub>`` (``~/.cache/recloop/<sub>``)."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "recloop" / sub


__all__ = ["LLMBackend", "LLMCapabilityError", "as_requests", "user_cache_dir"]
