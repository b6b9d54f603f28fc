"""Parser of the atomic claims of text profiles (F-PROFILE, L-PROFHALL): ``("likes"|"dislikes", genre)``
and demographic claims flagged as ``("claims", "demographic:<word>")``.

Like the other parsers (:mod:`.parsing`), it reads real-model and surrogate output through one code path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

__all__ = ["DEMOGRAPHIC_WORDS", "parse_profile_claims"]

_NEG_CUES = (
    r"does\s*n[o']?t\s+(?:really\s+)?(?:like|enjoy|care\s+for|love)",
    r"do\s*n[o']?t\s+(?:really\s+)?(?:like|enjoy|care\s+for|love)",
    r"doesn't\s+(?:like|enjoy|care\s+for|love)",
    r"not\s+(?:a\s+(?:big\s+)?fan\s+of|interested\s+in|into|fond\s+of|keen\s+on)",
    r"dislikes?",
    r"hates?",
    r"avoids?",
    r"(?:is|are)\s+averse\s+to",
    r"(?:steers?|stays?)\s+away\s+from",
    r"rarely\s+(?:watches|enjoys|likes)",
    r"never\s+(?:watches|enjoys|likes)",
    r"less\s+interested\s+in",
)
_POS_CUES = (
    r"likes?",
    r"loves?",
    r"enjoys?",
    r"prefers?",
    r"(?:is|are)\s+(?:a\s+(?:big\s+|huge\s+)?)?fans?\s+of",
    r"fan\s+of",
    r"fond\s+of",
    r"interested\s+in",
    r"into",
    r"favou?rs?",
    r"favou?rite\s+(?:genres?\s+)?(?:is|are|include)",
    r"drawn\s+to",
    r"(?:often|frequently|mostly|mainly)\s+watches",
    r"watches",
    r"appreciates?",
    r"gravitates?\s+towards?",
    r"keen\s+on",
)
_CUE_RE = re.compile(
    r"\b(?P<neg>" + "|".join(_NEG_CUES) + r")\b|\b(?P<pos>" + "|".join(_POS_CUES) + r")\b",
    re.I,
)
_SENT_SPLIT_RE = re.compile(r"(?<=[.!?;])\s+|\n+")
_BUT_RE = re.compile(r"\b(?:but|however|whereas|while|although)\b", re.I)

#: Demographic words detected as ("claims", "demographic:<word>"), grouped by attribute.
DEMOGRAPHIC_WORDS: dict[str, tuple[str, ...]] = {
    "gender": (
        "male",
        "female",
        "man",
        "woman",
        "men",
        "women",
        "boy",
        "girl",
        "guy",
        "lady",
        "gentleman",
        "mother",
        "father",
        "husband",
        "wife",
        "nonbinary",
        "non-binary",
    ),
    "age": (
        "young",
        "youth",
        "teen",
        "teens",
        "teenager",
        "teenage",
        "adolescent",
        "elderly",
        "senior",
        "retired",
        "retiree",
        "middle-aged",
        "millennial",
        "boomer",
        "student",
    ),
    "race": (
        "asian",
        "african american",
        "hispanic",
        "latino",
        "latina",
        "caucasian",
        "black person",
        "white person",
        "indigenous",
    ),
}
_AGE_NUM_RE = re.compile(
    r"\b(\d{1,2})[\s-]*(?:years?[\s-]*old|yo)\b|\bin\s+(?:their|his|her)\s+(\d0)s\b|\baged?\s+(\d{1,2})\b",
    re.I,
)


def _genre_pattern(genre: str) -> str:
    g = re.escape(genre.strip().lower()).replace(r"\-", "[-\\s]?").replace(r"\ ", "[-\\s]?")
    g = g.replace("'", "['\u2019]?")
    if genre.lower().endswith("y"):
        return g[:-1] + "(?:y|ies)"
    return g + "(?:s|es)?"


def _genre_regex(
    genres: Sequence[str], aliases: Mapping[str, str] | None
) -> tuple[re.Pattern[str] | None, dict[str, str]]:
    """One regex over every genre name and alias (named groups ``g<k>``) and the genre of each group."""
    phrase_to_genre: dict[str, str] = {}
    pats: list[str] = []
    for g in genres:
        pats.append(f"(?P<g{len(pats)}>{_genre_pattern(g)})")
        phrase_to_genre[f"g{len(pats) - 1}"] = g
    for phrase, g in (aliases or {}).items():
        pats.append(f"(?P<g{len(pats)}>{_genre_pattern(phrase)})")
        phrase_to_genre[f"g{len(pats) - 1}"] = g
    # longest alternatives first so "Film-Noir" wins over "Film"
    order = sorted(range(len(pats)), key=lambda k: -len(pats[k]))
    genre_re = (
        re.compile(r"(?<![\w])(?:" + "|".join(pats[k] for k in order) + r")(?![\w])", re.I) if pats else None
    )
    return genre_re, phrase_to_genre


def _genre_claims(
    genre_re: re.Pattern[str], phrase_to_genre: dict[str, str], clause: str, cues: list[tuple[int, str]]
) -> list[tuple[str, str]]:
    """The clause's genre mentions, each with the polarity of the nearest preceding cue."""
    out: list[tuple[str, str]] = []
    for m in genre_re.finditer(clause):
        pol = None
        for pos, p in cues:
            if pos <= m.start():
                pol = p
            else:
                break
        if pol is None and cues:
            pol = cues[0][1]  # "Horror is something the user loves"
        if pol is None:
            continue
        name = next(k for k, v in m.groupdict().items() if v is not None)
        out.append((pol, phrase_to_genre[name]))
    return out


