"""Grounding generated titles in the catalog: normalisation and fuzzy matching (L-HALL).

Reference L-HALL: a generated title is normalised, looked up exactly in the normalised catalog, and
otherwise scored against its best fuzzy match with the Ratcliff/Obershelp ratio
(``difflib.SequenceMatcher.ratio``). It is matched iff the score is at least tau = 0.7.

``difflib`` is the score of record. ``rapidfuzz`` is only an accelerator: its Indel ratio
(2*LCS/T) is an upper bound on the difflib ratio (2*M/T, M <= LCS: difflib's matching blocks are a
common subsequence). The matcher scores every catalog title with rapidfuzz (one vectorised call),
rescores titles with difflib in decreasing order of that bound, and stops once the bound falls below
the best difflib score found: the result is exactly the difflib-best title (ties to the lower item
id), as a brute-force scan would return it, usually after a handful of difflib calls. The bound is
also what makes :meth:`TitleMatcher.max_possible_scores` a rigorous "far from every title" check.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["Match", "TitleMatcher", "normalise_title", "split_year", "ratio"]

#: float slack on the rapidfuzz bound (its 0-100 score and difflib's 2*M/T round differently)
_BOUND_SLACK = 1e-9

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


def _descending(bound: np.ndarray, head: int = 32) -> Iterator[int]:
    """Indices by decreasing ``bound`` (ties: increasing index), lazily: the ``head`` largest first
    (a partial sort; the search usually stops there), then the rest. Every index comes exactly once
    and each one yielded has a bound at least that of any index not yet yielded."""
    n = len(bound)
    if n <= 4 * head:
        yield from np.lexsort((np.arange(n), -bound)).tolist()
        return
    top = np.argpartition(-bound, head - 1)[:head]
    top = top[np.lexsort((top, -bound[top]))]
    yield from top.tolist()
    rest = np.ones(n, bool)
    rest[top] = False
    rest = np.flatnonzero(rest)
    yield from rest[np.lexsort((rest, -bound[rest]))].tolist()


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
        Unused (kept for compatibility): the search is exact, see the module docstring.
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
        return self.match([generated])[0]

    def match(self, generated: Sequence[str]) -> list[Match]:
        """Match each generated title: exact normalised lookup, else the difflib-best catalog title
        (exact; fuzzy queries are bounded with rapidfuzz in one batch, see the module docstring)."""
        out: list[Match | None] = []
        pending: dict[str, list[int]] = {}
        for i, g in enumerate(generated):
            hit, norm = self._lookup(g)
            out.append(hit)
            if hit is None:
                pending.setdefault(norm, []).append(i)
        for norm, hit in self._fuzzy_many(list(pending)).items():
            self._remember(norm, hit)
            for i in pending[norm]:
                out[i] = hit
        return out  # type: ignore[return-value]

    def _lookup(self, generated: str) -> tuple[Match | None, str]:
        """The match when it needs no fuzzy search (empty, exact, memoised), else None; and the norm."""
        norm = normalise_title(generated)
        if not norm:
            return Match(-1, 0.0, False), norm
        item = self._exact.get(norm)
        if item is not None:
            _, year = split_year(unicodedata.normalize("NFKC", str(generated)).strip())
            if year is not None:
                item = self._exact_year.get((norm, year), item)
            return Match(item, 1.0, True), norm
        return self._cache.get(norm), norm

    def _remember(self, norm: str, hit: Match) -> None:
        if self.cache_size > 0:
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            self._cache[norm] = hit

    def _fuzzy(self, norm: str) -> Match:
        """The difflib-best title for one normalised query (no cache)."""
        return self._fuzzy_many([norm])[norm]

    def _fuzzy_many(self, norms: list[str], chunk: int = 64) -> dict[str, Match]:
        """Difflib-best titles for normalised queries: rapidfuzz bounds for the whole catalog in blocks
        (``process.cdist``, multi-threaded), then an exact bounded rescoring per query."""
        from rapidfuzz import fuzz, process

        if not self.normalised:
            return {n: Match(-1, 0.0, False) for n in norms}
        out = {}
        for lo in range(0, len(norms), chunk):
            block = norms[lo : lo + chunk]
            workers = -1 if len(block) * len(self.normalised) >= 1 << 18 else 1  # threads pay off on big blocks
            bounds = process.cdist(block, self.normalised, scorer=fuzz.ratio, dtype=np.float64, workers=workers)
            for norm, row in zip(block, bounds / 100.0):
                out[norm] = self._best(norm, row)
        return out

    def _best(self, norm: str, bound: np.ndarray) -> Match:
        """Exact argmax of the difflib ratio over the catalog, given per-title upper bounds ``bound``.

        Titles are rescored in decreasing bound (then increasing id); once a bound is below the best
        score found, no later title can beat or tie it. Ties go to the lower item id; below the
        threshold the item is not reported, so a title that can at most tie ends the search too."""
        best_item, best = -1, -1.0
        for idx in _descending(bound):
            ub = bound[idx]
            if ub + _BOUND_SLACK < best:  # can neither beat nor tie the best
                break
            if best < self.threshold and ub <= best + _BOUND_SLACK:  # can at most tie an unmatched score
                break
            sc = ratio(norm, self.normalised[idx])
            if sc > best or (sc == best and idx < best_item):
                best_item, best = idx, sc
        if best >= self.threshold:
            return Match(best_item, best, False)
        return Match(-1, max(best, 0.0), False)

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
