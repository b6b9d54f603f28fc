"""User-facing errors: bad input is reported as one paragraph and exit code 2, never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RecloopInputError(Exception):
    """Bad input from a user (YAML, CLI arguments, data files, LLM configuration).

    The message is a complete, one-paragraph explanation naming the file, the key and what is
    allowed. The CLI prints it and exits with code 2.
    """

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file = file
        self.key = key
        parts = []
        if file:
            parts.append(f"{file}:")
        if key:
            parts.append(f"key '{key}':")
        parts.append(message)
        super().__init__(" ".join(parts))


def closest(word: str, options: Iterable[str]) -> str | None:
    """The closest valid option to ``word`` (for 'did you mean ...?' hints), or None."""
    options = list(options)
    hits = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    if hits:
        return hits[0]
    low = {o.lower(): o for o in options}
    return low.get(word.lower())


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """A ' Did you mean X?' suffix, or an empty string."""
    hit = closest(word, options)
    return f" Did you mean '{hit}'?" if hit else ""
