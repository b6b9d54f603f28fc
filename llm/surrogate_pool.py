"""Hallucination material of the F-SURR surrogate (:mod:`.surrogate`): per catalog, a pool of fabricated
titles (token recombinations, < 0.7 to every title) and cached near-misses of real titles.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from .matching import TitleMatcher, normalise_title, ratio, split_year

_MASK64 = (1 << 64) - 1

_WORD_RE = re.compile(r"[^\W\d_][\w']*", re.UNICODE)
_FILLER = (
    "Zephyr",
    "Marrow",
    "Quill",
    "Vantor",
    "Obsidian",
    "Lantern",
    "Kestrel",
    "Umber",
    "Solace",
    "Brimwood",
    "Harrow",
    "Juniper",
    "Cobalt",
    "Whisper",
    "Ferrule",
    "Tamarind",
    "Glimmer",
    "Orrery",
    "Pallor",
    "Thistle",
)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


_SYLLABLES = (
    "ka",
    "zor",
    "vel",
    "thi",
    "mur",
    "dax",
    "quo",
    "ren",
    "sil",
    "bra",
    "nox",
    "lum",
    "tev",
    "gri",
    "osh",
    "pra",
    "yel",
    "fen",
    "wix",
    "dro",
    "sam",
    "ulk",
    "ith",
    "vor",
    "jan",
    "ek",
)


def _pseudo_word(rng: np.random.Generator) -> str:
    k = int(rng.integers(2, 4))
    return "".join(_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), size=k)).capitalize()


def _fingerprint(titles: Sequence[str], n: int | None = None) -> tuple[Any, ...]:
    """Cheap content key of the first ``n`` titles (length plus a few sampled titles)."""
    n = len(titles) if n is None else n
    if n == 0:
        return (0,)
    picks = {0, n - 1, n // 2, n // 3, (2 * n) // 3, n // 7}
    return (n, *(str(titles[i]) for i in sorted(picks)))


class _CatalogPool:
    """Per-catalog material: the matcher (exact lookup, far-check) and a pool of fabricated titles.

    The pool depends on how the catalog grew (:meth:`extend` filters and tops it up), not only on the
    titles, so a checkpoint keeps it: ``fabricated`` restores a saved pool instead of building one.
    """

    def __init__(
        self,
        titles: Sequence[str],
        size: int,
        seed: int,
        threshold: float,
        fabricated: Sequence[str] | None = None,
    ) -> None:
        self.titles = [str(t) for t in titles]
        self.size = int(size)
        self.seed = int(seed)
        self.threshold = threshold
        self.fingerprint = _fingerprint(self.titles)
        self.matcher = TitleMatcher(self.titles, threshold=threshold)
        self._near: dict[str, tuple[str, ...]] = {}
        self.fabricated: list[str] = []
        if fabricated is not None:
            self.fabricated = [str(f) for f in fabricated]
        else:
            self._fabricate(self.size, round_offset=0)

    def extend(self, new_titles: Sequence[str]) -> None:
        """Append titles (a growing catalog): re-check the fabricated pool against the new titles only."""
        new = [str(t) for t in new_titles]
        if not new:
            return
        self.titles.extend(new)
        self.fingerprint = _fingerprint(self.titles)
        self.matcher.extend(new)
        self._near.clear()
        bound = TitleMatcher(new, threshold=self.threshold).max_possible_scores(self.fabricated)
        self.fabricated = [f for f, b in zip(self.fabricated, bound, strict=True) if b < self.threshold]
        if len(self.fabricated) < (3 * self.size) // 4:  # top up only when many were lost
            self._fabricate(self.size, round_offset=len(self.titles))

    def _fabricate(self, size: int, round_offset: int) -> None:
        """Fill the pool with token recombinations certified far (< threshold) from every title.

        Candidates join 2-4 tokens drawn from the catalog's title vocabulary (by frequency). In dense
        catalogs, where few recombinations are far from every title, later rounds replace a growing
        number of tokens by invented pseudo-words, so the pool always fills within a few rounds.
        """
        rng = np.random.default_rng(np.random.SeedSequence([self.seed & _MASK64, 0xFAB, round_offset]))
        vocab: list[str] = []
        for t in self.titles:
            vocab.extend(w for w in _WORD_RE.findall(split_year(t)[0]) if len(w) >= 2)
        if len(set(vocab)) < 8:
            vocab.extend(_FILLER)
        vocab_arr = np.array(vocab, dtype=object)
        pool = self.fabricated
        seen: set[str] = {normalise_title(f) for f in pool}
        invented = 0  # how many tokens per candidate are invented pseudo-words
        for _round in range(8):
            need = size - len(pool)
            if need <= 0:
                break
            m = min((5 * need) // 4 + 16, 4096) if invented == 0 else min(2 * need + 16, 4096)
            lens = rng.integers(2, 5, size=m)
            words = vocab_arr[rng.integers(0, len(vocab_arr), size=int(lens.sum()))]
            cands: list[str] = []
            pos = 0
            for L in lens.tolist():
                ws = [w[:1].upper() + w[1:] for w in words[pos : pos + L]]
                pos += L
                for k in range(min(invented, L)):
                    ws[(k * 2 + 1) % L] = _pseudo_word(rng)
                if len({w.lower() for w in ws}) < L:  # no "The The"
                    continue
                cand = " ".join(ws)
                key = normalise_title(cand)
                if key and key not in seen:
                    seen.add(key)
                    cands.append(cand)
            if not cands:
                invented += 1
                continue
            bound = self.matcher.max_possible_scores(cands)
            passed = 0
            for c, b in zip(cands, bound, strict=True):
                if b < self.threshold:
                    passed += 1
                    if len(pool) < size:
                        pool.append(c)
            if passed < 0.5 * len(cands):
                invented += 1
        if not pool:  # pragma: no cover - essentially impossible with invented words
            raise RuntimeError("SurrogateLLM: could not fabricate titles far from the catalog")

    def near_misses(self, title: str, k: int = 4) -> tuple[str, ...]:
        """Up to ``k`` cached near-miss variants of ``title`` (seeded by the model seed and the title)."""
        hit = self._near.get(title)
        if hit is None:
            rng = np.random.default_rng(
                np.random.SeedSequence([self.seed & _MASK64, 0x4E4D, zlib.crc32(title.encode())])
            )
            out: list[str] = []
            for _ in range(k):
                v = self.near_miss(title, rng)
                if v is not None and v not in out:
                    out.append(v)
            hit = tuple(out)
            if len(self._near) > 500_000:
                self._near.clear()
            self._near[title] = hit
        return hit

    def near_miss(self, title: str, rng: np.random.Generator) -> str | None:
        """A 1-2 character edit of ``title`` with difflib ratio >= threshold, not an exact catalog title."""
        base, _ = split_year(title)
        suffix = title[len(base) :]
        orig = normalise_title(title)
        if not orig:
            return None
        for attempt in range(10):
            n_edits = int(rng.integers(1, 3)) if attempt < 5 else 1
            chars = list(base)
            for _ in range(n_edits):
                alnum = [k for k, c in enumerate(chars) if c.isalnum()]
                if not alnum:
                    break
                k = alnum[int(rng.integers(0, len(alnum)))]
                op = int(rng.integers(0, 4)) if attempt < 8 else 2  # late attempts: insertions only
                letter = _LETTERS[int(rng.integers(0, 26))]
                if op == 0:
                    chars[k] = letter if chars[k].lower() != letter else _LETTERS[(ord(letter) - 96) % 26]
                elif op == 1 and len(alnum) > 3:
                    del chars[k]
                elif op == 3 and k + 1 < len(chars) and chars[k + 1].isalnum() and chars[k + 1] != chars[k]:
                    chars[k], chars[k + 1] = chars[k + 1], chars[k]
                else:
                    chars.insert(k + 1, letter)
            cand = "".join(chars) + suffix
            key = normalise_title(cand)
            if key == orig or self.matcher.exact_item(key) >= 0:
                continue
            if ratio(key, orig) >= self.threshold:
                return cand
        return None
