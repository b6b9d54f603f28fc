"""M-UTIL regret: the oracle's best item is the best among items unconsumed *before* this cycle's
choice, whatever the number of users or history pairs scored together."""

from __future__ import annotations

import numpy as np

from recloop.analysis import user_metrics as UM
from recloop.analysis.user_collectors import _Before
from recloop.recommenders.base import Feedback
from recloop.sim.engine import ScoringEngine
from recloop.sim.state import History


def _cycle(n_users: int = 120, n_items: int = 1000, per_user: int = 450, seed: int = 0):
    """Users with long histories who each consume their best unconsumed item this cycle (regret 0)."""
    rng = np.random.default_rng(seed)
    prefs = rng.normal(size=(n_users, 6)).astype(np.float32)
    attrs = rng.normal(size=(n_items, 6)).astype(np.float32)
    hist = History(n_users)
    users = np.repeat(np.arange(n_users), per_user)
    items = np.concatenate([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    hist.add(users, items)
    util = prefs.astype(np.float64) @ attrs.T.astype(np.float64)
    seen = np.zeros((n_users, n_items), bool)
    seen[users, items] = True
    chosen = np.argmax(np.where(seen, -np.inf, util), axis=1)
    ids = np.arange(n_users, dtype=np.int64)
    hist.add(ids, chosen)  # the model records the choice before the metrics run
    slates = np.stack([chosen, (chosen + 1) % n_items], axis=1)
    fb = Feedback(0, ids, slates, np.zeros(n_users, np.int64), chosen.astype(np.int64),
                  util[ids, chosen].astype(np.float32))
    return prefs, attrs, hist, fb


def test_before_pairs_same_definition_above_50000_pairs():
    _, _, hist, fb = _cycle()
    users = fb.users
    assert len(hist.pairs(users)[0]) >= 50_000  # one chunk crosses the old threshold
    before = _Before(hist, fb)
    r, c = before.pairs(users)
    assert not np.any(c == fb.chosen_item[r])  # this cycle's pairs are gone
    assert len(r) == len(hist.pairs(users)[0]) - len(users)
    small = [before.pairs(users[lo:lo + 7]) for lo in range(0, len(users), 7)]  # chunks far below it
    rs = np.concatenate([sr + lo for lo, (sr, _) in zip(range(0, len(users), 7), small)])
    cs = np.concatenate([sc for _, sc in small])
    assert sorted(zip(r.tolist(), c.tolist())) == sorted(zip(rs.tolist(), cs.tolist()))


def test_regret_zero_for_best_choices_with_many_pairs():
    """Each user chose its best unconsumed item: regret 0 whether or not a chunk holds >= 50,000 pairs."""
    prefs, attrs, hist, fb = _cycle()
    eng = ScoringEngine("auto")
    for users in (fb.users, fb.users[:10]):
        _, best = eng.topk_factors(users, 1, prefs, attrs, exclude=_Before(hist, fb))
        chosen = fb.utility[users]
        assert np.allclose(best[:, 0], chosen, atol=1e-5)
        assert UM.regret(best[:, 0], chosen) / len(users) < 1e-5


def test_items_consumed_organically_this_cycle_count_as_unconsumed_before_it():
    """An organic pick (or an extra accept of a multi-accept model) made in this cycle was unconsumed
    before the cycle: the oracle may still name it, so a user whose slate pick was worse has regret."""
    rng = np.random.default_rng(1)
    prefs = rng.normal(size=(3, 5)).astype(np.float32)
    attrs = rng.normal(size=(50, 5)).astype(np.float32)
    util = prefs.astype(np.float64) @ attrs.T.astype(np.float64)
    hist = History(3)
    earlier = np.argsort(util[0])[:10]  # consumed in earlier cycles
    hist.add(np.zeros(10, np.int64), earlier)
    ranked = [int(i) for i in np.argsort(-util[0]) if i not in set(earlier.tolist())]
    b1, b2 = ranked[0], ranked[1]
    # this cycle: the slate pick is the runner-up b2, and the user also took b1 organically
    hist.add(np.array([0, 0]), np.array([b2, b1]))
    users = np.array([0], np.int64)
    fb = Feedback(0, users, np.array([[b2, 1]]), np.array([0]), np.array([b2]),
                  np.array([util[0, b2]], np.float32), consumed=(np.array([0, 0]), np.array([b2, b1])))
    r, c = _Before(hist, fb).pairs(users)
    assert sorted(c.tolist()) == sorted(earlier.tolist())  # both of this cycle's pairs are gone
    _, top = ScoringEngine("numpy").topk_factors(users, 1, prefs, attrs, exclude=_Before(hist, fb))
    assert np.isclose(top[0, 0], util[0, b1], atol=1e-5)  # the oracle names b1: regret > 0
    legacy = Feedback(0, users, fb.slates, fb.chosen_pos, fb.chosen_item, fb.utility)  # chosen items only
    assert b1 in _Before(hist, legacy).pairs(users)[1].tolist()
