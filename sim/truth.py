"""Truth fitting for the data-set worlds: subset, split and factorise a :class:`RatingsTable`.

True prefs/attrs are a rank-``dim`` factorisation of the binary "liked" matrix (PureSVD or implicit
ALS, deterministic for ``fit_seed``), so V_ui is a predicted probability that u likes i. The initial
organic log is each user's first ``initial_fraction`` of positives by time; optional creators come
from a spherical k-means of the item factors.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import scipy.sparse as sp
from pydantic import Field

from recloop.errors import RecloopInputError
from recloop.limits import Seed
from recloop.registry import Params
from recloop.sim.data_loaders import RatingsTable
from recloop.sim.generators import CreatorCount, Dim, ItemCount, UserCount, mean_by_creator, normalise_rows
from recloop.sim.titles import make_titles


class FitParams(Params):
    dim: Dim = Field(32, description="latent dimension of the fitted truth")
    n_users: UserCount | None = Field(None, description="keep the most active users (None: all)")
    n_items: ItemCount | None = Field(None, description="keep the most-rated items (None: all)")
    min_rating: float = Field(4.0, description="ratings >= this are positives")
    fit: Literal["svd", "als"] = Field("svd", description="PureSVD (scipy svds) or implicit ALS")
    fit_seed: Seed = Field(0, description="seed of the fit (the world does not depend on the run seed)")
    initial_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        1.0, description="share of each user's positives, by time, in the initial organic log"
    )
    n_creators: CreatorCount = Field(0, description="derive creators by clustering item factors (0: none)")


@dataclass
class Fitted:
    prefs: np.ndarray
    attrs: np.ndarray
    genres: np.ndarray
    genre_names: list[str]
    titles: list[str]
    user_attributes: dict[str, np.ndarray]
    log_users: np.ndarray
    log_items: np.ndarray
    held_users: np.ndarray
    held_items: np.ndarray
    group: np.ndarray
    creator: np.ndarray
    creator_profiles: np.ndarray | None
    creator_group: np.ndarray | None
    meta: dict[str, Any]
    log_timestamps: np.ndarray | None = None  # times of log_users/log_items (aligned)
    held_timestamps: np.ndarray | None = None  # times of held_users/held_items (aligned)


def _single_thread_blas() -> contextlib.AbstractContextManager:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional (a dependency of implicit): only a speed-up
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


_FACTOR_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _fit_factors(pos: sp.csr_matrix, dim: int, method: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(user factors, item factors) whose inner products approximate the binary matrix ``pos``.

    ``svd``: PureSVD (Cremonesi et al. 2010), truncated SVD by ARPACK with a fixed start vector,
    split symmetrically (U·√S, V·√S) and sign-fixed, so the result is deterministic. ``als``: implicit
    ALS (E-ALS, Hu et al. 2008) on one thread with ``random_state=seed``.
    """
    if method == "svd":
        from scipy.sparse.linalg import svds

        with _single_thread_blas():  # ARPACK's many small BLAS calls thrash a multi-threaded BLAS
            u, s, vt = svds(pos.astype(np.float64), k=dim, random_state=np.random.default_rng(seed))
        order = np.argsort(-s)
        u, s, vt = u[:, order], s[order], vt[order]
        sign = np.where(vt.sum(axis=1) < 0, -1.0, 1.0)
        root = np.sqrt(np.maximum(s, 0.0))
        return u * (sign * root), vt.T * (sign * root)
    from implicit.cpu.als import AlternatingLeastSquares

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # implicit's OpenBLAS thread-pool advice
        model = AlternatingLeastSquares(
            factors=dim, regularization=0.05, alpha=1.0, iterations=15, random_state=seed, num_threads=1
        )
        model.fit(pos.astype(np.float32).tocsr(), show_progress=False)
    return np.asarray(model.user_factors, np.float64), np.asarray(model.item_factors, np.float64)