def _demographic_claims(clause: str) -> list[tuple[str, str]]:
    """The clause's demographic words and ages as ``("claims", "demographic:<w>")``."""
    out: list[tuple[str, str]] = []
    low = clause.lower()
    for words in DEMOGRAPHIC_WORDS.values():
        for w in words:
            if re.search(r"(?<![\w-])" + re.escape(w) + r"(?![\w-])", low):
                out.append(("claims", f"demographic:{w}"))
    for m in _AGE_NUM_RE.finditer(clause):
        age = m.group(1) or m.group(2) or m.group(3)
        out.append(("claims", f"demographic:age{age}"))
    return out


def parse_profile_claims(
    text: str,
    genres: Sequence[str],
    aliases: Mapping[str, str] | None = None,
    demographics: bool = True,
) -> list[tuple[str, str]]:
    """Atomic claims of a text profile: ``("likes"|"dislikes", genre)`` and ``("claims", "demographic:<w>")``.

    A template parser (L-PROFHALL allows one): the text is split into sentences and clauses; each
    genre mention takes the polarity of the nearest preceding cue in its clause ("likes", "enjoys",
    "is a fan of" ... vs "dislikes", "does not like", "avoids" ...). Genre names are matched
    case-insensitively with plural/hyphen variants ("comedies", "sci fi"); ``aliases`` maps extra
    phrases to genre names (e.g. ``{"science fiction": "Sci-Fi"}``). Demographic words
    (:data:`DEMOGRAPHIC_WORDS`, "25-year-old", "in their 30s") become
    ``("claims", "demographic:<word>")``. Claims are deduplicated in order of appearance.
    """
    if not text or not text.strip():
        return []
    genre_re, phrase_to_genre = _genre_regex(genres, aliases)

    claims: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()

    def add(c: tuple[str, str]) -> None:
        if c not in seen:
            seen.add(c)
            claims.append(c)

    for sent in _SENT_SPLIT_RE.split(text):
        if not sent.strip():
            continue
        for clause in _BUT_RE.split(sent):
            cues = [(m.start(), "dislikes" if m.group("neg") else "likes") for m in _CUE_RE.finditer(clause)]
            if genre_re is not None:
                for c in _genre_claims(genre_re, phrase_to_genre, clause, cues):
                    add(c)
            if demographics:
                for c in _demographic_claims(clause):
                    add(c)
    return claims
