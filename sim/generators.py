"""World generators: synthetic (U-CHANEY, Gaussian clusters) and real-data (MovieLens-100K, a CSV file).

Every generator is registered as a ``world`` component and implements

* ``build(rng) -> World``: users (true preferences x_u), items (attributes a_i, genres p(g|i), readable
  titles, creator, group) and creators (profiles and group flags);
* ``initial_log(world, rng) -> TrainingData | None``: real data sets return their real interactions
  (provenance 0, organic); synthetic worlds return None (the simulator draws an organic log);
* ``new_items(creator_ids, world, rng) -> (attrs, genres, titles)``: the items those creators make this
  cycle (CR-TRECS). A creator id of -1 means "no creator": the item is drawn from the world's prior.

The simulator's true utility is V_ui = <x_u, a_i>. Its scale per world:

* ``chaney``: θ·β with θ, β on the simplex, so V ≈ 1/d on average (0.05 for d = 20; the best pairs
  reach ~0.7). That is the reference model's scale: the choice models' temperature sets how sharp
  choices are (e.g. MNL temperature ≈ 0.02).
* ``gaussian_clusters``: unit vectors, V = cosine ∈ [-1, 1]; ≈ 1/(1+spread²) within a cluster.
* ``movielens`` / ``interactions_csv``: a rank-``dim`` fit of the binary "liked" matrix, so V is a
  predicted probability that u likes i (≈ 0.5 for liked pairs, ≈ 0.03 for random pairs on ML-100K).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import scipy.sparse as sp
from pydantic import Field

from recloop.errors import RecloopInputError
from recloop.limits import MAX_CLUSTERS, MAX_CREATORS, MAX_DIM, MAX_ITEMS, MAX_USERS, Seed
from recloop.recommenders.base import TrainingData
from recloop.registry import Params, register
from recloop.sim.state import Creators, Items, Users, World
from recloop.sim.titles import make_titles

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
UserCount = Annotated[int, Field(gt=0, le=MAX_USERS)]
ItemCount = Annotated[int, Field(gt=0, le=MAX_ITEMS)]
Dim = Annotated[int, Field(gt=0, le=MAX_DIM)]
CreatorCount = Annotated[int, Field(ge=0, le=MAX_CREATORS)]

#: Readable genre names for synthetic worlds (genre g gets name g; beyond the list, "Genre g").
SYNTHETIC_GENRES = (
    "Drama", "Comedy", "Action", "Romance", "Sci-Fi", "Horror", "Mystery", "Fantasy", "Adventure",
    "Animation", "Documentary", "Thriller", "Crime", "Western", "Musical", "War", "Family", "Film-Noir",
    "History", "Biography", "Sport", "Music", "Children's", "Cyberpunk",
)

ML100K = "MovieLens-100K"
INSTALL_HINT = "pip install --no-deps recbole==1.2.1"


def synthetic_genre_names(n: int) -> list[str]:
    return [SYNTHETIC_GENRES[g] if g < len(SYNTHETIC_GENRES) else f"Genre {g}" for g in range(n)]


def dirichlet_rows(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """One Dirichlet draw per row of ``alpha`` (m, d), stable for tiny concentrations.

    Uses Gamma(α) = Gamma(α+1)·U^{1/α} in log space, so α ≈ 1e-4 (CR-TRECS Dir(0.1·c_j) with sparse
    c_j) gives near one-hot rows instead of 0/0.
    """
    alpha = np.maximum(np.asarray(alpha, dtype=np.float64), 1e-12)
    g = rng.standard_gamma(alpha + 1.0)
    u = rng.random(alpha.shape)
    logg = np.log(g) + np.log(u) / alpha
    logg -= logg.max(axis=1, keepdims=True)
    w = np.exp(logg)
    return w / w.sum(axis=1, keepdims=True)


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def assign_creators(
    rng: np.random.Generator, n_items: int, n_creators: int, protected_share: float
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(item creator (n_items,) int32 or -1, creator group (n_creators,) int8 or None, item group).

    Items are dealt round-robin to creators in random order, so every creator has ⌊n_items/n_creators⌋
    or one more item. round(protected_share·n_creators) random creators form group 1 and their items
    inherit it; without creators round(protected_share·n_items) random items are group 1.
    """
    if n_creators <= 0:
        group = np.zeros(n_items, np.int8)
        group[rng.permutation(n_items)[: round(protected_share * n_items)]] = 1
        return np.full(n_items, -1, np.int32), None, group
    creator = rng.permutation(np.arange(n_items) % n_creators).astype(np.int32)
    cgroup = np.zeros(n_creators, np.int8)
    cgroup[rng.permutation(n_creators)[: round(protected_share * n_creators)]] = 1
    return creator, cgroup, cgroup[creator].astype(np.int8)


