"""The ideal policy breaks exact ties by a hash of (seed, step, user, item), chunk-independently."""

from __future__ import annotations

import textwrap

import numpy as np

from recloop.sim.config import validate_mapping
from recloop.sim.engine import ScoringEngine
from recloop.sim.model import FeedbackLoop

SCEN = """
name: ties
seed: 4
steps: 2
k: 6
world: {type: chaney, n_users: 400, n_items: 300, dim: 10, n_creators: 0}
policies: {ideal: {type: ideal}}
retrain: {every: 1}
initial_log: {interactions_per_user: 2}
"""


def _loop():
    import yaml

    sc = validate_mapping(yaml.safe_load(textwrap.dedent(SCEN)))
    model = FeedbackLoop(sc, "ideal", sc.policy_configs()["ideal"], 4)
    # plant exact ties: every user's top attribute is shared by 20 one-hot items
    items = model.world.items
    items.attrs[:200] = 0.0
    items.attrs[np.arange(200), np.arange(200) % 10] = 1.0
    return model


def test_ties_are_hashed_and_slates_stay_optimal():
    model = _loop()
    users = np.arange(model.world.users.n)
    pol, view = model.policy, model.platform.view
    slates, scores = pol.recommend(users, 6, view, exclude=model.history, step=0)
    truth = model.world.users.prefs @ model.world.items.attrs[: model.world.items.n].T
    best = np.sort(truth, axis=1)[:, ::-1]
    consumed = model.history
    for u in users[:50]:  # every slate holds top utilities (up to consumed items, which are excluded)
        got = truth[u, slates[u]]
        assert np.all(np.diff(got) <= 1e-6)
        allowed = np.delete(truth[u], consumed.pairs(np.array([u]))[1])
        np.testing.assert_allclose(np.sort(got)[::-1], np.sort(allowed)[::-1][:6], rtol=1e-5)
    assert best.shape[0] == len(users)
    # users whose top attribute is the same planted dimension no longer get identical slates
    top = np.argmax(model.world.users.prefs, axis=1)
    same = [slates[top == d] for d in range(10)]
    share_identical = np.mean([len({tuple(r) for r in g}) == 1 for g in same if len(g) > 1])
    assert share_identical < 0.5
    # and another step hashes differently
    slates2, _ = pol.recommend(users, 6, view, exclude=model.history, step=1)
    assert not np.array_equal(slates, slates2)


def test_ties_do_not_depend_on_chunking():
    model = _loop()
    users = np.arange(model.world.users.n)
    pol, view = model.policy, model.platform.view
    a, _ = pol.recommend(users, 6, view, exclude=model.history, step=0, engine=ScoringEngine("numpy", chunk_rows=128))
    b, _ = pol.recommend(users, 6, view, exclude=model.history, step=0, engine=ScoringEngine("numba", chunk_rows=512))
    np.testing.assert_array_equal(a, b)
