"""Shared helpers of the LLM roles (:mod:`.role_augment` R1, :mod:`.role_profile` R2, :mod:`.role_rank` R3):
title matching, and the small array helpers they share.
"""

from __future__ import annotations

import numpy as np

from .matching import TitleMatcher

__all__ = ["match_titles"]


def match_titles(matcher: TitleMatcher, titles: list[str]) -> list:
    """``matcher.match(titles)``: exact and memoised titles are looked up; the rest are bounded against the
    whole catalog in one ``rapidfuzz.process.cdist`` batch and resolved exactly to the difflib-best title
    (the score of record), ties to the lower item id (see :mod:`.matching`). Results are memoised."""
    return matcher.match(titles)


def _topk_lex(key: np.ndarray, cand: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k smallest ``key``, ties to the smaller ``cand`` - the first k of
    ``np.lexsort((cand, key))`` - via argpartition; rows with ties at the k-th key take the full sort."""
    n, m = key.shape
    if k >= m:
        return np.lexsort((cand, key), axis=-1)[:, :k]
    part = np.argpartition(key, k - 1, axis=1)[:, :k]
    pk = np.take_along_axis(key, part, axis=1)
    kth = pk.max(axis=1, keepdims=True)
    exact = (key <= kth).sum(axis=1) == k  # no other column ties with the k-th key
    o = np.lexsort((np.take_along_axis(cand, part, axis=1), pk), axis=-1)
    out = np.take_along_axis(part, o, axis=1)
    bad = np.flatnonzero(~exact)
    if len(bad):
        out[bad] = np.lexsort((cand[bad], key[bad]), axis=-1)[:, :k]
    return out


def _titles_line(titles: list[str], sep: str = "\n") -> str:
    return sep.join(f"- {t}" for t in titles)


def _history_items(history, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if history is None or len(users) == 0:
        return np.zeros(len(users) + 1, np.int64), np.zeros(0, np.int64)
    return history.csr(np.asarray(users, np.int64))


def _pad(arr: np.ndarray, n: int, fill=0) -> np.ndarray:
    if len(arr) >= n:
        return arr
    return np.concatenate([arr, np.full(n - len(arr), fill, dtype=arr.dtype)])


def _first_unique(x: np.ndarray) -> np.ndarray:
    """Distinct values in order of first appearance."""
    _, first = np.unique(x, return_index=True)
    return x[np.sort(first)]


def _zscore_rows(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Row-wise z-scores over the masked entries (others -10); rows with < 2 entries give 0."""
    x = np.where(mask & np.isfinite(x), x, np.nan)
    cnt = np.sum(~np.isnan(x), axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = np.nansum(x, axis=1, keepdims=True) / np.maximum(cnt, 1)
        sd = np.sqrt(np.nansum((x - mu) ** 2, axis=1, keepdims=True) / np.maximum(cnt, 1))
        z = (x - mu) / np.where(sd > 0, sd, 1.0)
    z = np.where(cnt >= 2, z, 0.0)
    return np.where(np.isnan(x), -10.0, z)


def _zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x)
    if ok.sum() < 2:
        return np.where(ok, 0.0, -10.0)
    m, s = x[ok].mean(), x[ok].std()
    return np.where(ok, (x - m) / (s if s > 0 else 1.0), -10.0)
