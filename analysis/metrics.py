"""Ecosystem metrics for recommender feedback loops (reference §A, ids ``M-*``): exposure and popularity.

This module holds the item-side metrics (concentration, coverage, popularity bias, exposure fairness,
novelty) and the shared slate helpers; the user-side metrics (calibration, diversity, homogenization,
polarization, drift, utility, serendipity) are in :mod:`recloop.analysis.user_metrics`. The
conventions below hold for both.

Pure, vectorised numpy functions. Every function takes arrays, never modifies them, and
returns python floats, numpy arrays or dicts of those. None of them loops over users.

Conventions shared by all functions
-----------------------------------
* A *slate* array is an int array of shape ``(n_users, k)``; ``-1`` (any negative id) marks
  an empty slot, which is ignored. A 1-D slate is treated as a single user. Positions are
  the column index (1-based ``j``); empty slots do **not** shift the positions of later items.
* "Mean over users" means over users whose slate has at least one valid item. When no
  such user exists the result is ``nan``.
* Item ids must lie in ``[0, n_items)``; out-of-range ids raise ``ValueError``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "aclt",
    "aplt",
    "arp",
    "coverage",
    "disparate_treatment",
    "entropy",
    "exposure_counts",
    "exposure_fairness",
    "gini",
    "gini_normalised",
    "head_share",
    "novelty",
    "per_user_mean",
    "popularity_lift",
    "short_head_mask",
    "user_popularity_groups",
]

_NAN = float("nan")


# --------------------------------------------------------------------------- helpers
def _slates(slates: ArrayLike, n_items: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(slates2d, valid_mask, safe_ids)``; ``safe_ids`` has empty slots replaced by 0."""
    arr = np.asarray(slates)
    if arr.size == 0:
        arr = arr.astype(np.int64)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"slates must be an integer array, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    elif arr.ndim != 2:
        raise ValueError(f"slates must be 1-D or 2-D, got shape {arr.shape}")
    valid = arr >= 0
    if n_items is not None and valid.any() and int(arr[valid].max()) >= n_items:
        raise ValueError(f"slate contains item id {int(arr[valid].max())} >= n_items={n_items}")
    safe = np.where(valid, arr, 0)
    return arr, valid, safe