def _spherical_kmeans(x: np.ndarray, k: int, seed: int, iters: int = 25) -> np.ndarray:
    """Cluster labels of the rows of ``x`` by cosine k-means (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    xn = normalise_rows(x)
    cent = xn[rng.choice(len(xn), size=k, replace=False)]
    labels = np.zeros(len(xn), np.int64)
    for _ in range(iters):
        sim = xn @ cent.T
        labels = sim.argmax(axis=1)
        counts = np.bincount(labels, minlength=k)
        for empty in np.flatnonzero(counts == 0):  # re-seed an empty cluster with the worst-fit item
            worst = int(np.argmin(sim[np.arange(len(xn)), labels]))
            labels[worst] = empty
            sim[worst, labels[worst]] = np.inf
        new = np.zeros_like(cent)
        np.add.at(new, labels, xn)
        new = normalise_rows(new)
        if np.allclose(new, cent):
            break
        cent = new
    return labels


def short_head(users: np.ndarray, items: np.ndarray, n_items: int, share: float = 0.8) -> np.ndarray:
    """Boolean (n_items,): the most-interacted items that together hold ``share`` of the interactions."""
    counts = np.bincount(items, minlength=n_items)
    order = np.lexsort((np.arange(n_items), -counts))
    cum = np.cumsum(counts[order])
    head = np.zeros(n_items, bool)
    if cum[-1] > 0:
        n_head = int(np.searchsorted(cum, share * cum[-1], side="left")) + 1
        head[order[:n_head]] = True
    return head


def _check_sizes(table: RatingsTable, p: FitParams, where: str) -> None:
    n_u_all, n_i_all = len(table.user_ids), len(table.item_ids)
    for key, want, have in (("n_users", p.n_users, n_u_all), ("n_items", p.n_items, n_i_all)):
        if want is not None and want > have:
            raise RecloopInputError(
                f"{key}={want} but {where} has only {have}; use at most {have} or leave it unset.", key=f"world.{key}"
            )


def _most_active(codes: np.ndarray, n_all: int, n_keep: int | None) -> np.ndarray:
    """The ``n_keep`` codes with the most rows, sorted (ties: lower original position; None: all)."""
    return np.sort(np.lexsort((np.arange(n_all), -np.bincount(codes, minlength=n_all)))[: n_keep or n_all])


def _positives(table: RatingsTable, p: FitParams, keep_u: np.ndarray, keep_i: np.ndarray):
    """(users, items, times) of the kept positives in kept codes, each (user, item) once (its first time)."""
    u_map = np.full(len(table.user_ids), -1, np.int64)
    u_map[keep_u] = np.arange(len(keep_u))
    i_map = np.full(len(table.item_ids), -1, np.int64)
    i_map[keep_i] = np.arange(len(keep_i))
    u, i = u_map[table.user], i_map[table.item]
    rows = (u >= 0) & (i >= 0)
    if table.rating is not None:
        rows &= table.rating >= p.min_rating
    u, i, ts = u[rows], i[rows], table.timestamp[rows]
    # deduplicate (user, item) positives, keeping the first time
    order = np.lexsort((ts, i, u))
    u, i, ts = u[order], i[order], ts[order]
    first = np.ones(len(u), bool)
    first[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    return u[first], i[first], ts[first]


def _check_positives(table: RatingsTable, p: FitParams, where: str, n_pos: int, n_u: int, n_i: int) -> None:
    if n_pos == 0:
        raise RecloopInputError(
            f"{where} has no positive interactions"
            + (f" with rating >= {p.min_rating}" if table.rating is not None else "")
            + " among the kept users and items; lower min_rating or keep more users/items.",
            key="world.min_rating" if table.rating is not None else "world",
        )
    if p.dim >= min(n_u, n_i):
        raise RecloopInputError(
            f"dim={p.dim} must be smaller than the number of users ({n_u}) and items ({n_i}) of {where}.",
            key="world.dim",
        )


def _initial_split(u: np.ndarray, i: np.ndarray, ts: np.ndarray, n_u: int, fraction: float):
    """Sort the positives by (user, time, item) and mark each user's first ceil(fraction * n) as the
    initial organic log: ``(u, i, ts, in_log)``."""
    order = np.lexsort((i, ts, u))
    u, i, ts = u[order], i[order], ts[order]
    per_user = np.bincount(u, minlength=n_u)
    starts = np.concatenate([[0], np.cumsum(per_user)[:-1]])
    rank = np.arange(len(u)) - starts[u]
    in_log = rank < np.ceil(fraction * per_user[u] - 1e-9)
    return u, i, ts, in_log


def _cached_factors(table: RatingsTable, p: FitParams, u: np.ndarray, i: np.ndarray, n_u: int, n_i: int):
    # the fit does not depend on initial_fraction or n_creators: share it between such variants
    key = (table, p.n_users, p.n_items, p.min_rating, p.dim, p.fit, p.fit_seed)
    if key not in _FACTOR_CACHE:
        if len(_FACTOR_CACHE) >= 8:
            _FACTOR_CACHE.clear()
        pos = sp.csr_matrix((np.ones(len(u)), (u, i)), shape=(n_u, n_i))
        _FACTOR_CACHE[key] = _fit_factors(pos, p.dim, p.fit, p.fit_seed)
    return _FACTOR_CACHE[key]


def _genre_matrix(table: RatingsTable, keep_i: np.ndarray, n_i: int) -> tuple[list[str], np.ndarray]:
    """Genres: multi-hot of the item's labels normalised to 1 (uniform when an item has none)."""
    if table.item_genres is not None:
        names = sorted({g for gs in table.item_genres for g in gs}) or ["unknown"]
        col = {g: c for c, g in enumerate(names)}
        genres = np.zeros((n_i, len(names)), np.float64)
        for r, orig in enumerate(keep_i):
            for g in table.item_genres[orig]:
                genres[r, col[g]] = 1.0
    else:
        names = ["unknown"]
        genres = np.zeros((n_i, 1))
    empty = genres.sum(axis=1) == 0
    genres[empty] = 1.0
    genres /= genres.sum(axis=1, keepdims=True)
    return names, genres


