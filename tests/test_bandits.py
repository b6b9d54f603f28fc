"""Contextual linear bandits (recloop.recommenders.bandits): the reference's sanity values, batched
updates equal to one-at-a-time ones, the pruned UCB equal to the exhaustive one, the bandit metrics,
chunk invariance and resume."""

from __future__ import annotations

import numpy as np
import pytest

from recloop.contracts import Feedback
from recloop.recommenders.bandit_state import RidgeState, sherman_morrison_update, woodbury_update
from recloop.recommenders.bandit_ucb import ucb_tile
from recloop.recommenders.bandits import _normals, explore_slots, observations
from recloop.rng import derive_key
from recloop.sim.checkpoint import roundtrip
from recloop.sim.config import validate_mapping
from recloop.sim.model import FeedbackLoop


def _one_reward_state():
    s = RidgeState(1, 1.0, 1)
    s.update(np.array([0]), np.array([[1.0]]), np.array([1.0]))
    return s


def test_linucb_sanity_values():  # E-LINUCB: d=1, x=1, λ=1, one reward 1
    s = _one_reward_state()
    assert s.theta[0, 0] == pytest.approx(0.5)
    p = s.theta[0, 0] + 1.0 * np.sqrt(s.a_inv[0, 0, 0])
    assert p == pytest.approx(1.207107, abs=1e-6)


def test_lints_posterior_mean_and_variance():  # E-LINTS: same data → μ̂ = 0.5, var = v²/2
    s, v = _one_reward_state(), 0.8
    z = _normals(derive_key(0, "lints", 0), np.arange(200_000), 1)[:, 0]
    draws = s.theta[0, 0] + v * np.sqrt(s.a_inv[0, 0, 0]) * z
    assert draws.mean() == pytest.approx(0.5, abs=0.01)
    assert draws.var() == pytest.approx(v * v / 2, rel=0.02)


def test_epsilon_greedy_keeps_the_greedy_arm_with_probability_091():  # E-EPS: ε=0.1, 10 arms
    n = 100_000
    items = np.zeros((n, 1), np.int64)
    explore_slots(items, np.arange(n), 0.1, 10, derive_key(0, "egreedy", 0), exclude=None)
    assert (items[:, 0] == 0).mean() == pytest.approx(0.91, abs=0.004)
    slates = np.tile(np.arange(5), (n, 1))  # explored slots never repeat another slot's item
    explore_slots(slates, np.arange(n), 0.5, 8, derive_key(0, "egreedy", 1), exclude=None)
    assert all(len(set(r)) == 5 for r in slates[:2000].tolist())


def test_batched_updates_equal_one_at_a_time():
    rng = np.random.default_rng(0)
    d, users = 6, 5
    rows = rng.integers(0, users, 60)
    x = rng.normal(size=(60, d))
    r = rng.integers(0, 2, 60).astype(float)
    s = RidgeState(d, 0.5, users)
    s.update(rows[:25], x[:25], r[:25])
    s.update(rows[25:], x[25:], r[25:])
    ref_inv = [np.eye(d) / 0.5 for _ in range(users)]
    ref_b = np.zeros((users, d))
    for j in range(60):
        ref_inv[rows[j]] = sherman_morrison_update(ref_inv[rows[j]], x[j])
        ref_b[rows[j]] += r[j] * x[j]
    for u in range(users):
        np.testing.assert_allclose(s.a_inv[u], ref_inv[u], atol=1e-12)
        np.testing.assert_allclose(s.theta[u], ref_inv[u] @ ref_b[u], atol=1e-12)
    shared = RidgeState(d, 0.5, 1)  # one row, more observations than dimensions: the inverse of A is taken
    shared.update(np.zeros(60, np.int64), x, r)
    ref = np.eye(d) / 0.5
    for j in range(60):
        ref = sherman_morrison_update(ref, x[j])
    np.testing.assert_allclose(shared.a_inv[0], ref, atol=1e-12)
    A = 0.5 * np.eye(d) + x[:7].T @ x[:7]
    np.testing.assert_allclose(woodbury_update((np.eye(d) / 0.5)[None], x[None, :7])[0], np.linalg.inv(A),
                               atol=1e-12)


def full_scores(mean, S, X, alpha, excl):
    full = mean + alpha * np.sqrt(np.einsum("id,nde,ie->ni", X, S, X))
    full[np.repeat(np.arange(len(mean)), np.diff(excl[0])), excl[1]] = -np.inf
    return full


