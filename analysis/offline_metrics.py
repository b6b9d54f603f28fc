"""Next-item metrics of the offline evaluation (``recloop evaluate``) and a paired bootstrap of their ratio.

Each evaluated user has one held-out target item and one top-k list (the full catalog ranked, the user's
other items excluded). With r the 0-based position of the target in the list (r = -1 when it is not in
the top k):

* ``hr@k`` = mean over users of 1[0 <= r < k] (hit rate; with one target this equals recall@k);
* ``ndcg@k`` = mean of 1 / log2(r + 2) on hits, 0 otherwise (one relevant item, so the ideal DCG is 1);
* ``mrr@k`` = mean of 1 / (r + 1) on hits, 0 otherwise;
* ``coverage@k`` = distinct items in all users' top-k lists / catalog size.

These are the usual leave-one-out forms (Kang & McAuley 2018, SASRec; Krichene & Rendle 2020 on why the
catalog is ranked in full rather than against sampled negatives).
"""

from __future__ import annotations

import numpy as np


def target_ranks(slates: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based position of each row's target in its slate (n, k), -1 when absent (-1 slots never match)."""
    slates = np.asarray(slates)
    targets = np.asarray(targets)
    hit = (slates == targets[:, None]) & (slates >= 0)
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1).astype(np.int64)


def per_user_gain(ranks: np.ndarray, metric: str, k: int = 10) -> np.ndarray:
    """Each user's contribution to ``hr``, ``ndcg`` or ``mrr`` at k (the metric is their mean)."""
    ranks = np.asarray(ranks)
    hit = (ranks >= 0) & (ranks < k)
    r = np.where(hit, ranks, 0).astype(np.float64)
    if metric == "hr":
        return hit.astype(np.float64)
    if metric == "ndcg":
        return np.where(hit, 1.0 / np.log2(r + 2.0), 0.0)
    if metric == "mrr":
        return np.where(hit, 1.0 / (r + 1.0), 0.0)
    raise ValueError(f"unknown metric {metric!r}: hr, ndcg or mrr")


def coverage(slates: np.ndarray, n_items: int, k: int = 10) -> float:
    """Distinct items in the top-k lists / catalog size."""
    top = np.asarray(slates)[:, :k]
    return float(len(np.unique(top[top >= 0])) / max(n_items, 1))


def ranking_metrics(slates: np.ndarray, targets: np.ndarray, n_items: int, k: int = 10) -> dict[str, float]:
    """``hr@k``, ``ndcg@k``, ``mrr@k`` and ``coverage@k`` of top-k lists against one target per row."""
    ranks = target_ranks(np.asarray(slates)[:, :k], targets)
    out = {f"{m}@{k}": float(per_user_gain(ranks, m, k).mean()) if len(ranks) else 0.0
           for m in ("hr", "ndcg", "mrr")}
    out[f"coverage@{k}"] = coverage(slates, n_items, k)
    return out


def paired_bootstrap_ratio(a: np.ndarray, b: np.ndarray, *, resamples: int = 2000, seed: int = 0,
                           level: float = 0.95) -> tuple[float, float, float]:
    """(ratio, lo, hi): mean(a) / mean(b) and its percentile interval from resampling users (rows) with
    replacement, the same rows for both (paired). ``a`` and ``b`` are per-user gains aligned by user."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("a and b must be non-empty 1-d arrays of the same length (paired by user)")
    rng = np.random.default_rng(seed)
    n = len(a)
    ratios = np.empty(resamples, np.float64)
    for lo in range(0, resamples, 256):  # blocks of resamples keep the index matrix small
        m = min(256, resamples - lo)
        idx = rng.integers(n, size=(m, n))
        ratios[lo:lo + m] = a[idx].mean(axis=1) / np.maximum(b[idx].mean(axis=1), 1e-300)
    tail = (1.0 - level) / 2.0
    lo_q, hi_q = np.quantile(ratios, [tail, 1.0 - tail])
    return float(a.mean() / max(b.mean(), 1e-300)), float(lo_q), float(hi_q)
