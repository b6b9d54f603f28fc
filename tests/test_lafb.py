"""LAFB familiarity debiasing (E-LAFB, recommenders/lafb.py), its outcome metrics
(analysis/familiarity_metrics.py) and the ``familiarity`` scenario."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recloop import registry
from recloop.conformance import check_component
from recloop.conformance_base import tiny_state
from recloop.contracts import Feedback, PlatformView, TrainingData
from recloop.recommenders.lafb import (
    LAFB,
    LEVELS,
    bucket_log_factors,
    debias,
    standardized_scores,
)
from recloop.recommenders.rerankers import Identity
from recloop.sim.checkpoint import roundtrip
from recloop.sim.config import validate_mapping
from recloop.sim.model import FeedbackLoop
from recloop.sim.state import Items, Users, World

N_USERS, N_ITEMS, N_CREATORS = 6, 40, 5


def make_view(log: list[tuple[int, int, int]] | None = None, step: int = 0) -> PlatformView:
    """A platform view over a small world (item i has creator i % 5, dominant genre i % 3) whose log holds
    ``log`` rows (user, item, step)."""
    rng = np.random.default_rng(0)
    genres = np.full((N_ITEMS, 3), 0.1)
    genres[np.arange(N_ITEMS), np.arange(N_ITEMS) % 3] = 0.8
    items = Items.create(rng.normal(size=(N_ITEMS, 4)), genres, [f"t{i}" for i in range(N_ITEMS)],
                         creator=np.arange(N_ITEMS) % N_CREATORS)
    world = World(Users.create(rng.normal(size=(N_USERS, 4))), items)
    rows = np.array(log or [], np.int64).reshape(-1, 3)
    data = TrainingData(rows[:, 0], rows[:, 1], rows[:, 2].astype(np.int32), np.zeros(len(rows), np.int8),
                        N_USERS, N_ITEMS)
    state = tiny_state(world)
    for s in np.unique(data.steps):
        sel = data.steps == s
        state.log.add(int(s), data.users[sel], data.items[sel], 0)
    state.t = step
    return PlatformView(state)


def lafb(**params) -> LAFB:
    return registry.build("reranker", {"type": "lafb", **params})


def random_scores(n=N_USERS, m=12, seed=1, negative=False):
    rng = np.random.default_rng(seed)
    cand = np.stack([rng.choice(N_ITEMS, m, replace=False) for _ in range(n)])
    scores = rng.normal(size=(n, m)).astype(np.float32)
    if negative:
        scores = -np.abs(scores) - 3.0  # ALS-like: every score negative
    cand[0, 2], scores[0, 2] = -1, -np.inf
    scores[1, 4] = -np.inf
    return np.arange(n, dtype=np.int64), cand, scores


# ----------------------------------------------------------------------------------------- the maths
def test_reference_sanity_s_08_over_adj_2_is_04():
    assert debias(0.8, 2.0) == pytest.approx(0.4)
    assert debias(np.array([0.8, 0.3]), np.array([2.0, 0.5])) == pytest.approx([0.4, 0.6])
    assert debias(0.8, 4.0, strength=0.5) == pytest.approx(0.4)


def test_bucket_factors_are_bucket_mean_over_overall_mean_with_shrinkage_and_clip():
    sums, counts = np.log([1.6, 0.4, 1.0]), np.array([2.0, 2.0, 0.0])  # bucket means 0.8, 0.2; mean 0.5
    with np.errstate(divide="ignore"):
        sums[2] = -np.inf
    assert np.exp(bucket_log_factors(sums, counts, 0.0, 100.0)) == pytest.approx([1.6, 0.4, 1.0])
    shrunk = np.exp(bucket_log_factors(sums, counts, 2.0, 100.0))  # (1.6 + 2·0.5)/(2 + 2) / 0.5
    assert shrunk == pytest.approx([1.3, 0.7, 1.0])
    assert np.exp(bucket_log_factors(sums, counts, 0.0, 1.5)) == pytest.approx([1.5, 1 / 1.5, 1.0])
    assert not bucket_log_factors(np.full(3, -np.inf), np.zeros(3), 2.0, 10.0).any()


def test_standardized_scores_ignore_invalid_entries():
    s = np.array([[1.0, 3.0, -np.inf], [2.0, 2.0, 2.0]])
    valid = np.isfinite(s)
    z = standardized_scores(s, valid)
    assert z[0, :2] == pytest.approx([-1.0, 1.0]) and z[0, 2] == 0.0
    assert not z[1].any()  # no spread: no standardised signal


# --------------------------------------------------------------------------------------- re-ranking
@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("factor", [1.0, 2.0, 0.3])
def test_equal_factors_leave_the_ranking_unchanged(factor, negative):
    view = make_view([(0, 0, 0), (0, 5, 0), (1, 3, 0)], step=1)
    users, cand, scores = random_scores(negative=negative)
    r = lafb(features=["creator_count", "creator_recency", "genre_count"])
    r.fit(view.training_data(), view)
    r.acc_step = 1  # this cycle's factors are set by hand: all equal
    r.log_factors[:] = np.log(factor)
    got = r.rerank(users, cand, scores, 5, view, step=1)
    assert np.array_equal(got, Identity().rerank(users, cand, scores, 5, view))


def test_a_familiar_item_is_demoted_by_its_factor():
    view = make_view([(0, 0, 0), (0, 5, 1), (0, 10, 2)], step=3)  # user 0 consumed creator 0 three times
    r = lafb(features=["creator_count"])
    r.fit(view.training_data(), view)
    cand = np.array([[15, 1, 2]])  # item 15: creator 0 (familiar, count 3 → level 2); 1, 2: new creators
    scores = np.array([[0.9, 0.5, 0.1]], np.float32)  # z = [1.22, 0, -1.22]
    r.acc_step = 3
    assert np.array_equal(r.rerank(np.array([0]), cand, scores, 3, view, step=3), [[15, 1, 2]])
    r.log_factors[2] = 2.0  # Adj = e² for "3–9 consumptions of the creator": 1.22 − 2 < 0
    assert np.array_equal(r.rerank(np.array([0]), cand, scores, 3, view, step=3), [[1, 15, 2]])


def test_buckets_combine_counts_and_recency():
    view = make_view([(0, 0, 0), (0, 5, 1), (0, 10, 2), (1, 1, 0)], step=10)
    r = lafb(features=["creator_count", "creator_recency"])
    r.fit(view.training_data(), view)
    cand = np.array([[20, 21], [6, 2]])  # creators 0, 1 for user 0; 1, 2 for user 1
    b = r.features.buckets(np.array([0, 1]), cand, 10, view)
    # user 0, creator 0: 3 consumptions (level 2), last at 2 → Δ = 8 (level 3); creator 1: never
    # user 1, creator 1: 1 consumption (level 1), Δ = 10 (level 3); creator 2: never
    assert b.tolist() == [[2 + 3 * LEVELS, 0], [1 + 3 * LEVELS, 0]]
    assert r.features.buckets(np.array([0]), np.array([[20]]), 3, view).tolist() == [[2 + 1 * LEVELS]]


def test_features_follow_feedback_and_catch_up_from_the_log():
    view = make_view([(0, 0, 0)], step=1)
    r = lafb(features=["creator_count"])
    r.fit(view.training_data(), view)
    fb = Feedback(1, np.array([0, 1]), np.zeros((2, 1), np.int64), np.zeros(2, np.int64), np.array([5, 6]),
                  np.zeros(2, np.float32), consumed=(np.array([0, 1]), np.array([5, 6])))
    r.update(fb, view)
    r.update(fb, view)  # the same cycle twice: counted once
    assert r.features.arrays["creator_count"][0, 0] == 2 and r.features.arrays["creator_count"][1, 1] == 1
    later = make_view([(0, 0, 0), (0, 5, 1), (1, 6, 1), (2, 7, 2), (2, 12, 3)], step=4)
    r.rerank(np.array([2]), np.array([[17]]), np.array([[1.0]], np.float32), 1, later, step=4)
    assert r.watermark == 3 and r.features.arrays["creator_count"][2, 2] == 2  # steps 2 and 3 caught up
    assert r.features.arrays["creator_count"][0, 0] == 2  # step 1 not counted again


def test_factors_come_from_the_previous_cycle_candidates():
    view = make_view([(u, u, 0) for u in range(N_USERS)] + [(0, 5, 0), (0, 10, 0)], step=1)
    users, cand, scores = random_scores(seed=3)
    r = lafb(features=["creator_count"], prior=0.0)
    r.fit(view.training_data(), view)
    out1 = r.rerank(users, cand, scores, 4, view, step=1)
    assert np.array_equal(out1, Identity().rerank(users, cand, scores, 4, view))  # no cycle seen yet
    valid = np.isfinite(scores) & (cand >= 0)
    s_pos = np.exp(standardized_scores(scores.astype(np.float64), valid))
    b = r.features.buckets(users, cand, 1, view)
    mean = s_pos[valid].mean()
    want = [s_pos[valid & (b == k)].mean() / mean if (valid & (b == k)).any() else 1.0 for k in range(LEVELS)]
    r.rerank(users[:2], cand[:2], scores[:2], 4, view, step=2)  # the next cycle starts
    assert r.factors == pytest.approx(want)
    assert r.factors[0] != pytest.approx(r.factors[1])


def test_scores_may_be_negative_and_scale_does_not_matter():
    view = make_view([(0, 0, 0), (0, 5, 0), (1, 6, 0), (2, 1, 0)], step=1)
    users, cand, scores = random_scores(negative=True, seed=4)

    def run(s):
        r = lafb(features=["creator_count"])
        r.fit(view.training_data(), view)
        r.acc_step = 1
        r.log_factors[:] = [-1.0, 2.0, 0.5, 0.0]
        return r.rerank(users, cand, s, 6, view, step=1)

    out = run(scores)
    assert (out >= 0).sum() > 0 and not np.array_equal(out, Identity().rerank(users, cand, scores, 6, view))
    rescaled = np.where(np.isfinite(scores), 3.0 * scores + 7.0, -np.inf).astype(np.float32)
    assert np.array_equal(run(rescaled), out)


def test_checkpoint_round_trip_keeps_the_next_cycle():
    view = make_view([(0, 0, 0), (0, 5, 0), (1, 6, 0)], step=1)
    users, cand, scores = random_scores(seed=5)
    r = lafb()
    r.fit(view.training_data(), view)
    r.rerank(users, cand, scores, 4, view, step=1)
    clone = lafb()
    clone.load_state_dict(roundtrip(r.state_dict()))
    a = r.rerank(users, cand, scores[::-1].copy(), 4, view, step=2)
    b = clone.rerank(users, cand, scores[::-1].copy(), 4, view, step=2)
    assert np.array_equal(a, b) and np.array_equal(r.log_factors, clone.log_factors)


def test_features_must_be_distinct():
    with pytest.raises(Exception, match="distinct"):
        lafb(features=["creator_count", "creator_count"])


@pytest.mark.parametrize("kind,name", [("reranker", "lafb"), ("metric", "familiarity")])
def test_conforms(kind, name):
    assert "seeded determinism" in check_component(kind, name)


# -------------------------------------------------------------------------------------------- metrics
def test_novel_share_matches_a_brute_force_count():
    sc = validate_mapping({
        "world": {"type": "chaney", "n_users": 60, "n_items": 90, "dim": 6, "n_creators": 8},
        "policy": {"type": "random"}, "steps": 4, "k": 4,
        "users": {"choice": {"type": "mnl", "temperature": 0.05, "no_click_utility": 0.0}, "organic_rate": 0.3},
        "metrics": {"include": [{"type": "familiarity", "all_users": True, "emerging_threshold": 3}]}})
    m = FeedbackLoop(sc, "p", sc.policy, 2)
    records, measure = [], m.metrics.measure
    m.metrics.measure = lambda rec: records.append(rec) or measure(rec)
    creator = m.world.items.creator
    for _ in range(4):
        before = {u: {int(creator[i]) for i in m.history.csr(np.array([u]))[1]} for u in range(m.world.users.n)}
        m.step()
        rec, rows = records[-1], {k: v for k, _, v in m.last_rows}
        novel = [int(creator[i]) not in before[int(u)] for u, i in zip(*rec.consumed)]
        assert len(novel) > 0 and rows["novel_share"] == pytest.approx(np.mean(novel))
        slots = [(u, int(i)) for u, row in zip(rec.users, rec.slates) for i in row if i >= 0]
        assert rows["novel_exposure"] == pytest.approx(np.mean([int(creator[i]) not in before[int(u)]
                                                                for u, i in slots]))
        pop = rec.popularity_before
        per_creator = np.bincount(creator[: len(pop)], weights=pop, minlength=8)
        shown = rec.slates[rec.slates >= 0]
        assert rows["emerging_creator_exposure"] == pytest.approx(np.mean(per_creator[creator[shown]] < 3))


# ------------------------------------------------------------------------------------------- scenario
def test_familiarity_scenario_runs_three_cycles(tmp_path):
    from recloop import load_scenario, run_scenario

    sc = load_scenario("familiarity", overrides={"steps": 3, "replicates": 1, "world.n_users": 150,
                                                 "world.n_items": 200, "world.n_creators": 40})
    manifest = run_scenario(sc, tmp_path / "fam", progress=False)
    assert manifest["status"] == "complete" and sorted(manifest["runs"]) == ["base__seed11", "lafb__seed11"]
    df = pl.read_parquet(tmp_path / "fam" / "metrics.parquet")
    names = set(df["metric"].unique())
    assert {"novel_share", "novel_exposure", "emerging_creator_exposure", "utility"} <= names
    assert df.filter(pl.col("metric") == "novel_share")["value"].is_between(0, 1).all()