def _item_titles(table: RatingsTable, keep_i: np.ndarray, names: list[str], genres: np.ndarray,
                 seed: int) -> tuple[list[str], int]:
    """(titles of the kept items, number of duplicate titles told apart); synthetic without titles."""
    duplicates = 0
    if table.titles is None:
        return make_titles(np.random.default_rng(seed), len(keep_i), names, genres), duplicates
    titles, seen = [], set()
    for orig in keep_i:
        t = table.titles[orig]
        if t in seen:  # ML-100K lists 18 films twice under two ids: keep ids, tell titles apart
            duplicates += 1
            k = 2
            while f"{t} [{k}]" in seen:
                k += 1
            t = f"{t} [{k}]"
        seen.add(t)
        titles.append(t)
    return titles, duplicates


def _derive_creators(a: np.ndarray, group: np.ndarray, n_creators: int, seed: int):
    """(item creator, creator profiles, creator group, creator item sigma) from clustering item factors."""
    n_i = len(a)
    if n_creators <= 0:
        return np.full(n_i, -1, np.int32), None, None, None
    k = min(n_creators, n_i)
    creator = _spherical_kmeans(a, k, seed).astype(np.int32)
    profiles, counts = mean_by_creator(a, creator, k)
    tail_share = mean_by_creator(group[:, None].astype(np.float64), creator, k)[0][:, 0]
    cgroup = (tail_share >= 0.5).astype(np.int8)
    sigma_creator = float(np.sqrt(np.mean((a - profiles[creator]) ** 2)))
    return creator, profiles, cgroup, sigma_creator


def fit_ratings(table: RatingsTable, p: FitParams) -> Fitted:
    """Subset, split and fit a ratings table into world arrays (shared by the data-set generators)."""
    where = f"data set {table.name} ({table.source})"
    _check_sizes(table, p, where)
    # keep the most active users and the most-rated items (ties: lower original position)
    keep_u = _most_active(table.user, len(table.user_ids), p.n_users)
    keep_i = _most_active(table.item, len(table.item_ids), p.n_items)
    u, i, ts = _positives(table, p, keep_u, keep_i)
    n_u, n_i = len(keep_u), len(keep_i)
    _check_positives(table, p, where, len(u), n_u, n_i)
    # initial organic log: each user's first ceil(initial_fraction * n_u) positives by time
    u, i, ts, in_log = _initial_split(u, i, ts, n_u, p.initial_fraction)

    x, a = _cached_factors(table, p, u, i, n_u, n_i)
    head = short_head(u[in_log], i[in_log], n_i, 0.8)
    group = (~head).astype(np.int8)
    names, genres = _genre_matrix(table, keep_i, n_i)
    titles, duplicates = _item_titles(table, keep_i, names, genres, p.fit_seed)
    creator, profiles, cgroup, sigma_creator = _derive_creators(a, group, p.n_creators, p.fit_seed)
    sigma_items = float(np.sqrt(np.mean((a - a.mean(axis=0)) ** 2)))

    v_pos = np.einsum("nd,nd->n", x[u], a[i])
    rs = np.random.default_rng(p.fit_seed)
    ru, ri = rs.integers(n_u, size=20000), rs.integers(n_i, size=20000)
    v_rand = np.einsum("nd,nd->n", x[ru], a[ri])

    meta = {
        "simplex": False,
        "dataset": table.name,
        "source": table.source,
        "fit": p.fit,
        "n_positives": int(len(u)),
        "n_initial": int(in_log.sum()),
        "n_held": int((~in_log).sum()),
        "short_head_share": 0.8,
        "n_head_items": int(head.sum()),
        "duplicate_titles": duplicates,
        "utility_mean_positive": float(v_pos.mean()),
        "utility_mean_random": float(v_rand.mean()),
        "item_noise_sigma": sigma_items,
        "creator_item_sigma": sigma_creator,
        "n_items_initial": n_i,
        "user_ids": [table.user_ids[j] for j in keep_u],
        "item_ids": [table.item_ids[j] for j in keep_i],
    }
    return Fitted(
        prefs=x.astype(np.float32),
        attrs=a.astype(np.float32),
        genres=genres.astype(np.float32),
        genre_names=names,
        titles=titles,
        user_attributes={key: np.asarray(col)[keep_u] for key, col in table.user_attributes.items()},
        log_users=u[in_log],
        log_items=i[in_log],
        held_users=u[~in_log],
        held_items=i[~in_log],
        group=group,
        creator=creator,
        creator_profiles=None if profiles is None else profiles.astype(np.float32),
        creator_group=cgroup,
        meta=meta,
        log_timestamps=ts[in_log],
        held_timestamps=ts[~in_log],
    )


@functools.lru_cache(maxsize=8)
def cached_fit(table: RatingsTable, params: FitParams) -> Fitted:
    return fit_ratings(table, params)
