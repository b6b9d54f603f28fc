"""Robust parsers for LLM text output, and the malformed-output accounting (F-ROLES, L-HALL, L-PROFHALL).

The same parsers read real-model output and :class:`~recloop.llm.surrogate.SurrogateLLM`
output, so both go through one code path:

* :func:`parse_title_list` - a list of titles (F-AUG augmentation, generative F-RANK) for L-HALL;
* :func:`parse_ranking` - a permutation of presented candidates (F-RANK reranking).

The claims of text profiles (F-PROFILE, L-PROFHALL) are parsed in :mod:`.profile_claims`.

Failures are classified with :class:`FailureReason` (``empty``, ``unparsable``, ``too_long``,
``timeout``, ``budget``) so the caller can log a malformed-output rate per role.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

from .matching import TitleMatcher

__all__ = [
    "FailureReason",
    "ParseError",
    "parse_title_list",
    "parse_title_list_checked",
    "parse_ranking",
    "response_failure",
]


class FailureReason(str, Enum):
    """Why an LLM output could not be used (malformed-output accounting)."""

    EMPTY = "empty"  #: no text, or only whitespace / boilerplate
    UNPARSABLE = "unparsable"  #: text present but nothing usable extracted
    TOO_LONG = "too_long"  #: more items than asked for, or longer than the character budget
    TIMEOUT = "timeout"  #: the backend timed out
    BUDGET = "budget"  #: the token / call / cost budget was exhausted


class ParseError(ValueError):
    """A parse failure carrying a :class:`FailureReason`."""

    def __init__(self, reason: FailureReason | str, message: str = "") -> None:
        self.reason = FailureReason(reason)
        super().__init__(message or self.reason.value)


def response_failure(response: Any) -> FailureReason | None:
    """Classify a failed backend response (``LLMResponse.failed`` / ``.error``) as TIMEOUT, BUDGET or EMPTY.

    Returns None when the response did not fail and has non-blank text.
    """
    failed = bool(getattr(response, "failed", False))
    error = str(getattr(response, "error", "") or "").lower()
    if failed or error:
        if "timeout" in error or "timed out" in error:
            return FailureReason.TIMEOUT
        if "budget" in error or "quota" in error or "rate limit" in error:
            return FailureReason.BUDGET
        if failed:
            return FailureReason.EMPTY
    if not (getattr(response, "text", "") or "").strip():
        return FailureReason.EMPTY
    return None


# --------------------------------------------------------------------------------------------
# title lists
# --------------------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[a-zA-Z0-9_-]*\n?|```")
_NUM_MARK_RE = re.compile(r"(?:(?<=\s)|^)[#(\[]?(\d{1,3})[.):\]](?=\s|$)|(?:(?<=\s)|^)(\d{1,3})\s+-\s+", re.M)
_BULLET_RE = re.compile(r"^\s*(?:[-*\u2022\u00b7\u2013\u2014+>]|\u25cf|\u25aa)\s+(.*)$")
_QUOTED_RE = re.compile(r"[\"\u201c\u201d\u00ab\u00bb](.+?)[\"\u201c\u201d\u00ab\u00bb]")
_STAR_RE = re.compile(r"\*\*|__|\*|`")
_DESC_SPLIT_RE = re.compile(r"\s+[-\u2013\u2014]+\s+|\s*\|\s*")
_LEADIN_RE = re.compile(
    r"^(?:sure|certainly|of course|okay|ok|here (?:are|is)|i (?:would|'d|recommend|suggest)|"
    r"based on|these|the following|recommendations?)\b",
    re.I,
)
_STRIP_CHARS = " \t\"'\u201c\u201d\u2018\u2019\u00ab\u00bb*_`.,;:"


def _clean_item(s: str) -> str:
    s = s.strip()
    if not s:
        return ""
    s = s.splitlines()[0]
    q = _QUOTED_RE.search(s)
    if q is not None and len(q.group(1).strip()) > 1:
        s = q.group(1)
    else:
        s = _STAR_RE.sub("", s)
        s = _DESC_SPLIT_RE.split(s, maxsplit=1)[0]
        # "Title: a description..." - only cut when the rest looks like prose (many words).
        if ": " in s:
            head, tail = s.split(": ", 1)
            if len(tail.split()) >= 6 and head.strip():
                s = head
    s = _STAR_RE.sub("", s)
    return s.strip(_STRIP_CHARS).strip()


def _numbered_items(text: str) -> list[str] | None:
    """Items of a 1, 2, 3, ... numbered list (markers must follow the expected sequence)."""
    marks: list[tuple[int, int]] = []  # (start of marker, end of marker)
    expected = 1
    for m in _NUM_MARK_RE.finditer(text):
        num = int(m.group(1) or m.group(2))
        if num == expected:
            marks.append((m.start(), m.end()))
            expected += 1
    if len(marks) < 1:
        return None
    if len(marks) == 1 and "\n" not in text.strip() and not text.lstrip().startswith(("1", "#1", "(1", "[1")):
        return None
    items = []
    for k, (_s, e) in enumerate(marks):
        end = marks[k + 1][0] if k + 1 < len(marks) else len(text)
        items.append(text[e:end])
    return items


def _json_items(text: str) -> list[str] | None:
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        data = json.loads(text[start : end + 1])
    except (ValueError, TypeError):
        return None
    if not isinstance(data, list):
        return None
    out = []
    for x in data:
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, Mapping):
            for key in ("title", "name", "item", "movie"):
                if isinstance(x.get(key), str):
                    out.append(x[key])
                    break
    return out or None


def _raw_title_items(text: str) -> list[str]:
    text = _FENCE_RE.sub("\n", text or "").strip()
    if not text:
        return []
    items = _json_items(text)
    if items is not None:
        return [c for c in (_clean_item(x) for x in items) if c]
    items = _numbered_items(text)
    if items is None:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        bullets = [m.group(1) for m in (_BULLET_RE.match(ln) for ln in lines) if m is not None]
        if bullets:
            items = bullets
        else:
            body = [ln for ln in lines if not ln.rstrip().endswith(":") and not _LEADIN_RE.match(ln.strip())]
            if len(body) == 1:
                line = body[0]
                if ";" in line:
                    items = line.split(";")
                elif "," in line:
                    items = line.split(",")
                elif "|" in line:
                    items = line.split("|")
                else:
                    items = [line]
            else:
                items = body
    return [c for c in (_clean_item(x) for x in items) if c]


def parse_title_list(text: str, max_items: int | None = None) -> list[str]:
    """Titles from a numbered, bulleted, comma/semicolon-separated or JSON list.

    Strips list markers ("1.", "2)", "#3", "-", "*"), markdown emphasis, surrounding quotes and
    trailing descriptions ("Title - a film about ..."). Lead-in lines ("Here are ...:") are dropped.
    Duplicates are kept (they are measured by L-HALL's duplicate rate). At most ``max_items``
    titles are returned; an empty list means nothing could be parsed.
    """
    items = _raw_title_items(text)
    if max_items is not None:
        items = items[: max(0, int(max_items))]
    return items


def parse_title_list_checked(
    text: str, max_items: int | None = None, max_chars: int | None = None
) -> tuple[list[str], FailureReason | None]:
    """:func:`parse_title_list` plus a failure reason: EMPTY, UNPARSABLE or TOO_LONG (titles still returned).

    TOO_LONG means more than ``max_items`` items were produced or the text exceeds ``max_chars``;
    the truncated list is still usable.
    """
    if not (text or "").strip():
        return [], FailureReason.EMPTY
    items = _raw_title_items(text)
    if not items:
        return [], FailureReason.UNPARSABLE
    reason = None
    if max_items is not None and len(items) > max_items:
        reason = FailureReason.TOO_LONG
        items = items[: max(0, int(max_items))]
    if max_chars is not None and len(text) > max_chars:
        reason = FailureReason.TOO_LONG
    return items, reason


# --------------------------------------------------------------------------------------------
# rankings
# --------------------------------------------------------------------------------------------

_BRACKET_TOK_RE = re.compile(r"\[\s*([A-Za-z]|\d{1,4})\s*\]")
_NUM_TOK_RE = re.compile(r"(?<![\w.])(\d{1,4})(?![\w]|\.\d)")
_LETTER_TOK_RE = re.compile(r"(?<![\w'])([A-Z])(?![\w'])")
_LINE_MARK_RE = re.compile(r"^\s*(?:#|rank\s*)?\d{1,3}\s*[.):]\s+(?=\S)", re.I | re.M)
_SEP_RE = re.compile(r"^(?:[\s,;>|/&+=\-\u2192\u2265]|and|then|->|=>)*$", re.I)


def _token_runs(text: str, pattern: re.Pattern[str]) -> list[list[str]]:
    """Groups of tokens separated only by list separators (",", ">", "->", newlines, "and")."""
    runs: list[list[str]] = []
    last_end = None
    for m in pattern.finditer(text):
        gap = text[last_end : m.start()] if last_end is not None else None
        if gap is not None and _SEP_RE.match(gap.strip(" \t\r\n")) and gap.count("\n") <= 1:
            runs[-1].append(m.group(1))
        else:
            runs.append([m.group(1)])
        last_end = m.end()
    return runs


def _to_index(tok: str, n: int, one_based: bool) -> int | None:
    if tok.isdigit():
        k = int(tok) - (1 if one_based else 0)
    else:
        k = ord(tok.upper()) - ord("A")
    return k if 0 <= k < n else None


def parse_ranking(
    text: str,
    n_candidates: int,
    titles: Sequence[str] | None = None,
    one_based: bool = True,
) -> list[int] | None:
    """0-based candidate indices, best first, from a ranking answer; None if unparsable.

    Understands "3, 1, 2", "[C] > [A] > [B]", "C, A, B", numbered lines ("1. [C] Heat", "1. 3"),
    and, when ``titles`` (the candidate titles as presented) is given, a list of titles. Numbers are
    1-based positions as presented unless ``one_based=False``; letters are A = first. The result is
    a prefix of a permutation: invalid indices are dropped, duplicates keep their first occurrence.
    When several separated groups of tokens appear (prose around the answer), the group with the
    most valid indices wins.
    """
    text = _FENCE_RE.sub("\n", text or "")
    if not text.strip() or n_candidates <= 0:
        return None

    def best_run(runs: list[list[str]]) -> list[int]:
        best: list[int] = []
        for run in runs:
            idx: list[int] = []
            seen: set[int] = set()
            for tok in run:
                k = _to_index(tok, n_candidates, one_based)
                if k is not None and k not in seen:
                    seen.add(k)
                    idx.append(k)
            if len(idx) > len(best):
                best = idx
        return best

    if _BRACKET_TOK_RE.search(text):
        # bracketed ids are unambiguous: take them all in order of appearance
        res = best_run([[m.group(1) for m in _BRACKET_TOK_RE.finditer(text)]])
        if res:
            return res
    body = _LINE_MARK_RE.sub("", text) if len(_LINE_MARK_RE.findall(text)) >= 2 else text
    res = best_run(_token_runs(body, _NUM_TOK_RE))
    if not res and n_candidates <= 26:
        res = best_run(_token_runs(body, _LETTER_TOK_RE))
    if not res and titles is not None:

        matcher = TitleMatcher(list(titles))
        seen: set[int] = set()
        for mt in matcher.match(parse_title_list(text)):
            if mt.item >= 0 and mt.item not in seen and mt.item < n_candidates:
                seen.add(mt.item)
                res.append(mt.item)
    return res or None
