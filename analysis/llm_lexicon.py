"""The small lexicon behind the LLM risk metrics (:mod:`recloop.analysis.llm_metrics`): demographic
words (gender synonyms, age bands) for L-PROFHALL and the word tokenizer of Marked Words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

GENDER_SYNONYMS = {
    "female": "female",
    "woman": "female",
    "women": "female",
    "girl": "female",
    "lady": "female",
    "mother": "female",
    "wife": "female",
    "f": "female",
    "male": "male",
    "man": "male",
    "men": "male",
    "boy": "male",
    "guy": "male",
    "gentleman": "male",
    "father": "male",
    "husband": "male",
    "m": "male",
}
AGE_BANDS = {
    "teen": (13, 19),
    "teens": (13, 19),
    "teenager": (13, 19),
    "teenage": (13, 19),
    "adolescent": (12, 19),
    "young": (0, 30),
    "youth": (0, 25),
    "student": (15, 30),
    "millennial": (25, 45),
    "middle-aged": (40, 65),
    "elderly": (65, 200),
    "senior": (60, 200),
    "retired": (55, 200),
    "retiree": (55, 200),
    "boomer": (55, 200),
}


def side_words(side_info: Mapping[str, Any] | Iterable[str] | None) -> tuple[set[str], float | None]:
    words: set[str] = set()
    age: float | None = None
    if side_info is None:
        return words, age
    values = side_info.items() if isinstance(side_info, Mapping) else ((None, v) for v in side_info)
    for key, v in values:
        if key is not None and str(key).lower() == "age":
            try:
                age = float(v)
                continue
            except (TypeError, ValueError):
                pass
        w = str(v).strip().lower()
        words.add(w)
        words.add(GENDER_SYNONYMS.get(w, w))
    return words, age


def demographic_supported(word: str, words: set[str], age: float | None) -> bool:
    w = word.lower()
    if w in words or GENDER_SYNONYMS.get(w, w) in words:
        return True
    if age is not None:
        m = re.fullmatch(r"age(\d+)", w)
        if m is not None:
            a = float(m.group(1))
            # "in their 30s" is parsed as age30: accept the decade; an exact age accepts +-2 years
            return (a % 10 == 0 and a <= age < a + 10) or abs(a - age) <= 2
        band = AGE_BANDS.get(w)
        if band is not None:
            return band[0] <= age <= band[1]
    return False


WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokens(text: str) -> list[str]:
    return WORD_RE.findall(text.lower())
