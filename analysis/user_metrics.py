"""User-side ecosystem metrics (reference §A, ids ``M-*``): calibration, diversity, homogenization,
polarization, drift, utility and serendipity.

Pure, vectorised numpy functions following the conventions of :mod:`recloop.analysis.metrics`
(slates, empty slots, means over users), whose slate helpers they share.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from recloop.analysis.metrics import _NAN, _nanmean_or_nan, _slates, _user_mean

__all__ = [
    "afsr",
    "bimodality_coefficient",
    "disagreement",
    "drift",
    "esteban_ray",
    "esteban_ray_from_hist",
    "genre_distribution",
    "intra_list_diversity",
    "jaccard",
    "mean_pair_jaccard",
    "mean_pair_jaccard_slates",
    "miscalibration",
    "polarization_variance",
    "regret",
    "serendipity",
    "utility_stats",
]


# --------------------------------------------------------------------------- M-CALKL
def genre_distribution(
    slates: ArrayLike, item_genres: ArrayLike, position_weights: ArrayLike | None = None
) -> np.ndarray:
    """Per-user genre distribution ``q(g|u)`` = weighted mean of ``p(g|i)`` over slate items (M-CALKL).

    ``item_genres`` is ``(n_items, G)`` with rows ``p(g|i)``. Default weights ``w ≡ 1``;
    optional ``position_weights`` (length ``k``) gives rank weights ``w_{r(i)}``. Works for
    histories too (pass a ``-1``-padded history array). Users with no valid item → ``nan`` row.
    """
    pg = np.asarray(item_genres, dtype=float)
    if pg.ndim != 2:
        raise ValueError("item_genres must be 2-D (n_items, G)")
    arr, valid, safe = _slates(slates, pg.shape[0])
    k = arr.shape[1]
    w = np.ones(k) if position_weights is None else np.asarray(position_weights, dtype=float).ravel()
    if w.size != k:
        raise ValueError(f"position_weights must have length k={k}")
    wm = valid * w[None, :]
    acc = np.zeros((arr.shape[0], pg.shape[1]))
    for j in range(k):  # loop over slate positions (small k), not users
        acc += wm[:, j, None] * pg[safe[:, j]]
    wsum = wm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = acc / wsum[:, None]
    out[wsum <= 0] = np.nan
    return out


def miscalibration(target: ArrayLike, realised: ArrayLike, alpha: float = 0.01) -> np.ndarray:
    """Per-user Steck miscalibration ``C_KL(p, q̃) = Σ_g p log(p/q̃)``, ``q̃ = (1−α)q + αp`` (M-CALKL).

    Rows are distributions over genres (target ``p`` from history, realised ``q`` from the
    slate); terms with ``p = 0`` contribute 0. 1-D inputs are one user. Rows where either
    distribution is all zero/nan (no history or empty slate) give ``nan``. Report the mean.
    """
    p = np.atleast_2d(np.asarray(target, dtype=float))
    q = np.atleast_2d(np.asarray(realised, dtype=float))
    if p.shape != q.shape:
        raise ValueError(f"target and realised shapes differ: {p.shape} vs {q.shape}")
    q_t = (1.0 - alpha) * q + alpha * p
    pos = p > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(pos, p * np.log(np.where(pos, p, 1.0) / np.where(pos, q_t, 1.0)), 0.0)
    out = terms.sum(axis=1)
    bad = ~(np.nansum(p, axis=1) > 0) | ~(np.nansum(q, axis=1) > 0) | np.isnan(p).any(1) | np.isnan(q).any(1)
    out[bad] = np.nan
    return out


# --------------------------------------------------------------------------- M-ILD / AFSR
def intra_list_diversity(slates: ArrayLike, item_attrs: ArrayLike) -> np.ndarray:
    """Per-user ILD = mean over item pairs ``i<j`` of ``1 − cos(a_i, a_j)`` (M-ILD), in ``[0, 2]``.

    Uses ``Σ_{i≠j} cos = ‖Σ_i â_i‖² − Σ_i ‖â_i‖²`` with unit-normalised ``â`` (einsum), so memory
    is O(n_users·d). Zero attribute vectors have cosine 0 with everything (distance 1).
    Users with fewer than 2 valid items → ``nan``. Duplicated items count as a pair at distance 0.
    """
    a = np.asarray(item_attrs, dtype=float)
    if a.ndim != 2:
        raise ValueError("item_attrs must be 2-D (n_items, d)")
    arr, valid, safe = _slates(slates, a.shape[0])
    norms = np.linalg.norm(a, axis=1)
    a_hat = np.divide(a, norms[:, None], out=np.zeros_like(a), where=norms[:, None] > 0)
    n_users, k = arr.shape
    s = np.zeros((n_users, a.shape[1]))
    diag = np.zeros(n_users)
    for j in range(k):  # loop over slate positions (small k), not users
        x = a_hat[safe[:, j]] * valid[:, j, None]
        s += x
        diag += np.einsum("ud,ud->u", x, x)
    offdiag = np.einsum("ud,ud->u", s, s) - diag
    m = valid.sum(axis=1).astype(float)
    denom = m * (m - 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ild = 1.0 - offdiag / denom
    ild = np.clip(ild, 0.0, 2.0)
    ild[m < 2] = np.nan
    return ild


def afsr(slates: ArrayLike, item_attrs: ArrayLike) -> float:
    """T-RECS ``AverageFeatureScoreRange`` (M-ILD companion).

    As in T-RECS: per user, max minus min of the recommended items' attribute values taken
    jointly over attributes and slate; then the mean over users with a non-empty slate.
    """
    a = np.asarray(item_attrs, dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    _, valid, safe = _slates(slates, a.shape[0])
    if a.shape[1] == 0 or not valid.any():
        return _NAN
    item_max = a.max(axis=1)
    item_min = a.min(axis=1)
    umax = np.where(valid, item_max[safe], -np.inf).max(axis=1)
    umin = np.where(valid, item_min[safe], np.inf).min(axis=1)
    nonempty = valid.any(axis=1)
    return float((umax - umin)[nonempty].mean())


# --------------------------------------------------------------------------- M-HOMOG
def jaccard(a: ArrayLike, b: ArrayLike) -> float:
    """Jaccard index ``|A∩B|/|A∪B|`` of two item sets (M-HOMOG).

    Duplicates and negative ids (empty slots) are ignored. Our choice: two empty sets → 0.0.
    """
    sa = np.unique(np.asarray(a).ravel())
    sb = np.unique(np.asarray(b).ravel())
    sa = sa[sa >= 0]
    sb = sb[sb >= 0]
    inter = np.intersect1d(sa, sb, assume_unique=True).size
    union = sa.size + sb.size - inter
    return float(inter / union) if union > 0 else 0.0


def _gather_rows(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate CSR rows ``rows``; returns ``(segment_id, values)``."""
    starts = indptr[rows]
    lens = indptr[rows + 1] - starts
    total = int(lens.sum())
    seg = np.repeat(np.arange(rows.size), lens)
    offs = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
    vals = indices[np.repeat(starts, lens) + offs]
    return seg, vals