def _mean_by_creator(
    values: np.ndarray, creator: np.ndarray, n_creators: int
) -> tuple[np.ndarray, np.ndarray]:
    """(per-creator mean of ``values`` rows, item counts) over items with creator >= 0."""
    mask = creator >= 0
    sums = np.zeros((n_creators, values.shape[1]), np.float64)
    np.add.at(sums, creator[mask], values[mask])
    counts = np.bincount(creator[mask], minlength=n_creators)
    return sums / np.maximum(counts, 1)[:, None], counts


class WorldGenerator:
    """Base class for world generators (registered with ``@register("world", name)``)."""

    class Params(Params):
        pass

    def __init__(self, params: Params | None = None, **context: Any):
        self.params = params if params is not None else type(self).Params()
        self.context = context
        self._title_cache: tuple[list[str], int, set[str]] | None = None

    def build(self, rng: np.random.Generator) -> World:
        raise NotImplementedError

    def initial_log(self, world: World, rng: np.random.Generator) -> TrainingData | None:
        """The real organic log for data-set worlds; None lets the simulator draw one."""
        return None

    def new_items(
        self, creator_ids: np.ndarray, world: World, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------
    def existing_titles(self, world: World) -> set[str]:
        """The set of titles in the catalog, updated incrementally (titles are only appended)."""
        titles = world.items.titles
        n = len(titles)
        cache = self._title_cache
        if cache is None or cache[0] is not titles or cache[1] > n:
            cache = (titles, 0, set())
        seen = cache[2]
        seen.update(titles[cache[1]:n])
        self._title_cache = (titles, n, seen)
        return seen

    def _titles(self, rng: np.random.Generator, world: World, genres: np.ndarray) -> list[str]:
        existing = self.existing_titles(world)
        return make_titles(rng, len(genres), world.items.genre_names, genres, existing=existing)

    @staticmethod
    def _check_creators(creator_ids: np.ndarray, world: World) -> np.ndarray:
        ids = np.asarray(creator_ids, dtype=np.int64).reshape(-1)
        n_creators = world.creators.n if world.creators is not None else 0
        if len(ids) and (ids.max() >= n_creators or ids.min() < -1):
            raise ValueError(
                f"creator ids must be -1 (no creator) or in [0, {n_creators}); got {ids.min()}..{ids.max()}"
            )
        return ids


# ---------------------------------------------------------------------------------------------
# U-CHANEY
# ---------------------------------------------------------------------------------------------
@register("world", "chaney")
class ChaneyWorld(WorldGenerator):
    """Chaney et al. (2018) known-utility world (U-CHANEY): θ_u ~ Dir(ζ_U), β_i ~ Dir(ζ_I).

    ζ_U = zeta_user_scale·Dir(zeta_user_conc·1_d) and ζ_I = zeta_item_scale·Dir(zeta_item_conc·1_d) are
    drawn once per world. Items are near one-hot (total concentration 0.1), genres p(g|i) = β_i.
    Utilities θ·β are small (≈ 1/d): pair with a choice temperature. Creators own random items; their
    profile is the normalised mean of their items and they make items a ~ Dir(zeta_item_scale·c_j)
    (CR-TRECS, 0.1·c_j by default).
    """

    class Params(Params):
        n_users: UserCount = Field(1000, description="number of users")
        n_items: ItemCount = Field(500, description="number of initial items")
        dim: Dim = Field(20, description="number of latent attributes d (also the genres)")
        n_creators: CreatorCount = Field(50, description="content creators (0: items have no creator)")
        protected_share: Probability = Field(0.2, description="share of creators/items in group 1")
        zeta_user_scale: PositiveFloat = Field(10.0, description="ζ_U = scale·Dir(conc·1)")
        zeta_user_conc: PositiveFloat = Field(1.0, description="concentration of the ζ_U draw")
        zeta_item_scale: PositiveFloat = Field(0.1, description="ζ_I = scale·Dir(conc·1); CR-TRECS 0.1·c_j")
        zeta_item_conc: PositiveFloat = Field(100.0, description="concentration of the ζ_I draw")

    def build(self, rng: np.random.Generator) -> World:
        p = self.params
        d = p.dim
        zeta_u = p.zeta_user_scale * rng.dirichlet(np.full(d, p.zeta_user_conc))
        zeta_i = p.zeta_item_scale * rng.dirichlet(np.full(d, p.zeta_item_conc))
        theta = dirichlet_rows(rng, np.broadcast_to(zeta_u, (p.n_users, d)))
        beta = dirichlet_rows(rng, np.broadcast_to(zeta_i, (p.n_items, d)))
        creator, cgroup, group = assign_creators(rng, p.n_items, p.n_creators, p.protected_share)
        creators = None
        if cgroup is not None:
            prof, counts = _mean_by_creator(beta, creator, p.n_creators)
            prof[counts == 0] = zeta_i / zeta_i.sum()  # creators without items start at the prior mean
            prof = np.clip(prof / prof.sum(axis=1, keepdims=True), 1e-4, 1.0)
            prof /= prof.sum(axis=1, keepdims=True)
            creators = Creators(profiles=prof.astype(np.float32), group=cgroup)
        names = synthetic_genre_names(d)
        items = Items.create(beta, beta, make_titles(rng, p.n_items, names, beta), creator, group, names)
        meta = {
            "generator": "chaney",
            "simplex": True,  # attrs and creator profiles live on the simplex (CR-TRECS update applies)
            "zeta_user": zeta_u.tolist(),
            "zeta_item": zeta_i.tolist(),
            "utility_scale": "theta.beta on the simplex: mean ~ 1/dim",
        }
        return World(users=Users.create(theta), items=items, creators=creators, meta=meta)

    def new_items(
        self, creator_ids: np.ndarray, world: World, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """a ~ Dir(zeta_item_scale·c_j) for a creator j (CR-TRECS); a ~ Dir(ζ_I) for id -1 (U-CHANEY)."""
        ids = self._check_creators(creator_ids, world)
        d = world.items.dim
        alpha = np.empty((len(ids), d), np.float64)
        own = ids >= 0
        if own.any():
            alpha[own] = self.params.zeta_item_scale * world.creators.profiles[ids[own]].astype(np.float64)
        zeta_i = np.asarray(world.meta.get("zeta_item", np.full(d, self.params.zeta_item_scale / d)))
        alpha[~own] = zeta_i
        attrs = dirichlet_rows(rng, alpha).astype(np.float32)
        return attrs, attrs.copy(), self._titles(rng, world, attrs)


# ---------------------------------------------------------------------------------------------
# Gaussian clusters
# ---------------------------------------------------------------------------------------------
@register("world", "gaussian_clusters")
class GaussianClustersWorld(WorldGenerator):
    """Users and items around ``n_clusters`` centres on the unit sphere; all vectors unit-normalised.

    x = normalise(centre + ε), ε ~ N(0, spread²/dim·I) so ‖ε‖ ≈ spread. V = cosine ∈ [-1, 1]
    (≈ 1/(1+spread²) within a cluster, ≈ 0 across). Genres = softmax(a·centres/genre_temperature).
    Each creator has a home cluster and makes items around it: profile c_j = normalised mean of its
    items; new items a ~ normalise(N(c_j, spread²/dim·I)) (the Gaussian analogue of CR-TRECS).
    """

    class Params(Params):
        n_users: UserCount = Field(1000, description="number of users")
        n_items: ItemCount = Field(500, description="number of initial items")
        dim: Dim = Field(16, description="latent dimension")
        n_clusters: Annotated[int, Field(gt=0, le=MAX_CLUSTERS)] = Field(
            8, description="number of taste clusters (also the genres)")
        spread: Annotated[float, Field(ge=0.0)] = Field(0.5, description="noise norm around a centre")
        n_creators: CreatorCount = Field(50, description="content creators (0: items have no creator)")
        protected_share: Probability = Field(0.2, description="share of creators/items in group 1")
        genre_temperature: PositiveFloat = Field(0.1, description="softmax temperature of the genre mix")

    def _noisy(self, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
        d = centres.shape[1]
        eps = rng.standard_normal(centres.shape) * (self.params.spread / math.sqrt(d))
        return _normalise_rows(centres + eps)

    def _genres(self, attrs: np.ndarray, centres: np.ndarray) -> np.ndarray:
        return _softmax_rows(attrs @ centres.T / self.params.genre_temperature)

    def build(self, rng: np.random.Generator) -> World:
        p = self.params
        centres = _normalise_rows(rng.standard_normal((p.n_clusters, p.dim)))
        user_cluster = rng.integers(p.n_clusters, size=p.n_users)
        prefs = self._noisy(rng, centres[user_cluster])
        creator, cgroup, group = assign_creators(rng, p.n_items, p.n_creators, p.protected_share)
        if cgroup is not None:
            home = rng.permutation(np.arange(p.n_creators) % p.n_clusters)
            item_cluster = home[creator]
        else:
            item_cluster = rng.integers(p.n_clusters, size=p.n_items)
        attrs = self._noisy(rng, centres[item_cluster])
        creators = None
        if cgroup is not None:
            prof, counts = _mean_by_creator(attrs, creator, p.n_creators)
            prof[counts == 0] = centres[home[counts == 0]]
            creators = Creators(profiles=_normalise_rows(prof).astype(np.float32), group=cgroup)
        genres = self._genres(attrs, centres)
        names = synthetic_genre_names(p.n_clusters)
        items = Items.create(attrs, genres, make_titles(rng, p.n_items, names, genres), creator, group, names)
        meta = {
            "generator": "gaussian_clusters",
            "simplex": False,
            "centres": centres.tolist(),
            "user_cluster_counts": np.bincount(user_cluster, minlength=p.n_clusters).tolist(),
            "utility_scale": "cosine of unit vectors in [-1, 1]",
        }
        return World(users=Users.create(prefs), items=items, creators=creators, meta=meta)

    def new_items(
        self, creator_ids: np.ndarray, world: World, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """a ~ normalise(N(c_j, spread²/dim)) for creator j; around a random centre for id -1."""
        ids = self._check_creators(creator_ids, world)
        centres = np.asarray(world.meta["centres"], dtype=np.float64)
        base = np.empty((len(ids), centres.shape[1]), np.float64)
        own = ids >= 0
        if own.any():
            base[own] = world.creators.profiles[ids[own]]
        base[~own] = centres[rng.integers(len(centres), size=int((~own).sum()))]
        attrs = self._noisy(rng, base)
        genres = self._genres(attrs, centres)
        return attrs.astype(np.float32), genres.astype(np.float32), self._titles(rng, world, genres)


# ---------------------------------------------------------------------------------------------
# Real data: a ratings table fitted to true preferences
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)  # hashed by identity: loaders are cached, so the fit cache keys on the table
class RatingsTable:
    """A parsed interaction data set with contiguous codes (users 0..U-1, items 0..I-1)."""

    name: str
    source: str
    user: np.ndarray  # (n,) int64
    item: np.ndarray  # (n,) int64
    rating: np.ndarray | None  # (n,) float64, None = every row is a positive
    timestamp: np.ndarray  # (n,) float64 (file order when the data has none)
    user_ids: list[str]  # original ids
    item_ids: list[str]
    titles: list[str] | None = None  # (I,) real titles
    item_genres: list[list[str]] | None = None  # (I,) genre labels per item
    user_attributes: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Fitted:
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
    xn = _normalise_rows(x)
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
        new = _normalise_rows(new)
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


def fit_ratings(table: RatingsTable, p: _FitParams) -> _Fitted:
    """Subset, split and fit a ratings table into world arrays (shared by the data-set generators)."""
    n_u_all, n_i_all = len(table.user_ids), len(table.item_ids)
    where = f"data set {table.name} ({table.source})"
    for key, want, have in (("n_users", p.n_users, n_u_all), ("n_items", p.n_items, n_i_all)):
        if want is not None and want > have:
            raise RecloopInputError(
                f"{key}={want} but {where} has only {have}; use at most {have} or leave it unset.", key=f"world.{key}"
            )
    # keep the most active users and the most-rated items (ties: lower original position)
    keep_u = np.sort(np.lexsort((np.arange(n_u_all), -np.bincount(table.user, minlength=n_u_all)))[
        : p.n_users or n_u_all])
    keep_i = np.sort(np.lexsort((np.arange(n_i_all), -np.bincount(table.item, minlength=n_i_all)))[
        : p.n_items or n_i_all])
    u_map = np.full(n_u_all, -1, np.int64)
    u_map[keep_u] = np.arange(len(keep_u))
    i_map = np.full(n_i_all, -1, np.int64)
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
    u, i, ts = u[first], i[first], ts[first]
    n_u, n_i = len(keep_u), len(keep_i)
    if len(u) == 0:
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
    # initial organic log: each user's first ceil(initial_fraction * n_u) positives by time
    order = np.lexsort((i, ts, u))
    u, i, ts = u[order], i[order], ts[order]
    per_user = np.bincount(u, minlength=n_u)
    starts = np.concatenate([[0], np.cumsum(per_user)[:-1]])
    rank = np.arange(len(u)) - starts[u]
    in_log = rank < np.ceil(p.initial_fraction * per_user[u] - 1e-9)

    # the fit does not depend on initial_fraction or n_creators: share it between such variants
    key = (table, p.n_users, p.n_items, p.min_rating, p.dim, p.fit, p.fit_seed)
    if key not in _FACTOR_CACHE:
        if len(_FACTOR_CACHE) >= 8:
            _FACTOR_CACHE.clear()
        pos = sp.csr_matrix((np.ones(len(u)), (u, i)), shape=(n_u, n_i))
        _FACTOR_CACHE[key] = _fit_factors(pos, p.dim, p.fit, p.fit_seed)
    x, a = _FACTOR_CACHE[key]
    head = short_head(u[in_log], i[in_log], n_i, 0.8)
    group = (~head).astype(np.int8)

    # genres: multi-hot of the item's labels normalised to 1 (uniform when an item has none)
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

    duplicates = 0
    if table.titles is not None:
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
    else:
        titles = make_titles(np.random.default_rng(p.fit_seed), n_i, names, genres)

    creator = np.full(n_i, -1, np.int32)
    profiles = cgroup = None
    sigma_creator = None
    if p.n_creators > 0:
        k = min(p.n_creators, n_i)
        creator = _spherical_kmeans(a, k, p.fit_seed).astype(np.int32)
        profiles, counts = _mean_by_creator(a, creator, k)
        tail_share = _mean_by_creator(group[:, None].astype(np.float64), creator, k)[0][:, 0]
        cgroup = (tail_share >= 0.5).astype(np.int8)
        sigma_creator = float(np.sqrt(np.mean((a - profiles[creator]) ** 2)))
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
    return _Fitted(
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


class _DataSetWorld(WorldGenerator):
    """A world whose truth is fitted to a real interaction log (the semi-synthetic protocol).

    True prefs/attrs = a rank-``dim`` factorisation of the binary matrix of ALL positives (rating ≥
    min_rating), so the truth knows what users will like later; the policy sees only the initial log
    (each user's first ``initial_fraction`` of positives by time, provenance 0). The fit is independent
    of the run seed: every replicate gets the same world. Item group 1 = items outside the short head of
    the initial log (the most-interacted items holding 80 % of its interactions).
    """

    def table(self) -> RatingsTable:
        raise NotImplementedError

    def fitted(self) -> _Fitted:
        """The fitted arrays, cached per (data set, params): treat them as read-only."""
        return _cached_fit(self.table(), self.params)

    def build(self, rng: np.random.Generator) -> World:
        f = self.fitted()
        users = Users.create(f.prefs.copy(), {k: v.copy() for k, v in f.user_attributes.items()})
        items = Items.create(
            f.attrs.copy(), f.genres.copy(), list(f.titles), f.creator.copy(), f.group.copy(), f.genre_names
        )
        creators = None
        if f.creator_profiles is not None:
            creators = Creators(profiles=f.creator_profiles.copy(), group=f.creator_group.copy())
        meta = {"generator": self.registry_name, **f.meta}
        return World(users=users, items=items, creators=creators, meta=meta)

    def initial_log(self, world: World, rng: np.random.Generator) -> TrainingData:
        """The real positives of the initial split (organic, step 0), users/items indexed 0..n-1."""
        f = self.fitted()
        n = len(f.log_users)
        return TrainingData(
            users=f.log_users.astype(np.int64),
            items=f.log_items.astype(np.int64),
            steps=np.zeros(n, np.int32),
            provenance=np.zeros(n, np.int8),
            n_users=len(f.prefs),
            n_items=len(f.attrs),
        )

    def held_out(self) -> tuple[np.ndarray, np.ndarray]:
        """(users, items) of the positives left out of the initial log (later in time)."""
        f = self.fitted()
        return f.held_users.copy(), f.held_items.copy()

    def timeline(self, source: str = "held_out") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(users, items, timestamps) of real interactions in world ids (kept users and items only).

        ``held_out``: the positives left out of the initial log (each user's later ones);
        ``positives``: every positive (initial log and held out); ``ratings``: every row of the data
        set, whatever its rating, deduplicated to the first time a user met an item. Used by the
        EchoTrace replay user model (:mod:`recloop.agents.replay`).
        """
        f = self.fitted()
        if source == "held_out":
            return f.held_users.copy(), f.held_items.copy(), np.asarray(f.held_timestamps, np.float64).copy()
        if source == "positives":
            return (np.concatenate([f.log_users, f.held_users]), np.concatenate([f.log_items, f.held_items]),
                    np.concatenate([f.log_timestamps, f.held_timestamps]).astype(np.float64))
        if source != "ratings":
            raise ValueError(f"unknown timeline source {source!r}: held_out, positives or ratings")
        table = self.table()
        u_code = {v: k for k, v in enumerate(f.meta["user_ids"])}
        i_code = {v: k for k, v in enumerate(f.meta["item_ids"])}
        u_map = np.array([u_code.get(v, -1) for v in table.user_ids], np.int64)
        i_map = np.array([i_code.get(v, -1) for v in table.item_ids], np.int64)
        u, i = u_map[table.user], i_map[table.item]
        rows = (u >= 0) & (i >= 0)
        u, i, ts = u[rows], i[rows], table.timestamp[rows]
        order = np.lexsort((ts, i, u))
        u, i, ts = u[order], i[order], ts[order]
        first = np.ones(len(u), bool)
        first[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
        return u[first], i[first], ts[first].astype(np.float64)

    def new_items(
        self, creator_ids: np.ndarray, world: World, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """a ~ N(c_j, σ_c²) with the creator's mean genres; id -1: a noisy copy of a random item."""
        ids = self._check_creators(creator_ids, world)
        n0 = int(world.meta.get("n_items_initial", world.items.n))
        d = world.items.dim
        attrs = np.empty((len(ids), d), np.float64)
        genres = np.empty((len(ids), world.items.genres.shape[1]), np.float64)
        own = ids >= 0
        if own.any():
            prof = world.creators.profiles[ids[own]].astype(np.float64)
            sigma = world.meta.get("creator_item_sigma") or world.meta.get("item_noise_sigma", 0.1)
            attrs[own] = prof + rng.standard_normal(prof.shape) * sigma
            mean_genres, _ = _mean_by_creator(
                world.items.genres[:n0].astype(np.float64), world.items.creator[:n0], world.creators.n
            )
            genres[own] = mean_genres[ids[own]]
        if (~own).any():
            base = rng.integers(n0, size=int((~own).sum()))
            sigma = 0.5 * float(world.meta.get("item_noise_sigma", 0.1))
            attrs[~own] = world.items.attrs[base] + rng.standard_normal((len(base), d)) * sigma
            genres[~own] = world.items.genres[base]
        bad = genres.sum(axis=1) <= 0
        genres[bad] = 1.0
        genres /= genres.sum(axis=1, keepdims=True)
        return attrs.astype(np.float32), genres.astype(np.float32), self._titles(rng, world, genres)


class _FitParams(Params):
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


@functools.lru_cache(maxsize=8)
def _cached_fit(table: RatingsTable, params: _FitParams) -> _Fitted:
    return fit_ratings(table, params)


# -- MovieLens-100K ----------------------------------------------------------------------------
def recbole_ml100k_dir() -> Path | None:
    """Where the installed ``recbole`` wheel keeps ml-100k (``dataset_example/ml-100k``), or None.

    Looks the package up with ``importlib.util.find_spec`` without importing it (recbole needs torch).
    """
    try:
        spec = importlib.util.find_spec("recbole")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"


def _ml100k_files() -> dict[str, Path]:
    root = recbole_ml100k_dir()
    if root is None:
        raise RecloopInputError(
            f"the {ML100K} data set needs the 'recbole' package, which is not installed; it ships the data "
            f"under recbole/dataset_example/ml-100k/. Install it with `{INSTALL_HINT}` (no other "
            "dependencies are needed: recloop reads the files without importing recbole).",
            key="world.type",
        )
    files = {kind: root / f"ml-100k.{kind}" for kind in ("inter", "item", "user")}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise RecloopInputError(
            f"the {ML100K} data set is incomplete: expected {', '.join(missing)} in {root}. "
            "Reinstall it with `pip install --force-reinstall --no-deps recbole==1.2.1`.",
            key="world.type",
        )
    return files


def _read_atomic(path: Path) -> dict[str, list[str]]:
    """A RecBole atomic file (tab-separated, typed header ``name:type``) as columns of strings."""
    import polars as pl

    try:
        df = pl.read_csv(path, separator="\t", quote_char=None, infer_schema=False, encoding="utf8-lossy")
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad data file
        raise RecloopInputError(f"cannot read {ML100K} file {path}: {exc}.") from exc
    return {name.split(":", 1)[0]: df[name].fill_null("").to_list() for name in df.columns}


def _ml_title(title: str, year: str) -> str:
    """The MovieLens title as in the original u.item, e.g. 'Toy Story (1995)'.

    RecBole splits the year off; item 267 is 'unknown' in the original (RecBole: 'unkonwn').
    """
    if title == "unkonwn" and year == "unkonwn":
        return "unknown"
    return f"{title} ({year})" if year else title


@functools.lru_cache(maxsize=2)
def load_ml100k(inter: Path, item: Path, user: Path) -> RatingsTable:
    """Parse MovieLens-100K from RecBole's atomic files into a :class:`RatingsTable`."""
    it, us, ra = _read_atomic(item), _read_atomic(user), _read_atomic(inter)
    for cols, need, path in ((it, ("item_id", "movie_title", "release_year", "class"), item),
                             (us, ("user_id", "age", "gender", "occupation"), user),
                             (ra, ("user_id", "item_id", "rating", "timestamp"), inter)):
        lost = [c for c in need if c not in cols]
        if lost:
            raise RecloopInputError(f"{ML100K} file {path} lacks the column(s) {', '.join(lost)}.")
    item_ids = it["item_id"]
    user_ids = us["user_id"]
    i_code = {v: k for k, v in enumerate(item_ids)}
    u_code = {v: k for k, v in enumerate(user_ids)}
    try:
        users = np.array([u_code[v] for v in ra["user_id"]], np.int64)
        items = np.array([i_code[v] for v in ra["item_id"]], np.int64)
    except KeyError as exc:
        raise RecloopInputError(f"{ML100K} file {inter} names an unknown user or item {exc}.") from exc
    return RatingsTable(
        name=ML100K,
        source=str(inter.parent),
        user=users,
        item=items,
        rating=np.asarray(ra["rating"], dtype=np.float64),
        timestamp=np.asarray(ra["timestamp"], dtype=np.float64),
        user_ids=user_ids,
        item_ids=item_ids,
        titles=[_ml_title(t, y) for t, y in zip(it["movie_title"], it["release_year"], strict=True)],
        item_genres=[c.split() for c in it["class"]],
        user_attributes={
            "age": np.asarray(us["age"], dtype=np.int64),
            "gender": np.asarray(us["gender"], dtype=str),
            "occupation": np.asarray(us["occupation"], dtype=str),
        },
    )


@register("world", "movielens")
class MovieLensWorld(_DataSetWorld):
    """MovieLens-100K (943 users, 1682 films, 100k ratings) read from the installed ``recbole`` wheel.

    Truth = a rank-``dim`` fit of the liked (rating ≥ min_rating) matrix, so V_ui ≈ P(u likes i)
    (≈ 0.5 on liked pairs, ≈ 0.03 on random ones). Real titles ('Toy Story (1995)'), genres = the ML
    genre multi-hot normalised to 1, users carry age/gender/occupation. The initial log is the real
    liked interactions; item group 1 = outside the initial log's 80 % short head. Install the data with
    ``pip install --no-deps recbole==1.2.1``.
    """

    class Params(_FitParams):
        pass

    def table(self) -> RatingsTable:
        files = _ml100k_files()
        return load_ml100k(files["inter"], files["item"], files["user"])


# -- bring your own data set ----------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _load_csv(
    path: str, mtime: float, sep: str, user_col: str, item_col: str, rating_col: str | None,
    timestamp_col: str | None, title_col: str | None, genre_col: str | None, genre_sep: str,
) -> RatingsTable:
    """Parse a delimited interactions file (cached per path, modification time and columns)."""
    import polars as pl

    try:
        df = pl.read_csv(path, separator=sep, infer_schema=False, encoding="utf8-lossy")
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad data file
        raise RecloopInputError(f"cannot read it as a table separated by {sep!r}: {exc}.", file=path) from exc
    wanted = {"user_col": user_col, "item_col": item_col, "rating_col": rating_col,
              "timestamp_col": timestamp_col, "title_col": title_col, "genre_col": genre_col}
    for key, col in wanted.items():
        if col is not None and col not in df.columns:
            raise RecloopInputError(
                f"no column '{col}' (set by {key}); the file's columns are {', '.join(df.columns)}.",
                file=path, key=f"world.{key}",
            )
    df = df.filter(pl.col(user_col).is_not_null() & pl.col(item_col).is_not_null())
    if df.height == 0:
        raise RecloopInputError("the file has no rows with both a user and an item.", file=path)
    user_ids, user = np.unique(np.asarray(df[user_col].to_list(), dtype=str), return_inverse=True)
    item_ids, item = np.unique(np.asarray(df[item_col].to_list(), dtype=str), return_inverse=True)

    def numeric(col: str, key: str) -> np.ndarray:
        try:
            return df[col].str.strip_chars().cast(pl.Float64).fill_null(np.nan).to_numpy()
        except Exception as exc:  # noqa: BLE001 - a non-numeric cell
            raise RecloopInputError(f"column '{col}' must hold numbers.", file=path, key=f"world.{key}") from exc

    rating = numeric(rating_col, "rating_col") if rating_col else None
    ts = numeric(timestamp_col, "timestamp_col") if timestamp_col else np.arange(df.height, dtype=np.float64)
    first_row = np.zeros(len(item_ids), np.int64)
    first_row[item[::-1]] = np.arange(len(item))[::-1]  # each item's first row
    titles = genres = None
    if title_col:
        col = df[title_col].fill_null("").to_list()
        titles = [col[r] or f"Item {item_ids[j]}" for j, r in enumerate(first_row)]
    if genre_col:
        col = df[genre_col].fill_null("").to_list()
        genres = [[g.strip() for g in col[r].split(genre_sep) if g.strip()] for r in first_row]
    return RatingsTable(
        name=os.path.basename(path),
        source=path,
        user=user.astype(np.int64),
        item=item.astype(np.int64),
        rating=rating,
        timestamp=ts,
        user_ids=user_ids.tolist(),
        item_ids=item_ids.tolist(),
        titles=titles,
        item_genres=genres,
    )


@register("world", "interactions_csv")
class InteractionsCSVWorld(_DataSetWorld):
    """Bring your own data set: a delimited file of (user, item[, rating, timestamp, title, genres]).

    Fitted exactly like ``movielens``. Without ``rating_col`` every row is a positive; without
    ``timestamp_col`` the file order is the time order; without ``title_col`` items get synthetic
    titles; ``genre_col`` holds labels separated by ``genre_sep`` ('Action|Comedy').
    """

    class Params(_FitParams):
        path: str = Field(..., description="the interactions file (CSV/TSV with a header row)")
        sep: str = Field(",", description="column separator")
        user_col: str = Field("user_id", description="column of user ids")
        item_col: str = Field("item_id", description="column of item ids")
        rating_col: str | None = Field(None, description="column of ratings (None: every row is a positive)")
        timestamp_col: str | None = Field(None, description="column of times (None: file order)")
        title_col: str | None = Field(None, description="column of item titles (None: synthetic titles)")
        genre_col: str | None = Field(None, description="column of item genre labels")
        genre_sep: str = Field("|", description="separator between genre labels")

    def table(self) -> RatingsTable:
        p = self.params
        path = os.path.abspath(os.path.expanduser(p.path))
        if not os.path.isfile(path):
            raise RecloopInputError(
                f"the interactions file {path} does not exist; give an existing CSV/TSV file.", key="world.path"
            )
        return _load_csv(path, os.path.getmtime(path), p.sep, p.user_col, p.item_col, p.rating_col,
                         p.timestamp_col, p.title_col, p.genre_col, p.genre_sep)
