"""Grounding generated titles in the catalog: normalisation and fuzzy matching (L-HALL).

Reference L-HALL: a generated title is normalised, looked up exactly in the normalised catalog, and
otherwise scored against its best fuzzy match with the Ratcliff/Obershelp ratio
(``difflib.SequenceMatcher.ratio``). It is matched iff the score is at least tau = 0.7.

``difflib`` is the score of record. ``rapidfuzz`` is only an accelerator: its Indel ratio
(2*LCS/T) is an upper bound on the difflib ratio (2*M/T, M <= LCS), so a shortlist of the top few
rapidfuzz candidates, rescored with difflib, finds the difflib-best title in practice and never
misses a title that is rapidfuzz-far (Indel < tau). The bound is also what makes
:meth:`TitleMatcher.max_possible_scores` a rigorous "far from every title" check.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["Match", "TitleMatcher", "normalise_title", "split_year", "ratio"]

#: Articles moved from the end to the front ("Matrix, The" -> "the matrix"). The reference names
#: The/A/An; the few Romance/German articles are our addition for MovieLens-style titles.
_ARTICLES = ("the", "a", "an", "la", "le", "les", "il", "el", "der", "die", "das")

_YEAR_RE = re.compile(r"\s*\(\s*(\d{4})\s*(?:[-\u2013]\s*\d{0,4}\s*)?\)\s*$")
_ARTICLE_RE = re.compile(r"^(.*\S)\s*,\s*(" + "|".join(_ARTICLES) + r")\s*$")
# The article can also sit before a parenthesised alternate title: "City of Lost Children, The (...)".
_ARTICLE_PAREN_RE = re.compile(r"^(.*\S)\s*,\s*(" + "|".join(_ARTICLES) + r")\s+(\(.*\))\s*$")
_APOS_RE = re.compile(r"['\u2019\u2018`\u00b4]")
_PUNCT_RE = re.compile(r"[^\w\s]|_")
_WS_RE = re.compile(r"\s+")


def split_year(s: str) -> tuple[str, int | None]:
    """Split a trailing "(year)" off a title: ``"Heat (1995)" -> ("Heat", 1995)``."""
    m = _YEAR_RE.search(s)
    if m is None:
        return s, None
    return s[: m.start()], int(m.group(1))


def normalise_title(s: str) -> str:
    """Normalise a title for matching (L-HALL step 1).

    NFKC + casefold, strip a trailing "(year)", move a trailing ", The/A/An" to the front, delete
    apostrophes, replace other punctuation by spaces and collapse whitespace.
    ``"Matrix, The (1999)" -> "the matrix"``.
    """
    s = unicodedata.normalize("NFKC", str(s)).casefold()
    s = s.strip()
    s, _ = split_year(s)
    m = _ARTICLE_RE.match(s)
    if m is not None:
        s = f"{m.group(2)} {m.group(1)}"
    else:
        m = _ARTICLE_PAREN_RE.match(s)
        if m is not None:
            s = f"{m.group(2)} {m.group(1)} {m.group(3)}"
    s = _APOS_RE.sub("", s)
    s = _PUNCT_RE.sub(" ", s)
    return _WS_RE.sub(" ", s).strip()


def ratio(a: str, b: str) -> float:
    """The L-HALL score of record: Ratcliff/Obershelp ``difflib.SequenceMatcher(None, a, b).ratio()``."""
    return difflib.SequenceMatcher(None, a, b).ratio()


class Match(NamedTuple):
    """Result of matching one generated title.

    ``item`` is the catalog index (-1 if unmatched), ``score`` the difflib ratio to the best
    candidate (1.0 for an exact normalised match; for unmatched titles, the best score found), and
    ``exact`` whether the normalised strings were identical.
    """

    item: int
    score: float
    exact: bool

    @property
    def matched(self) -> bool:
        return self.item >= 0


class TitleMatcher:
    """Match generated titles to catalog items (L-HALL).

    Parameters
    ----------
    titles:
        Catalog titles; the position in the list is the item id.
    threshold:
        tau: a fuzzy match counts iff its difflib ratio is >= threshold (reference: 0.7).
    shortlist:
        How many rapidfuzz candidates are rescored with difflib.
    cache_size:
        Fuzzy results are memoised per normalised query (outputs repeat a lot); 0 disables.

    Duplicated normalised titles (remakes) resolve to the first item, unless the generated title
    carries a year that picks out one of them.
    """

    def __init__(
        self,
        titles: Sequence[str],
        threshold: float = 0.7,
        shortlist: int = 5,
        cache_size: int = 200_000,
    ) -> None:
        self.titles = list(titles)
        self.threshold = float(threshold)
        self.shortlist = max(1, int(shortlist))
        self.cache_size = int(cache_size)
        self.normalised: list[str] = []
        self._exact: dict[str, int] = {}
        self._exact_year: dict[tuple[str, int], int] = {}
        self._cache: dict[str, Match] = {}
        self._index(0)

    def _index(self, start: int) -> None:
        for i in range(start, len(self.titles)):
            t = self.titles[i]
            n = normalise_title(t)
            self.normalised.append(n)
            self._exact.setdefault(n, i)
            _, year = split_year(unicodedata.normalize("NFKC", str(t)).strip())
            if year is not None:
                self._exact_year.setdefault((n, year), i)

    def extend(self, titles: Sequence[str]) -> None:
        """Append titles (new items get the next ids); clears the fuzzy cache."""
        start = len(self.titles)
        self.titles.extend(titles)
        self._index(start)
        self._cache.clear()

    def __len__(self) -> int:
        return len(self.titles)

    def exact_item(self, normalised: str) -> int:
        """Item id of an exactly matching normalised title, or -1."""
        return self._exact.get(normalised, -1)

    def match_one(self, generated: str) -> Match:
        """Match a single generated title (see :meth:`match`)."""
        norm = normalise_title(generated)
        if not norm:
            return Match(-1, 0.0, False)
        item = self._exact.get(norm)
        if item is not None:
            _, year = split_year(unicodedata.normalize("NFKC", str(generated)).strip())
            if year is not None:
                item = self._exact_year.get((norm, year), item)
            return Match(item, 1.0, True)
        hit = self._cache.get(norm)
        if hit is not None:
            return hit
        hit = self._fuzzy(norm)
        if self.cache_size > 0:
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            self._cache[norm] = hit
        return hit

    def match(self, generated: Sequence[str]) -> list[Match]:
        """Match each generated title: exact normalised lookup, else difflib-best of a rapidfuzz shortlist."""
        return [self.match_one(g) for g in generated]

    def _fuzzy(self, norm: str) -> Match:
        from rapidfuzz import fuzz, process

        if not self.normalised:
            return Match(-1, 0.0, False)
        cands = process.extract(norm, self.normalised, scorer=fuzz.ratio, limit=self.shortlist)
        best_item, best_score = -1, -1.0
        for _choice, _rf_score, idx in cands:
            sc = ratio(norm, self.normalised[idx])
            # ties go to the lower item id, so results do not depend on rapidfuzz's ordering
            if sc > best_score or (sc == best_score and idx < best_item):
                best_item, best_score = int(idx), sc
        if best_score >= self.threshold:
            return Match(best_item, best_score, False)
        return Match(-1, max(best_score, 0.0), False)

    def max_possible_scores(self, queries: Sequence[str], chunk: int = 64) -> np.ndarray:
        """Upper bounds on the best difflib ratio of each (raw) query against the whole catalog.

        Uses the rapidfuzz Indel ratio, which is >= the difflib ratio for every pair; a value below
        ``threshold`` therefore proves the query matches no title. Exact duplicates give 1.0.
        Vectorised and multi-threaded (``process.cdist``), chunked to bound memory.
        """
        from rapidfuzz import fuzz, process

        norms = [normalise_title(q) for q in queries]
        out = np.zeros(len(norms), dtype=np.float64)
        if not self.normalised or not norms:
            return out
        for s in range(0, len(norms), chunk):
            block = norms[s : s + chunk]
            m = process.cdist(block, self.normalised, scorer=fuzz.ratio, dtype=np.float64, workers=-1)
            out[s : s + len(block)] = m.max(axis=1) / 100.0
        for k, n in enumerate(norms):
            if n in self._exact:
                out[k] = 1.0
        return out
