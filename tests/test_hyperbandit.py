"""HyperBandit (E-HYPER): the hypernetwork's time embedding and refit, the factor-UCB item statistics,
the reduction to a linear score, the LLM warm start, chunk invariance and resume."""

from __future__ import annotations

import numpy as np
import pytest

from recloop.contracts import PROVENANCE
from recloop.recommenders.hyper_net import HyperNet, polar_time
from recloop.recommenders.hyperbandit import _decayed_update, _Events
from recloop.sim.checkpoint import roundtrip
from recloop.sim.config import validate_mapping
from recloop.sim.model import FeedbackLoop

pytest.importorskip("torch")


def test_polar_time_is_weekly():
    t = polar_time(np.arange(21))
    np.testing.assert_allclose(t[:7], t[7:14])
    np.testing.assert_allclose(t[0], [np.sin(0.1 * np.pi), np.cos(0.1 * np.pi)])
    assert len({tuple(np.round(r, 9)) for r in t[:7]}) == 7


def test_decayed_item_updates_equal_one_event_at_a_time():
    rng = np.random.default_rng(0)
    n_items, dl, gamma = 5, 3, 0.9
    items = rng.integers(0, n_items, 40)
    p = rng.normal(size=(40, dl))
    resid = rng.normal(size=40)
    phi, b = np.zeros((n_items, dl, dl)), np.zeros((n_items, dl))
    _decayed_update(phi, b, items, p, resid, gamma)
    ref_phi, ref_b = np.zeros_like(phi), np.zeros_like(b)
    for j in np.argsort(items, kind="stable"):
        i = items[j]
        ref_phi[i] = gamma * ref_phi[i] + np.outer(p[j], p[j])
        ref_b[i] = gamma * ref_b[i] + p[j] * resid[j]
    np.testing.assert_allclose(phi, ref_phi, atol=1e-12)
    np.testing.assert_allclose(b, ref_b, atol=1e-12)


def test_refit_lowers_the_listnet_loss():
    rng = np.random.default_rng(1)
    d, k, n = 4, 5, 400
    X = rng.normal(size=(30, d))
    ev = _Events()
    prof = rng.normal(size=(n, d))
    slates = np.stack([rng.choice(30, k, replace=False) for _ in range(n)])
    best = np.argmin(np.einsum("nkd,nd->nk", X[slates], prof), axis=1)  # clicks follow −<x, u>: Θ = −I
    ev.add(0, prof, slates, best, 1000)
    net = HyperNet(d, 0, d, [8], 1e-2, seed=3)
    first = net.refit(ev, X, 1, 50, np.random.default_rng(0))
    last = net.refit(ev, X, 30, 50, np.random.default_rng(0))
    assert last < 0.8 * first


WORLD = {"type": "chaney", "n_users": 100, "n_items": 70, "dim": 5, "n_creators": 0}


def _scenario(**policy):
    return validate_mapping({"world": WORLD, "policy": {"type": "hyperbandit", "hidden": [8], **policy},
                             "steps": 6, "k": 4, "retrain": {"every": 2},
                             "users": {"choice": {"type": "mnl", "temperature": 0.05, "no_click_utility": 0.2},
                                       "repeat_consumption": True},
                             "metrics": {"include": ["bandit", "llm_generation", "llm_feedback"],
                                         "user_sample": 40}})


def _run(sc, steps, model=None, **kw):
    m = model or FeedbackLoop(sc, "hb", sc.policy, 2, **kw)
    rows = []
    for _ in range(steps):
        m.step()
        rows.append(m.last_rows)
    return m, rows


def test_without_latent_part_the_score_is_linear_in_theta():
    m = FeedbackLoop(_scenario(latent=0, epochs=0), "hb", _scenario(latent=0, epochs=0).policy, 2)
    pol, view = m.policy, m.platform.view
    users = np.arange(10)
    theta = pol.net.theta(polar_time(0))
    want = pol._user_features(users) @ theta.T @ np.asarray(view.items.attrs[: view.items.n], np.float64).T
    slates, scores = pol.recommend(users, 3, view, step=0)
    np.testing.assert_allclose(scores, np.take_along_axis(want, slates, 1), rtol=1e-5)


def test_llm_warm_start_is_logged_and_measured():
    sc = _scenario(llm_warm_start={"interactions": 120})
    m, rows = _run(sc, 2)
    data = m.training_data()
    assert (data.provenance == PROVENANCE["llm_augmented"]).sum() == 120
    assert len(m.policy.events) >= 120 and m.policy.refits >= 1
    names = {(a, g) for a, g, _ in rows[0]}
    assert ("llm_hall_rate", "role=augmenter,phase=generation") in names
    assert ("llm_log_share", "role=augmenter,phase=feedback_loop") in {(a, g) for a, g, _ in rows[1]}


def test_chunking_and_resume_leave_the_run_unchanged():
    sc = _scenario(llm_warm_start={"interactions": 60})
    _, rows = _run(sc, 6)
    chunked = validate_mapping({**sc.model_dump(exclude_none=True), "engine": {"chunk_rows": 1}})
    _, rows_c = _run(chunked, 6)
    assert rows_c == rows
    half, first = _run(sc, 3)
    resumed = FeedbackLoop(sc, "hb", sc.policy, 2, restore=roundtrip(half.state()))
    _, rest = _run(sc, 3, resumed)
    assert first + rest == rows
