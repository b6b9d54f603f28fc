"""The contracts between the loop and its components (recloop.contracts): what a policy may see, what a
metric receives each cycle, how stages add data, and the cycle's phases as stepped Mesa agents."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from recloop import registry
from recloop.contracts import (
    PROVENANCE,
    CatalogReport,
    CycleRecord,
    HiddenStateError,
    InteractionReport,
)
from recloop.recommenders.base import Policy
from recloop.recommenders.classic import PopularityPolicy
from recloop.registry import _REGISTRY, register
from recloop.sim.actors import CreatorsAgent, PlatformAgent, UsersAgent
from recloop.sim.config import validate_mapping
from recloop.sim.model import FeedbackLoop

WORLD = {"type": "chaney", "n_users": 80, "n_items": 60, "dim": 6, "n_creators": 4}
METRICS = {"pairs": 20, "user_sample": 40, "regret_sample": 10}


def _loop(policy: dict, **extra) -> FeedbackLoop:
    sc = validate_mapping({"world": WORLD, "policy": policy, "steps": 3, "k": 4, "metrics": METRICS, **extra})
    return FeedbackLoop(sc, "p", sc.policy, 1)


@pytest.fixture
def registered():
    """Register throw-away components; unregistered afterwards."""
    added: list[tuple[str, str]] = []

    def add(kind: str, name: str, cls):
        register(kind, name)(cls)
        added.append((kind, name))
        return cls

    yield add
    for kind, name in added:
        _REGISTRY[kind].pop(name, None)


# ----------------------------------------------------------------------------------- platform view
def test_a_policy_cannot_read_preferences_unless_it_declares_it(registered):
    class Peek(Policy):
        def factors(self, view):
            return view.users.prefs, view.items.attrs, None

    class Oracle(Peek):
        uses_ground_truth = True

        def factors(self, view):
            return view.truth.users.prefs, view.items.attrs, None

    registered("policy", "_peek", Peek)
    registered("policy", "_oracle", Oracle)
    m = _loop({"type": "_peek"})
    with pytest.raises(HiddenStateError, match=r"policy 'p' read users\.prefs.*uses_ground_truth = True"):
        m.step()
    with pytest.raises(HiddenStateError, match="view.truth"):
        m.platform.view.truth  # noqa: B018
    oracle = _loop({"type": "_oracle"})
    oracle.step()  # granted: the oracle reads the truth
    assert oracle.platform.view.truth is oracle.world


def test_the_view_is_read_only_and_live():
    m = _loop({"type": "popularity"})
    view = m.platform.view
    with pytest.raises(ValueError, match="read-only"):
        view.items.attrs[0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        view.popularity[0] = 1.0
    with pytest.raises(HiddenStateError, match="CatalogReport"):
        view.items.append  # noqa: B018
    with pytest.raises(HiddenStateError, match="read-only"):
        view.history.add  # noqa: B018
    with pytest.raises(HiddenStateError):
        view.step = 3
    assert view.step == 0 and view.items.n == m.world.items.n and view.users.capacity >= view.users.n
    m.step()
    assert view.step == 1  # live: it follows the loop
    np.testing.assert_array_equal(view.popularity, m.popularity[: m.world.items.n])
    data = view.training_data()
    assert len(data) == len(m.training_data()) and set(np.unique(data.provenance)) <= {0, 1}


def test_sequences_are_each_users_recent_consumption_in_order():
    m = _loop({"type": "random"})
    for _ in range(2):
        m.step()
    users = np.array([0, 5, 79])
    seq = m.platform.view.sequences(users, 4)
    assert seq.shape == (3, 4) and seq.dtype == np.int32
    data = m.training_data()
    for r, u in enumerate(users):
        mine = data.items[data.users == u]
        want = mine[-4:]
        np.testing.assert_array_equal(seq[r, 4 - len(want):], want)
        assert (seq[r, : 4 - len(want)] == -1).all()


# ------------------------------------------------------------------------------------- cycle record
def test_metrics_receive_a_frozen_cycle_record_and_never_the_model(registered):
    seen: list[CycleRecord] = []

    class Spy(registry.get("metric", "exposure").cls):
        METRICS = {}

        def compute(self, rec):
            seen.append(rec)
            return []

    registered("metric", "_spy", Spy)
    m = _loop({"type": "als", "factors": 4, "iterations": 2},
              metrics={**METRICS, "include": ["_spy"]}, users={"organic_rate": 0.3})
    pop0 = m.popularity.copy()
    m.step()
    rec = seen[-1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.slates = None
    n, k = rec.slates.shape
    assert n == len(rec.users) and k == 4 and rec.step == 0
    assert rec.exposure.sum() == (rec.slates >= 0).sum()
    assert rec.choice_probs.shape == (n, k + 1) and np.allclose(rec.choice_probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(rec.popularity_before, pop0)
    users, items = rec.consumed  # picks and organic picks: φ grows by the new distinct pairs
    assert rec.popularity.sum() - rec.popularity_before.sum() == len(set(zip(users.tolist(), items.tolist())))
    assert set(rec.user_sample) <= set(rec.users) and abs(rec.provenance_shares.sum() - 1) < 1e-12
    U = rec.policy.user_factors()
    assert U.shape[1] == 4 and not U.flags.writeable
    assert not hasattr(rec.policy, "fit") and not hasattr(rec, "model")
    with pytest.raises(HiddenStateError):
        rec.policy.x = 1


# ------------------------------------------------------------------------------------------ reports
def test_stages_add_data_only_through_reports_the_loop_commits(registered):
    class Adder(PopularityPolicy):
        def produce(self, view, *, step):
            n = view.items.n
            d, g = view.items.dim, view.items.genres.shape[1]
            cat = CatalogReport(n, np.zeros((1, d), np.float32), np.full((1, g), 1 / g, np.float32), ("New",),
                                np.array([-1], np.int32), np.zeros(1, np.int8), step, source="_adder")
            inter = InteractionReport(np.array([0, 1]), np.array([n, n]), PROVENANCE["llm_augmented"],
                                      max(step - 1, -1), initial=step == 0, source="_adder")
            return [cat, inter]

    registered("policy", "_adder", Adder)
    m = _loop({"type": "_adder"})
    n0 = registry.build("world", WORLD).build(np.random.default_rng(0)).items.n
    assert m.world.items.n == n0 + 1 and m.world.items.titles[-1] == "New"
    data = m.training_data()
    aug = data.provenance == PROVENANCE["llm_augmented"]
    assert aug.sum() == 2 and (data.items[aug] == n0).all()
    assert m.history.nnz == len(data) - 2  # training data, not consumption
    m.step()
    assert m.world.items.n == n0 + 2


def test_the_llm_augmenter_hands_its_phantom_items_to_the_loop():
    from recloop.llm.role_augment import LLMAugmented

    m = _loop({"type": "llm_augmented", "base": {"type": "popularity"}, "users_per_cycle": 30, "n": 3,
               "candidates": 10, "unmatched": "phantom"},
              llm={"backend": {"type": "surrogate", "h": 0.6}})
    aug: LLMAugmented = m.policy
    phantoms = np.flatnonzero(aug.phantom)
    assert len(phantoms) and (phantoms >= 60).all() and m.world.items.n == 60 + len(phantoms)
    reports = m._last_reports
    assert [type(r).__name__ for r in reports] == ["CatalogReport", "InteractionReport"]
    np.testing.assert_array_equal(reports[0].ids, phantoms)


# -------------------------------------------------------------------------------- phases and Mesa
def test_the_coarse_actors_are_mesa_agents_stepped_each_cycle():
    m = _loop({"type": "popularity"}, creators={"type": "trecs", "creation_prob": 0.5})
    kinds = {type(a) for a in m.agents}
    assert kinds == {PlatformAgent, UsersAgent, CreatorsAgent}
    n0 = m.world.items.n
    m.step()
    m.step()
    assert m.steps == 2 and m.t == 2 and m.world.items.n > n0  # creators advanced
    bare = _loop({"type": "popularity"})
    assert {type(a) for a in bare.agents} == {PlatformAgent, UsersAgent}  # no dead agents


def test_metrics_take_params_in_the_include_list():
    m = _loop({"type": "popularity"}, metrics={**METRICS, "include": ["exposure", {"type": "homogenization",
                                                                                    "pairs": 7}]})
    exp, hom = m.metrics.components
    assert hom.params.pairs == 7 and len(hom.pairs) == 7
    m.step()
    rows = m.last_rows
    assert {r[0] for r in rows} >= {"gini_exposure", "homogenization"}
    with pytest.raises(Exception, match="pairz"):
        validate_mapping({"world": WORLD, "policy": {"type": "random"},
                          "metrics": {"include": [{"type": "homogenization", "pairz": 3}]}})


def test_schema_describes_nested_components_as_unions():
    from recloop.sim.config import json_schema

    text = str(json_schema())
    assert "'discriminator': {'propertyName': 'type'}" in text
    assert "'title': 'policy als'" in text and "'title': 'reranker mmr'" in text


def test_nested_components_are_validated_at_their_full_key(write_yaml):
    from recloop.errors import RecloopInputError
    from recloop.sim.config import load_scenario

    base = "world: {type: chaney, n_users: 50, n_items: 40}\n"
    cases = {
        "policy: {type: pipeline, retrieval: {type: als, factorz: 3}}": ("policy.retrieval", "factorz"),
        "policy: {type: popularity}\nmetrics: {include: [exposur]}": ("metrics.include.0", "Did you mean 'exposure'"),
        "policy: {type: popularity}\nmetrics: {include: [{type: homogenization, pairz: 3}]}":
            ("metrics.include.0", "allowed keys: pairs"),
        "policy: {type: llm_augmented, base: {type: bprr}}": ("policy.base.type", "Did you mean 'bpr'"),
        "policy: {type: pipeline, retrieval: {type: als}, reranker: {type: popularity_penalty, weigth: 1}}":
            ("policy.reranker", "'weigth' is not allowed here. Did you mean 'weight'?"),
    }
    for body, (key, text) in cases.items():
        with pytest.raises(RecloopInputError) as err:
            load_scenario(write_yaml(base + body))
        assert f"key '{key}'" in str(err.value) and text in str(err.value), str(err.value)
