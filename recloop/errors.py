"""User-facing errors: bad input is reported as one paragraph and exit code 2, never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from recloop.limits import MAX_ECHO, MAX_MESSAGE


def clip(text: object, limit: int = MAX_ECHO) -> str:
    """``text`` cut to about ``limit`` characters (head … tail), so echoed input stays readable."""
    s = str(text)
    if len(s) <= limit:
        return s
    keep = max(limit - 40, 20)
    return f"{s[: keep * 2 // 3]}…[{len(s) - keep} characters cut]…{s[len(s) - keep // 3:]}"


def echo(value: object, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` cut to about ``limit`` characters (a huge value never floods a message)."""
    try:
        text = repr(value)
    except ValueError:  # e.g. an int beyond Python's digit limit for str()
        text = f"<{type(value).__name__} too large to show>"
    return clip(text, limit)


class RecloopInputError(Exception):
    """Bad input from a user (YAML, CLI arguments, data files, LLM configuration).

    The message is a complete, one-paragraph explanation naming the file, the key and what is
    allowed. The CLI prints it and exits with code 2. It is bounded (:data:`MAX_MESSAGE` characters),
    so hostile input cannot produce a megabyte of error text.
    """

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file = file
        self.key = key
        self.detail = message
        parts = []
        if file:
            parts.append(f"{clip(file, 300)}:")
        if key:
            parts.append(f"key '{clip(key)}':")
        parts.append(message)
        super().__init__(clip(" ".join(parts), MAX_MESSAGE))


def qualify(exc: RecloopInputError, *, file: str | None, prefix: str, roots: Iterable[str] = ()) -> RecloopInputError:
    """``exc`` re-issued for the scenario ``file`` with its key made a full dotted key under ``prefix``.

    Components report keys relative to their own block (``path``); a key that already starts with one
    of the scenario's top-level ``roots`` (``world.type``, ``users.choice.source``) or is a command-line
    option (``--seed``) is kept. A different file named by ``exc`` (a data file, a params file) stays in
    the message.
    """
    key = exc.key
    roots = set(roots)
    if key is None:
        full = prefix
    elif key.startswith("--") or key.split(".", 1)[0] in roots:
        full = key
    else:
        full = f"{prefix}.{key}" if prefix else key
    detail = exc.detail
    if exc.file and file and exc.file != file:
        detail = f"{clip(exc.file, 300)}: {detail}"
    new = type(exc).__new__(type(exc))
    RecloopInputError.__init__(new, detail, file=file or exc.file, key=full or None)
    return new


def closest(word: str, options: Iterable[str]) -> str | None:
    """The closest valid option to ``word`` (for 'did you mean ...?' hints), or None."""
    options = list(options)
    word = word[:MAX_ECHO]
    hits = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    if hits:
        return hits[0]
    low = {o.lower(): o for o in options}
    if word.lower() in low:
        return low[word.lower()]
    prefixed = sorted(o for o in options if word and o.lower().startswith(word.lower()))
    return prefixed[0] if prefixed else None  # 'gini' -> 'gini_consumption' (a start of a longer id)


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """A ' Did you mean X?' suffix, or an empty string."""
    hit = closest(word, options)
    return f" Did you mean '{hit}'?" if hit else ""
