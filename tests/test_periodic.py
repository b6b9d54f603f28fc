"""Periodic (weekly) user tastes, U-TIMEVAR (agents/periodic.py): exact 7-cycle period, one offset shared
by every user, composition with other dynamics, arrivals, and checkpoints."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from recloop import registry
from recloop.agents.periodic import PERIOD, weekday_code
from recloop.conformance import check_component
from recloop.conformance_base import tiny_context, tiny_state, tiny_world
from recloop.sim.checkpoint import roundtrip
from recloop.sim.config import validate_mapping
from recloop.sim.model import FeedbackLoop


def _bound(params: dict | None = None, seed: int = 3):
    _, world = tiny_world(seed)
    ctx = tiny_context(seed, tiny_state(world))
    return registry.build("dynamics", {"type": "periodic", **(params or {})}, ctx), world


def _advance(dyn, world, steps: range) -> None:
    users = np.arange(world.users.n, dtype=np.int64)
    for t in steps:
        dyn.update(users, np.full(len(users), -1), world, t)


def test_weekday_code_is_the_polar_embedding_and_sums_to_zero_over_a_week():
    c = weekday_code(np.arange(PERIOD), 1)
    assert np.allclose(c[:, 0], np.sin(2 * np.pi * np.arange(7) / 7 + 0.1 * np.pi))
    assert np.allclose(c[:, 1], np.cos(2 * np.pi * np.arange(7) / 7 + 0.1 * np.pi))
    assert np.allclose(weekday_code(np.arange(7), 3).sum(axis=0), 0.0)
    assert np.array_equal(weekday_code([9], 2), weekday_code([2], 2))


def test_binding_leaves_the_world_unchanged_and_scale_follows_amplitude():
    dyn, world = _bound({"amplitude": 0.4, "rank": 2, "harmonics": 2})
    _, fresh = tiny_world(3)
    assert np.array_equal(world.users.prefs, fresh.users.prefs)
    week = weekday_code(np.arange(PERIOD), 2) @ dyn.B.T
    rms = np.sqrt(np.mean(np.sum(week**2, axis=1)))
    norm = np.linalg.norm(fresh.users.prefs[: fresh.users.n].astype(np.float64), axis=1).mean()
    assert rms == pytest.approx(0.4 * norm, rel=1e-9)
    assert np.linalg.matrix_rank(dyn.B) == 2
    assert not dyn.offset(0).any() and dyn.offset(3).any()


@pytest.mark.parametrize("weeks", [1, 2])
def test_tastes_return_exactly_to_their_start_every_seven_cycles(weeks):
    dyn, world = _bound()
    start = world.users.prefs.copy()
    _advance(dyn, world, range(3))
    assert not np.array_equal(world.users.prefs, start)  # mid-week: moved
    _advance(dyn, world, range(3, PERIOD * weeks))
    assert np.array_equal(world.users.prefs, start)  # bit for bit


def test_the_offset_is_shared_by_all_users():
    dyn, world = _bound({"amplitude": 0.5})
    n = world.users.n
    start = world.users.prefs[:n].astype(np.float64)
    for t in range(PERIOD):
        _advance(dyn, world, range(t, t + 1))
        delta = world.users.prefs[:n].astype(np.float64) - start
        assert np.allclose(delta, dyn.offset(t + 1)[None, :], atol=1e-6)
        assert np.allclose(delta, delta[0], atol=1e-6)


def test_another_dynamic_moves_the_base_and_the_offset_is_replaced_not_added():
    dyn, world = _bound()
    _advance(dyn, world, range(2))
    moved = world.users.prefs[5].copy() + 0.25  # what e.g. drift would do to one user
    world.users.prefs[5] = moved
    others = np.delete(np.arange(world.users.n), 5)
    _advance(dyn, world, range(2, 2 + PERIOD))  # a whole week later: the same weekday again
    assert np.allclose(world.users.prefs[5], moved, atol=1e-6)
    assert np.allclose(dyn.base[5], moved - dyn.offset(2), atol=1e-6)
    _, fresh = tiny_world(3)
    ref = copy.deepcopy(fresh)
    d2 = registry.build("dynamics", {"type": "periodic"}, tiny_context(3, tiny_state(ref)))
    _advance(d2, ref, range(2 + PERIOD))
    assert np.array_equal(world.users.prefs[others], ref.users.prefs[others])


def test_new_users_join_with_their_drawn_tastes_then_follow_the_week():
    dyn, world = _bound()
    _advance(dyn, world, range(2))
    n0 = world.users.n
    new = np.full((3, world.users.dim), 0.2, np.float32)
    world.users.append(new, 3)
    _advance(dyn, world, range(2, 3))
    assert len(dyn.base) == world.users.n == n0 + 3
    assert np.array_equal(dyn.base[n0:], new)
    assert np.allclose(world.users.prefs[n0:world.users.n], new + dyn.offset(3), atol=1e-7)


def test_checkpoint_mid_period_equals_an_uninterrupted_run():
    dyn, world = _bound({"harmonics": 2, "rank": 3})
    _advance(dyn, world, range(10))
    want = world.users.prefs.copy()

    half, w2 = _bound({"harmonics": 2, "rank": 3})
    _advance(half, w2, range(4))  # stop mid-week
    saved_world, state = copy.deepcopy(w2), roundtrip(half.state_dict())
    fresh = registry.build("dynamics", {"type": "periodic", "harmonics": 2, "rank": 3},
                           tiny_context(3, tiny_state(saved_world)))
    fresh.load_state_dict(state)
    _advance(fresh, saved_world, range(4, 10))
    assert np.array_equal(saved_world.users.prefs, want)


def _loop_scenario():
    return validate_mapping({
        "world": {"type": "chaney", "n_users": 80, "n_items": 120, "dim": 6, "n_creators": 5},
        "policy": {"type": "popularity"}, "steps": 10, "k": 4,
        "users": {"choice": {"type": "mnl", "temperature": 0.02, "no_click_utility": 0.02},
                  "dynamics": [{"type": "drift", "rate": 0.05}, {"type": "periodic", "amplitude": 0.5}],
                  "population": {"type": "dynamic", "arrivals": 2.0}},
        "metrics": {"include": ["utility"], "user_sample": 40, "regret_sample": 20}})


def test_loop_resume_mid_week_with_drift_and_arrivals_equals_an_uninterrupted_run():
    sc = _loop_scenario()

    def run(m, steps):
        rows = []
        for _ in range(steps):
            m.step()
            rows.append(m.last_rows)
        return rows

    full = FeedbackLoop(sc, "p", sc.policy, 4)
    want = run(full, 10)
    half = FeedbackLoop(sc, "p", sc.policy, 4)
    first = run(half, 4)
    resumed = FeedbackLoop(sc, "p", sc.policy, 4, restore=roundtrip(half.state()))
    assert first + run(resumed, 6) == want
    assert np.array_equal(resumed.world.users.prefs, full.world.users.prefs)
    assert full.world.users.n > 80  # arrivals happened and were followed


def test_periodic_conforms():
    report = check_component("dynamics", "periodic")
    assert "seeded determinism" in report