@pytest.mark.parametrize("directions", [0, 1, 2, 6])
def test_pruned_ucb_equals_the_exhaustive_top_k(directions):
    rng = np.random.default_rng(directions)
    n, n_items, d, k, alpha = 40, 300, 6, 5, 1.5
    X = rng.normal(size=(n_items, d))
    obs = rng.normal(size=(n, 12, d)) * rng.random((n, 12, 1)) * 3  # some users explored much more
    S = np.linalg.inv(np.eye(d)[None] + np.swapaxes(obs, 1, 2) @ obs)
    mean = (rng.normal(size=(n, d)) @ X.T).astype(np.float32)
    ptr = np.arange(0, 3 * n + 1, 3)
    excl = (ptr, rng.integers(0, n_items, 3 * n))
    got, _ = ucb_tile(mean, S, X, np.einsum("id,id->i", X, X), alpha, k, excl, directions)
    whole, n_full = ucb_tile(mean, S, X, np.einsum("id,id->i", X, X), alpha, k, excl, directions, prune=False)
    assert n_full == n
    np.testing.assert_array_equal(np.argsort(-whole, axis=1, kind="stable")[:, :k],
                                  np.argsort(-full_scores(mean, S, X, alpha, excl), axis=1, kind="stable")[:, :k])
    full = full_scores(mean, S, X, alpha, excl)
    want = np.argsort(-full, axis=1, kind="stable")[:, :k]
    top = np.argsort(-got, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(top, want)
    np.testing.assert_allclose(np.take_along_axis(got, top, 1), np.take_along_axis(full, want, 1), rtol=1e-5)


def test_feedback_cascade_keeps_the_examined_positions():
    fb = Feedback(0, np.array([3, 4]), np.array([[7, 8, 9], [1, 2, -1]]), np.array([1, -1]),
                  np.array([8, -1]), np.zeros(2, np.float32))
    u, i, r = observations(fb, "cascade")
    assert u.tolist() == [3, 3, 4, 4] and i.tolist() == [7, 8, 1, 2] and r.tolist() == [0, 1, 0, 0]
    assert len(observations(fb, "shown")[0]) == 5


WORLD = {"type": "chaney", "n_users": 120, "n_items": 80, "dim": 6, "n_creators": 0}


def _scenario(policy: dict, **extra):
    return validate_mapping({"world": WORLD, "policy": policy, "steps": 6, "k": 4,
                             "users": {"choice": {"type": "mnl", "temperature": 0.05, "no_click_utility": 0.2},
                                       "repeat_consumption": True},
                             "metrics": {"include": ["bandit"], "user_sample": 50}, **extra})


def _run(sc, steps: int, model=None):
    m = model or FeedbackLoop(sc, "p", sc.policy, 5)
    rows = []
    for _ in range(steps):
        m.step()
        rows.append(m.last_rows)
    return m, rows


@pytest.mark.parametrize("policy", [{"type": "linucb"}, {"type": "lints", "mode": "shared"},
                                    {"type": "egreedy", "epsilon": 0.3}])
def test_chunking_and_resume_leave_the_run_unchanged(policy):
    sc = _scenario(policy)
    _, rows = _run(sc, 6)
    _, chunked = _run(_scenario(policy, engine={"chunk_rows": 1}), 6)
    assert chunked == rows
    half, first = _run(sc, 3)
    resumed = FeedbackLoop(sc, "p", sc.policy, 5, restore=roundtrip(half.state()))
    _, rest = _run(sc, 3, resumed)
    assert first + rest == rows


def test_bandit_metrics_ideal_has_no_regret_and_random_is_chance():
    rows = {}
    for name in ("ideal", "random", "linucb"):
        _, r = _run(_scenario({"type": name}), 30)
        rows[name] = [{m: v for m, _, v in cycle} for cycle in r]
    assert rows["ideal"][-1]["cumulative_regret"] == pytest.approx(0.0, abs=1e-6)
    assert rows["random"][-1]["reward_ratio_random"] == pytest.approx(1.0, abs=0.05)
    late = {p: r[-1]["cumulative_regret"] - r[19]["cumulative_regret"] for p, r in rows.items()}
    assert late["linucb"] < 0.8 * late["random"]  # once it has explored, it learns
    rows = {p: r[-1] for p, r in rows.items()}
    assert 0.0 <= rows["linucb"]["exploration_share"] <= 1.0 and "exploration_share" not in rows["random"]