def _user_mean(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-row mean of ``values`` over ``valid`` entries; ``nan`` for rows with no valid entry."""
    cnt = valid.sum(axis=1)
    tot = np.where(valid, values, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def _nanmean_or_nan(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else _NAN


def _safe_div(a: float, b: float) -> float:
    return float(a) / float(b) if b != 0 and np.isfinite(b) else _NAN


# --------------------------------------------------------------------------- M-GINI
def gini(values: ArrayLike) -> float:
    """Gini of a nonnegative exposure/consumption vector (M-GINI).

    Our choice: the un-normalised RecBole/Fleder–Hosanagar form
    ``G = Σ_j (2j − n − 1)·e_(j) / (n·Σ e)`` over **all** items (zeros included, so pass the
    full length-``n_I`` vector), with range ``[0, (n−1)/n]``. Empty input → ``nan``; an
    all-zero vector → ``0.0`` (every item equally unexposed). Negative values raise.
    Rounding is clipped into the valid range.
    """
    e = np.asarray(values, dtype=float).ravel()
    n = e.size
    if n == 0:
        return _NAN
    if np.any(e < 0):
        raise ValueError("gini requires nonnegative values")
    total = e.sum()
    if total == 0:
        return 0.0
    e_sorted = np.sort(e)
    coef = 2.0 * np.arange(1, n + 1) - n - 1
    g = float(coef @ e_sorted) / (n * total)
    return float(min(max(g, 0.0), (n - 1) / n))


def gini_normalised(values: ArrayLike) -> float:
    """Normalised Gini ``G·n/(n−1)`` in ``[0, 1]`` (M-GINI). ``n == 1`` → 0.0, empty → ``nan``."""
    e = np.asarray(values, dtype=float).ravel()
    n = e.size
    if n == 0:
        return _NAN
    if n == 1:
        return 0.0
    return float(min(gini(e) * n / (n - 1), 1.0))


# --------------------------------------------------------------------------- M-COV / M-ENT
def coverage(slates: ArrayLike, n_items: int) -> float:
    """Catalog coverage ``|∪_u L_u| / n_I`` (M-COV); ignores empty slots. ``n_items <= 0`` → ``nan``.

    For cumulative coverage, stack the slates of all cycles ``τ ≤ t``. With a growing catalog pass
    the *current* ``n_items``: the value is then a share of the current catalog and can fall over time
    (the per-cycle metric ``coverage_cum`` is defined this way).
    """
    if n_items <= 0:
        return _NAN
    arr, valid, _ = _slates(slates, n_items)
    seen = np.zeros(int(n_items), dtype=bool)
    seen[arr[valid]] = True
    return float(seen.sum() / n_items)


def exposure_counts(slates: ArrayLike, n_items: int, weighting: str = "count") -> np.ndarray:
    """Per-item exposure ``e_i = Σ_u Σ_j w(j)·1[L_u(j)=i]`` (notation §0; M-GINI, M-ENT, M-EXPFAIR).

    ``weighting="count"``: ``w ≡ 1``; ``"log"``: ``w(j) = 1/log2(1+j)`` with 1-based column ``j``.
    Returns a float array of length ``n_items``.
    """
    arr, valid, _ = _slates(slates, n_items)
    k = arr.shape[1]
    if weighting == "count":
        w = np.ones(k)
    elif weighting == "log":
        w = 1.0 / np.log2(np.arange(2, k + 2, dtype=float))
    else:
        raise ValueError(f"weighting must be 'count' or 'log', got {weighting!r}")
    weights = np.broadcast_to(w, arr.shape)[valid]
    return np.bincount(arr[valid], weights=weights, minlength=int(n_items)).astype(float)


def entropy(exposure: ArrayLike) -> float:
    """Shannon entropy (nats) of the exposure distribution ``π_i = e_i/Σe`` (M-ENT).

    Not divided by the number of distinct items (unlike RecBole ``ShannonEntropy``).
    Empty input → ``nan``; all-zero exposure → ``0.0``. Bounded by ``ln(n)``.
    """
    e = np.asarray(exposure, dtype=float).ravel()
    if e.size == 0:
        return _NAN
    if np.any(e < 0):
        raise ValueError("entropy requires nonnegative exposure")
    total = e.sum()
    if total == 0:
        return 0.0
    p = e / total
    p = p[p > 0]  # drop zeros (also subnormals that underflow), 0·ln 0 = 0
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------- M-ARP / M-APLT / M-ACLT
def per_user_mean(slates: ArrayLike, item_values: ArrayLike) -> np.ndarray:
    """Per-user mean of an item quantity over the valid slate items; ``nan`` for empty slates.

    Used for ARP (M-ARP), the per-user GAP inputs of M-POPLIFT (pass a padded history
    array as ``slates`` for profiles) and list novelty (M-NOV).
    """
    vals = np.asarray(item_values, dtype=float)
    _, valid, safe = _slates(slates, vals.shape[0])
    return _user_mean(vals[safe], valid)


def arp(slates: ArrayLike, popularity: ArrayLike) -> float:
    """Average recommendation popularity ``mean_u mean_{i∈L_u} φ(i)`` (M-ARP)."""
    return _nanmean_or_nan(per_user_mean(slates, popularity))


def short_head_mask(popularity: ArrayLike, ratio: float = 0.8) -> np.ndarray:
    """Boolean short-head mask H (M-APLT, Elliot ``pop_ratio``).

    H is the smallest prefix of items sorted by popularity descending (ties: lower item id
    first) whose cumulative count reaches ``>= ratio`` of the total. Zero total → all False.
    """
    pop = np.asarray(popularity, dtype=float).ravel()
    mask = np.zeros(pop.size, dtype=bool)
    total = pop.sum()
    if pop.size == 0 or total <= 0:
        return mask
    order = np.argsort(-pop, kind="stable")
    cum = np.cumsum(pop[order])
    target = ratio * total - 1e-9 * total  # tolerate float rounding in ratio*total
    idx = int(np.searchsorted(cum, target, side="left"))
    mask[order[: min(idx + 1, pop.size)]] = True
    return mask


def head_share(slates: ArrayLike, head_mask: ArrayLike) -> np.ndarray:
    """Per-user share of short-head items in a slate/profile (M-POPLIFT grouping input)."""
    head = np.asarray(head_mask, dtype=bool)
    _, valid, safe = _slates(slates, head.shape[0])
    return _user_mean(head[safe].astype(float), valid)


def aplt(slates: ArrayLike, head_mask: ArrayLike) -> float:
    """Average percentage of long-tail items ``mean_u |L_u ∩ T|/|L_u|`` (M-APLT); T = not head."""
    head = np.asarray(head_mask, dtype=bool)
    _, valid, safe = _slates(slates, head.shape[0])
    return _nanmean_or_nan(_user_mean((~head[safe]).astype(float), valid))


def aclt(slates: ArrayLike, head_mask: ArrayLike) -> float:
    """Average coverage of long-tail items ``mean_u |L_u ∩ T|`` (M-ACLT), over non-empty slates."""
    head = np.asarray(head_mask, dtype=bool)
    _, valid, safe = _slates(slates, head.shape[0])
    tail_cnt = (valid & ~head[safe]).sum(axis=1).astype(float)
    nonempty = valid.any(axis=1)
    return float(tail_cnt[nonempty].mean()) if nonempty.any() else _NAN


# --------------------------------------------------------------------------- M-POPLIFT
def popularity_lift(profile_pop_means: ArrayLike, rec_pop_means: ArrayLike) -> float:
    """ΔGAP = (GAP_r − GAP_p)/GAP_p for one user group (M-POPLIFT).

    Inputs are per-user mean popularities of profile and recommendations (see
    :func:`per_user_mean`). GAP_* are the means over users with a finite value in
    **both** arrays. ``> 0`` means the recommender amplifies popularity. GAP_p = 0 or no
    users → ``nan``.
    """
    p = np.asarray(profile_pop_means, dtype=float).ravel()
    r = np.asarray(rec_pop_means, dtype=float).ravel()
    if p.shape != r.shape:
        raise ValueError("profile_pop_means and rec_pop_means must have the same length")
    ok = np.isfinite(p) & np.isfinite(r)
    if not ok.any():
        return _NAN
    gap_p = float(p[ok].mean())
    gap_r = float(r[ok].mean())
    return _safe_div(gap_r - gap_p, gap_p)


def user_popularity_groups(
    head_share_per_user: ArrayLike, cuts: tuple[float, float] = (0.2, 0.8)
) -> np.ndarray:
    """Niche (0) / diverse (1) / blockbuster (2) user groups (M-POPLIFT; our cuts 20/60/20 %).

    Users are ranked by their share of short-head items; the percentile rank is
    ``(average_rank − 0.5)/n``. Group 0 if it is ``< cuts[0]``, 2 if ``> cuts[1]``, else 1.
    Tied users share a rank and thus a group (sizes are then only approximately 20/60/20;
    if everybody ties, everybody is "diverse"). Non-finite shares get group ``-1``.
    """
    s = np.asarray(head_share_per_user, dtype=float).ravel()
    lo, hi = cuts
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cuts must satisfy 0 <= lo <= hi <= 1, got {cuts}")
    groups = np.full(s.size, -1, dtype=np.int64)
    ok = np.isfinite(s)
    n = int(ok.sum())
    if n == 0:
        return groups
    pct = (_average_ranks(s[ok]) - 0.5) / n
    g = np.ones(n, dtype=np.int64)
    g[pct < lo] = 0
    g[pct > hi] = 2
    groups[ok] = g
    return groups


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """``scipy.stats.rankdata(x, method="average")`` for a finite 1-D array, without scipy's array-API
    overhead: ties share the mean of their ordinal ranks (first + (count − 1)/2, exact in float64)."""
    order = np.argsort(x, kind="stable")
    y = x[order]
    first = np.flatnonzero(np.concatenate([[True], y[1:] != y[:-1]]))
    counts = np.diff(first, append=len(y))
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat((first + 1) + (counts - 1) / 2.0, counts)
    return ranks


# --------------------------------------------------------------------------- M-EXPFAIR
def exposure_fairness(slates: ArrayLike, item_group: ArrayLike, n_items: int) -> dict[str, float]:
    """Exposure fairness between item groups G0 and G1 (protected) (M-EXPFAIR).

    Exposure uses ``v_j = 1/log2(1+j)``; ``Exp(G)`` averages over **all** items of the group,
    unexposed ones included. Returns ``exp_g0``, ``exp_g1``, ``dpr = Exp(G1)/Exp(G0)`` and
    ``share_gap = Σ_{G1} e/Σ e − |G1|/n_I``. Undefined quantities (empty group, zero
    denominator) are ``nan``.
    """
    grp = np.asarray(item_group).ravel()
    if grp.size != n_items:
        raise ValueError(f"item_group must have length n_items={n_items}")
    g1 = grp.astype(bool)
    e = exposure_counts(slates, n_items, weighting="log")
    n1 = int(g1.sum())
    n0 = int(n_items - n1)
    exp_g1 = float(e[g1].mean()) if n1 else _NAN
    exp_g0 = float(e[~g1].mean()) if n0 else _NAN
    total = float(e.sum())
    share_gap = float(e[g1].sum() / total - n1 / n_items) if total > 0 else _NAN
    dpr = _safe_div(exp_g1, exp_g0) if np.isfinite(exp_g1) else _NAN
    return {"exp_g0": exp_g0, "exp_g1": exp_g1, "dpr": dpr, "share_gap": share_gap}


def disparate_treatment(exp_g0: float, exp_g1: float, merit_g0: float, merit_g1: float) -> float:
    """Disparate-treatment ratio ``[Exp(G1)/Y(G1)] / [Exp(G0)/Y(G0)]`` (M-EXPFAIR).

    ``Y(G)`` is the mean true merit (mean V) of the group. Zero denominators → ``nan``.
    """
    r1 = _safe_div(exp_g1, merit_g1)
    r0 = _safe_div(exp_g0, merit_g0)
    if not (np.isfinite(r1) and np.isfinite(r0)):
        return _NAN
    return _safe_div(r1, r0)


# --------------------------------------------------------------------------- M-NOV
def novelty(slates: ArrayLike, popularity: ArrayLike, n_users: int) -> float:
    """Mean over users of the mean self-information ``−log2(φ(i)/n_U)`` of slate items (M-NOV).

    Our choice: items with ``φ = 0`` use ``φ = 1`` so the value stays finite (upper bound
    ``log2 n_U``). ``n_users`` is the population size used for ``φ``.
    """
    if n_users <= 0:
        return _NAN
    phi = np.maximum(np.asarray(popularity, dtype=float).ravel(), 1.0)
    nov = -np.log2(phi / n_users)
    return _nanmean_or_nan(per_user_mean(slates, nov))
