"""World generators: the protocol (:class:`WorldGenerator`), shared parameter types and array helpers.

The built-in generators, synthetic (U-CHANEY, Gaussian clusters) and real-data (MovieLens-100K, a CSV
file), live in :mod:`recloop.sim.worlds`; the data sets are read by :mod:`recloop.sim.data_loaders` and
their truth is fitted by :mod:`recloop.sim.truth`.

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

from typing import Annotated

import numpy as np
from pydantic import Field

from recloop.component import Component
from recloop.contracts import TrainingData
from recloop.limits import MAX_CREATORS, MAX_DIM, MAX_ITEMS, MAX_USERS
from recloop.registry import Params
from recloop.sim.state import World
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


def normalise_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def softmax_rows(z: np.ndarray) -> np.ndarray:
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


def mean_by_creator(
    values: np.ndarray, creator: np.ndarray, n_creators: int
) -> tuple[np.ndarray, np.ndarray]:
    """(per-creator mean of ``values`` rows, item counts) over items with creator >= 0."""
    mask = creator >= 0
    sums = np.zeros((n_creators, values.shape[1]), np.float64)
    np.add.at(sums, creator[mask], values[mask])
    counts = np.bincount(creator[mask], minlength=n_creators)
    return sums / np.maximum(counts, 1)[:, None], counts


class WorldGenerator(Component):
    """Base class for world generators (registered with ``@register("world", name)``): ``build`` draws
    the world from a seeded generator; data-set worlds also give the real initial log."""

    class Params(Params):
        pass

    uses_ground_truth = True

    def __init__(self, params: Params | None = None):
        super().__init__(params)
        self._title_cache: tuple[list[str], int, set[str]] | None = None

    def build(self, rng: np.random.Generator) -> World:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Nothing: a generator is rebuilt from its Params, and the world it built is checkpointed."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore (see :meth:`state_dict`)."""

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