def mean_pair_jaccard(indptr: ArrayLike, indices: ArrayLike, pairs: ArrayLike) -> float:
    """Mean Jaccard over fixed user pairs ``Hom = (1/|P|) Σ_{(u,v)} J(H_u, H_v)`` (M-HOMOG).

    ``(indptr, indices)`` is a CSR of per-user item sets (histories ``H_u`` or slates);
    ``pairs`` is a ``(P, 2)`` int array of user ids. Fully vectorised via (pair, item) keys.
    Pairs of two empty sets count as 0 (see :func:`jaccard`). No pairs → ``nan``.
    """
    ip = np.asarray(indptr, dtype=np.int64).ravel()
    ind = np.asarray(indices, dtype=np.int64).ravel()
    pr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    n_pairs = pr.shape[0]
    if n_pairs == 0:
        return _NAN
    seg_u, vals_u = _gather_rows(ip, ind, pr[:, 0])
    seg_v, vals_v = _gather_rows(ip, ind, pr[:, 1])
    keep_u, keep_v = vals_u >= 0, vals_v >= 0
    seg_u, vals_u, seg_v, vals_v = seg_u[keep_u], vals_u[keep_u], seg_v[keep_v], vals_v[keep_v]
    m = int(max(vals_u.max(initial=-1), vals_v.max(initial=-1))) + 1
    m = max(m, 1)
    ku = np.unique(seg_u * m + vals_u)
    kv = np.unique(seg_v * m + vals_v)
    size_u = np.bincount(ku // m, minlength=n_pairs)
    size_v = np.bincount(kv // m, minlength=n_pairs)
    inter = np.bincount(np.intersect1d(ku, kv, assume_unique=True) // m, minlength=n_pairs)
    union = size_u + size_v - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        j = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return float(j.mean())


def mean_pair_jaccard_slates(slates: ArrayLike, pairs: ArrayLike) -> float:
    """Mean pair Jaccard of recommendation sets ``J(L_u, L_v)`` (M-HOMOG "recommendation similarity")."""
    arr, valid, _ = _slates(slates)
    indptr = np.concatenate([[0], np.cumsum(valid.sum(axis=1))])
    return mean_pair_jaccard(indptr, arr[valid], pairs)


# --------------------------------------------------------------------------- M-POLAR
def polarization_variance(z: ArrayLike) -> tuple[float, float]:
    """Polarization ``P = Σ_u (z_u − z̄)²`` and its mean version ``Var(z)`` (M-POLVAR).

    For 2-D ``(n_users, d)`` input this is the trace version ``Σ_u ‖x_u − x̄‖²`` and the trace
    of the (population, ddof=0) covariance. Empty input → ``(0.0, nan)``.
    """
    x = np.asarray(z, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    if x.shape[0] == 0:
        return 0.0, _NAN
    p = float(((x - x.mean(axis=0)) ** 2).sum())
    return p, p / x.shape[0]


def disagreement(z: ArrayLike, edges: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Network disagreement ``D = Σ_{(u,v)∈E} w_uv (z_u − z_v)²`` (M-DISAGREE).

    ``edges`` is ``(E, 2)``; weights default to 1. For 2-D ``z`` the squared L2 distance is used.
    No edges → 0.0.
    """
    x = np.asarray(z, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if e.shape[0] == 0:
        return 0.0
    d2 = ((x[e[:, 0]] - x[e[:, 1]]) ** 2).sum(axis=1)
    w = np.ones(e.shape[0]) if weights is None else np.asarray(weights, dtype=float).ravel()
    return float(w @ d2)


def esteban_ray_from_hist(pi: ArrayLike, y: ArrayLike, a: float = 1.0, K: float = 1.0) -> float:
    """Esteban–Ray polarization ``K Σ_b Σ_c π_b^{1+a} π_c |y_b − y_c|`` (M-ER), ``a ∈ (0, 1.6]``."""
    if not 0.0 < a <= 1.6:
        raise ValueError(f"Esteban-Ray parameter a must lie in (0, 1.6], got {a}")
    p = np.asarray(pi, dtype=float).ravel()
    yy = np.asarray(y, dtype=float).ravel()
    if p.shape != yy.shape:
        raise ValueError("pi and y must have the same length")
    if p.size == 0:
        return _NAN
    dist = np.abs(yy[:, None] - yy[None, :])
    return float(K * (p ** (1.0 + a)) @ dist @ p)


def esteban_ray(z: ArrayLike, bins: int = 10, a: float = 1.0, K: float = 1.0) -> float:
    """Esteban–Ray polarization of opinions ``z`` (M-ER).

    Our choice of histogram: ``bins`` equal-width bins over ``[min z, max z]``, ``y_b`` the bin
    centre, ``π_b`` the fraction of users. Empty input → ``nan``; constant ``z`` → 0.0.
    """
    x = np.asarray(z, dtype=float).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return _NAN
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        return 0.0
    counts, edges = np.histogram(x, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    return esteban_ray_from_hist(counts / x.size, centres, a=a, K=K)


def bimodality_coefficient(z: ArrayLike) -> float:
    """Bimodality coefficient ``BC = (g²+1)/(κ + 3(n−1)²/((n−2)(n−3)))`` (M-BC).

    ``g``, ``κ``: bias-corrected skewness and excess kurtosis (scipy, ``bias=False``).
    ``BC > 5/9`` suggests bimodality. ``n < 4`` or constant input → ``nan``.
    """
    x = np.asarray(z, dtype=float).ravel()
    n = x.size
    if n < 4 or np.all(x == x[0]):
        return _NAN
    g = stats.skew(x, bias=False)
    kappa = stats.kurtosis(x, fisher=True, bias=False)
    return float((g**2 + 1.0) / (kappa + 3.0 * (n - 1) ** 2 / ((n - 2) * (n - 3))))


# --------------------------------------------------------------------------- M-DRIFT
def drift(x_now: ArrayLike, x0: ArrayLike) -> dict[str, np.ndarray]:
    """Preference drift per user (M-DRIFT): ``1 − cos(x_t, x_0)``, the angle, and ``‖x_t − x_0‖₂``.

    Rows are users (1-D input = one user). Zero vectors: both zero → distance 0, angle 0;
    exactly one zero → cosine taken as 0 (distance 1, angle π/2). Report mean and 90th pct.
    """
    a = np.atleast_2d(np.asarray(x_now, dtype=float))
    b = np.atleast_2d(np.asarray(x0, dtype=float))
    if a.shape != b.shape:
        raise ValueError(f"x_now and x0 shapes differ: {a.shape} vs {b.shape}")
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    dot = np.einsum("ud,ud->u", a, b)
    denom = na * nb
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), 0.0)
    cos = np.clip(cos, -1.0, 1.0)
    both_zero = (na == 0) & (nb == 0)
    cos[both_zero] = 1.0
    return {
        "cosine_distance": 1.0 - cos,
        "angle": np.arccos(cos),
        "l2": np.linalg.norm(a - b, axis=1),
    }


# --------------------------------------------------------------------------- M-UTIL
def utility_stats(chosen_utility: ArrayLike, n_users: int, n_clicks: int, n_slots: int) -> dict[str, float]:
    """Mean utility, CTR and no-click rate for one cycle (M-UTIL).

    ``mean_utility = (1/n_U) Σ_u V_{u,c_u}``; ``chosen_utility`` is per user (nan or 0 for a
    no-click, both count as 0; a 2-D array is summed per row for multi-click models).
    ``ctr = n_clicks/n_slots`` with ``n_slots = Σ|L_u|``. Our choice: ``no_click_rate =
    1 − n_clicks/n_users`` (at most one click per user, as in U-MNL), clipped at 0.
    Zero denominators → ``nan``.
    """
    u = np.asarray(chosen_utility, dtype=float)
    total = float(np.nansum(u))
    mean_u = total / n_users if n_users > 0 else _NAN
    ctr = n_clicks / n_slots if n_slots > 0 else _NAN
    ncr = max(0.0, 1.0 - n_clicks / n_users) if n_users > 0 else _NAN
    return {"mean_utility": float(mean_u), "ctr": float(ctr), "no_click_rate": float(ncr)}


def regret(best_utility: ArrayLike, chosen_utility: ArrayLike) -> float:
    """Regret ``Σ_u (V_{u,i*} − V_{u,c_u})`` (M-UTIL); a no-click (nan) chosen utility counts 0."""
    b = np.asarray(best_utility, dtype=float).ravel()
    c = np.nan_to_num(np.asarray(chosen_utility, dtype=float).ravel(), nan=0.0)
    if b.shape != c.shape:
        raise ValueError("best_utility and chosen_utility must have the same length")
    return float(np.nansum(b - c))



# --------------------------------------------------------------------------- M-SEREN
def serendipity(slates: ArrayLike, primitive_items: ArrayLike, useful_mask_per_user: ArrayLike) -> float:
    """Serendipity ``mean_u |(L_u \\ PM_u) ∩ USEFUL_u| / |L_u|`` (M-SEREN).

    ``primitive_items``: ``(n_users, k2)`` int array (``-1`` = empty) of the primitive
    recommender's list PM_u (our choice: popularity top-k). ``useful_mask_per_user``:
    ``(n_users, k)`` bool aligned with ``slates`` (True if ``V_ui ≥ τ_use``).
    No users (or no user with a valid slate item) → ``nan``, like the other means over users.
    """
    arr, valid, _ = _slates(slates)
    if arr.shape[0] == 0:
        return _NAN
    pm = np.asarray(primitive_items)
    if pm.size == 0:
        pm = np.full((arr.shape[0], 0), -1, dtype=np.int64)
    pm = pm.reshape(arr.shape[0], -1)
    useful = np.asarray(useful_mask_per_user, dtype=bool).reshape(arr.shape)
    in_pm = (arr[:, :, None] == pm[:, None, :]).any(axis=2)
    hit = valid & ~in_pm & useful
    return _nanmean_or_nan(_user_mean(hit.astype(float), valid))
