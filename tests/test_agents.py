"""User and creator models against the reference's sanity values (U-MNL, U-CASCADE, U-CHANEY,
U-DRIFT, U-SATIATION, U-FAMILIARITY, CR-TRECS), plus sampling checks of the vectorised choice."""

import numpy as np
import pytest

from recloop.agents.choice import Cascade, ChaneyChoice, MultinomialLogit
from recloop.agents.creators import trecs_profile_update
from recloop.agents.dynamics import Familiarity, Satiation, slerp
from recloop.rng import derive_key
from recloop.sim.state import Creators, Items, Users, World


def test_mnl_probabilities_sanity():
    m = MultinomialLogit(MultinomialLogit.Params(temperature=1.0, no_click_utility=0.0))
    p = m.probabilities(np.array([[1.0, 0.0]], np.float32), np.ones((1, 2), bool))[0]
    assert p == pytest.approx([0.576117, 0.211942, 0.211942], abs=1e-6)


def test_mnl_gumbel_sampling_matches_probabilities():
    m = MultinomialLogit(MultinomialLogit.Params(temperature=1.0, no_click_utility=0.0, position_bias=0.5))
    n = 200_000
    util = np.tile(np.array([[1.0, 0.0, 0.5]], np.float32), (n, 1))
    valid = np.ones_like(util, bool)
    pos = m.choose(util, valid, np.arange(n), derive_key(0, "t"))
    freq = np.bincount(pos + 1, minlength=4) / n  # index 0 = no click
    probs = m.probabilities(util[:1], valid[:1])[0]
    assert freq[1:] == pytest.approx(probs[:3], abs=0.004)
    assert freq[0] == pytest.approx(probs[3], abs=0.004)


def test_mnl_position_bias_weights():
    m = MultinomialLogit(MultinomialLogit.Params(temperature=1.0, no_click_utility=None, position_bias=1.0))
    p = m.probabilities(np.zeros((1, 2), np.float32), np.ones((1, 2), bool))[0]
    assert p[:2] == pytest.approx([2 / 3, 1 / 3])  # θ_k = (1/k)^η


def test_cascade_sanity_and_sampling():
    m = Cascade(Cascade.Params(attention=1.0, scale=1.0))
    util = np.array([[0.5, 0.5]], np.float32)
    p = m.probabilities(util, np.ones((1, 2), bool))[0]
    assert p == pytest.approx([0.5, 0.25, 0.25])
    n = 100_000
    pos = m.choose(np.tile(util, (n, 1)), np.ones((n, 2), bool), np.arange(n), derive_key(1, "c"))
    freq = np.bincount(pos + 1, minlength=3) / n
    assert freq == pytest.approx([0.25, 0.5, 0.25], abs=0.0065)  # ~4.5 binomial sd at n=1e5


def test_chaney_choice_sanity():
    m = ChaneyChoice()
    util = np.array([[0.5, 0.6]], np.float32)
    assert 0.6 * 2 ** -0.8 == pytest.approx(0.344610, abs=1e-6)  # the reference: scores 0.5 and 0.344610
    assert m.choose(util, np.ones((1, 2), bool), np.arange(1), derive_key(0, "x"))[0] == 0


def test_drift_slerp_sanity():
    out = slerp(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), 0.5)
    assert out[0] == pytest.approx([0.707107, 0.707107], abs=1e-6)
    # antipodal vectors are guarded and keep the norm
    out = slerp(np.array([[2.0, 0.0]]), np.array([[-1.0, 0.0]]), 0.3)
    assert np.isfinite(out).all() and np.linalg.norm(out) == pytest.approx(2.0)


def _world(n_users=1, genres=None, creator=None):
    genres = np.array([[1.0]], np.float32) if genres is None else genres
    items = Items.create(np.ones((len(genres), 2), np.float32), genres, [f"t{i}" for i in range(len(genres))],
                         creator=creator)
    return World(Users.create(np.ones((n_users, 2), np.float32)), items)


def test_satiation_sanity():
    w = _world()
    d = Satiation(Satiation.Params(decay=0.5, strength=0.5))
    d.init(w)
    users = np.array([0])
    d.update(users, np.array([0]), w, 0)
    d.update(users, np.array([0]), w, 1)
    assert d.s[0, 0] == pytest.approx(0.75)
    mu = d.adjust(users, np.array([[0]]), np.array([[1.0]], np.float32), w)
    assert mu[0, 0] == pytest.approx(0.625)


def test_familiarity_sanity():
    w = _world(creator=np.array([0], np.int32))
    d = Familiarity(Familiarity.Params(kappa=3.0, strength=1.0))
    d.init(w)
    users = np.array([0])
    assert d.familiarity(users, np.array([[0]]), w)[0, 0] == 0.0
    for t in range(3):
        d.update(users, np.array([0]), w, t)
    assert d.familiarity(users, np.array([[0]]), w)[0, 0] == pytest.approx(0.632121, abs=1e-6)


def test_trecs_creator_update_sanity():
    out = trecs_profile_update(np.array([[0.5, 0.5]], np.float32), np.array([[1.0, 0.0]]), 0.05)
    assert out[0] == pytest.approx([0.523810, 0.476190], abs=1e-6)


def test_creators_publish_items_with_titles():
    from recloop import registry
    from recloop.contracts import BuildContext
    from recloop.rng import component_rng

    gen = registry.build("world", {"type": "chaney", "n_users": 30, "n_items": 40, "dim": 5, "n_creators": 4})
    w = gen.build(component_rng(0, "world"))
    c = registry.build("creator", {"type": "trecs", "creation_prob": 1.0}, BuildContext(seed=0, generator=gen))
    n0 = w.items.n
    new = c.step(w, 0, np.arange(30), np.arange(30) % n0)
    assert len(new) == 4 and w.items.n == n0 + 4 and len(w.items.titles) == w.items.n
    assert np.allclose(w.creators.profiles.sum(axis=1), 1.0, atol=1e-3)
    assert (w.items.created_at[new] == 1).all()
    assert isinstance(w, World) and isinstance(w.creators, Creators)


def test_drift_kernel_matches_reference_slerp():
    from recloop.agents.dynamics import Drift

    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6)).astype(np.float32)
    a = rng.standard_normal((20, 6)).astype(np.float32)
    w = World(Users.create(x), Items.create(a, np.ones((20, 1), np.float32), [str(i) for i in range(20)]))
    chosen = np.where(rng.random(50) < 0.7, rng.integers(0, 20, 50), -1)
    expected = x.copy()
    hit = chosen >= 0
    expected[hit] = slerp(x[hit], a[chosen[hit]], 0.3)
    Drift(Drift.Params(rate=0.3)).update(np.arange(50), chosen, w, 0)
    np.testing.assert_allclose(w.users.prefs, expected, rtol=1e-5, atol=1e-6)
