"""Conformal core functions (sim/conformal.py, sim/conformal_ltt.py): the reference's sanity values (C-SPLIT,
C-ACI, C-FDR), weighted and Mondrian quantiles, ACI's deterministic bound, LTT's FDR control, MAPIE agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recloop.sim.conformal import (
    ACIState,
    aci_bound,
    aci_update,
    conformal_quantile,
    decay_weights,
    mondrian_qhat,
    mondrian_quantiles,
    scores_aps,
    scores_aps_all,
    scores_lac,
    set_stats,
    sets_aps,
    sets_lac,
)
from recloop.sim.conformal_ltt import (
    fdp_losses,
    fixed_sequence,
    hb_pvalue,
    hoeffding_pvalue,
    ltt_calibrate,
    mean_ild,
    select_lambda,
)


# ------------------------------------------------------------------------------------- C-SPLIT sanity
def test_qhat_reference_ten_scores():
    scores = np.arange(1, 11) / 10.0
    assert conformal_quantile(scores, 0.2) == pytest.approx(0.9)  # rank ⌈8.8⌉ = 9
    assert conformal_quantile(scores[::-1], 0.2) == pytest.approx(0.9)  # order does not matter
    assert conformal_quantile(scores, 0.1) == pytest.approx(1.0)  # ⌈9.9⌉ = 10
    assert conformal_quantile(scores, 0.05) == math.inf  # ⌈10.45⌉ = 11 > n → full catalog
    assert conformal_quantile(scores, 0.0) == math.inf
    assert conformal_quantile(scores, 1.0) == -math.inf
    assert conformal_quantile(np.arange(9) / 10.0, 0.1) == pytest.approx(0.8)  # (n+1)(1−α) = 9 exactly


def test_lac_set_reference():
    p = np.array([[0.6, 0.3, 0.08, 0.02]])
    mask = sets_lac(p, 0.9)
    assert np.flatnonzero(mask[0]).tolist() == [0, 1]
    sizes, covered = set_stats(mask, [1])
    assert sizes.tolist() == [2] and covered.tolist() == [True]
    assert scores_lac([0.3]) == pytest.approx([0.7])
    assert sets_lac(p, math.inf).all() and not sets_lac(p, -math.inf).any()


def test_aps_scores_and_sets():
    p = np.array([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.05, 0.25]])
    # non-randomised: mass strictly above y plus p_y; ties with p_y not counted above
    assert scores_aps(p, [2, 0]).tolist() == pytest.approx([0.7, 0.95])
    assert scores_aps_all(p)[0].tolist() == pytest.approx([0.5, 0.7, 0.7, 1.0])
    # randomised with explicit u
    assert scores_aps(p, [2, 0], u=np.array([0.5, 0.0])).tolist() == pytest.approx([0.6, 0.85])
    all_u = scores_aps_all(p, u=np.array([0.5, 0.0]))
    assert all_u[[0, 1], [2, 0]].tolist() == pytest.approx([0.6, 0.85])
    assert sets_aps(p, 0.7)[0].tolist() == [True, True, True, False]
    assert sets_aps(p, 0.4)[0].tolist() == [False] * 4  # no "include the last label": may be empty


def test_aps_all_matches_per_label_scores():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(30) * 0.3, size=40)
    p[:, 5] = p[:, 6]  # ties
    u = rng.random(40)
    every = scores_aps_all(p, u)
    for y in range(30):
        assert np.allclose(every[:, y], scores_aps(p, np.full(40, y), u))


def test_sets_are_chunk_invariant():
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(50), size=64)
    q = rng.random(64)  # per-row q̂ (Mondrian)
    whole = sets_aps(p, q)
    parts = np.vstack([sets_aps(p[i:i + 16], q[i:i + 16]) for i in range(0, 64, 16)])
    assert (whole == parts).all()
    assert (sets_lac(p, q) == np.vstack([sets_lac(p[i:i + 8], q[i:i + 8]) for i in range(0, 64, 8)])).all()


def test_split_coverage_exchangeable():
    """Exchangeable data: mean coverage within [1−α, 1−α+1/(n+1)] up to Monte Carlo error."""
    rng = np.random.default_rng(3)
    n, alpha, reps = 49, 0.2, 600
    cov = np.empty(reps)
    for r in range(reps):
        logits = rng.normal(size=(n + 200, 10)) * 1.5
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        y = (rng.random(n + 200)[:, None] > np.cumsum(p, 1)).sum(1)
        q = conformal_quantile(scores_lac(p[np.arange(n), y[:n]]), alpha)
        cov[r] = set_stats(sets_lac(p[n:], q), y[n:])[1].mean()
    se = cov.std() / math.sqrt(reps)
    assert 1 - alpha - 3 * se <= cov.mean() <= 1 - alpha + 1 / (n + 1) + 3 * se


# ------------------------------------------------------------------------------- weighted and Mondrian
@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=40), st.floats(0.01, 0.99))
def test_weighted_rho_one_equals_unweighted(scores, alpha):
    s = np.array(scores)
    w = decay_weights(np.zeros(len(s)), 0, 1.0)
    assert conformal_quantile(s, alpha, weights=w) == conformal_quantile(s, alpha)
    w5 = decay_weights(np.arange(len(s)) % 5, 7, 1.0)
    assert conformal_quantile(s, alpha, weights=w5) == conformal_quantile(s, alpha)


def test_weighted_decay_hand_example():
    # scores 0.1 (t=0), 0.2 (t=1), 0.3 (t=2) at t=2 with ρ=0.5: weights .25, .5, 1, test 1 → total 2.75
    w = decay_weights([0, 1, 2], 2, 0.5)
    assert w.tolist() == [0.25, 0.5, 1.0]
    s = [0.1, 0.2, 0.3]
    # cumulative .0909, .2727, .6364: level 0.6 → 0.3; level 0.7 → +∞ (test point's mass)
    assert conformal_quantile(s, 0.4, weights=w) == pytest.approx(0.3)
    assert conformal_quantile(s, 0.3, weights=w) == math.inf
    assert conformal_quantile(s, 0.8, weights=w) == pytest.approx(0.2)


def test_mondrian_equals_per_group_split():
    rng = np.random.default_rng(4)
    s = rng.random(300)
    g = rng.integers(0, 3, 300)
    g[g == 2] = 7
    q = mondrian_quantiles(s, g, 0.1)
    assert set(q) == {0, 1, 7}
    for label in (0, 1, 7):
        assert q[label] == conformal_quantile(s[g == label], 0.1)
    per_row = mondrian_qhat(q, np.array([7, 0, 5]))
    assert per_row[0] == q[7] and per_row[1] == q[0] and per_row[2] == math.inf


# ------------------------------------------------------------------------------------------------- ACI
def test_aci_reference_sequence_and_bound():
    a = 0.1
    seq = []
    for err in (1, 0, 0):
        a = aci_update(a, err, 0.1, 0.05)
        seq.append(a)
    assert seq == pytest.approx([0.055, 0.06, 0.065])
    state = ACIState(target_alpha=0.1, gamma=0.05)
    assert [state.step(e) for e in (1, 0, 0)] == pytest.approx([0.055, 0.06, 0.065])
    assert state.err_running == pytest.approx(1 / 3)
    assert aci_bound(1000, 0.1, 0.05) == pytest.approx(0.019)


def _run_aci(state: ACIState, draws: np.ndarray) -> ACIState:
    """Errors are arbitrary in [0, 1] except that a full set (α_t ≤ 0) has err 0 and an empty one err 1."""
    for d in draws:
        err = 0.0 if state.alpha_t <= 0 else 1.0 if state.alpha_t >= 1 else float(d)
        state.step(err)
    return state


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.005, 0.05, 0.2]), st.sampled_from([0.05, 0.1, 0.3]),
       st.booleans(), st.booleans())
def test_aci_long_run_error_within_bound(seed, gamma, alpha, decay, binary):
    rng = np.random.default_rng(seed)
    T = 400
    p_err = rng.random()  # adversarial-ish: a miscalibrated constant error rate, or a regime switch
    draws = rng.random(T) < np.where(np.arange(T) < T // 2, p_err, 1 - p_err) if binary else rng.random(T) ** 3
    state = _run_aci(ACIState(target_alpha=alpha, gamma=gamma, decay=decay), draws.astype(float))
    assert -gamma - 1e-12 <= state.alpha_t <= 1 + gamma + 1e-12
    assert abs(state.err_running - alpha) <= state.bound() + 1e-12


def test_aci_with_real_sets_full_and_empty():
    """End to end with conformal_quantile: α_t ≤ 0 gives the full set (err 0), α_t ≥ 1 the empty set."""
    rng = np.random.default_rng(5)
    state = ACIState(target_alpha=0.1, gamma=0.2)
    for t in range(300):
        shift = 0.0 if t < 150 else 2.0  # the score law jumps: the frozen window under-covers
        calib = rng.random(50)
        test = rng.random(20) + shift
        q = conformal_quantile(calib, state.alpha_t)
        state.step(float((test > q).mean()))
    assert abs(state.err_running - 0.1) <= state.bound()
    assert aci_bound(300, 0.1, 0.05, decay=True) > aci_bound(300, 0.1, 0.05)


# ------------------------------------------------------------------------------------------------ C-FDR
def test_hoeffding_reference_and_hb():
    assert hoeffding_pvalue(0.05, 100, 0.1) == pytest.approx(0.606531, abs=1e-6)
    assert hoeffding_pvalue(0.2, 100, 0.1) == 1.0
    hb = hb_pvalue(0.05, 100, 0.1)
    assert hb <= 0.606531 and hb == pytest.approx(0.156510, abs=1e-5)
    assert hb_pvalue(0.0, 500, 0.1) < 1e-10
    assert fixed_sequence([0.01, 0.02, 0.5, 0.01], 0.1).tolist() == [0, 1]
    assert fixed_sequence([0.5, 0.01], 0.1).tolist() == []


def _fdr_world(rng, n_users, n_items=40):
    """Items with latent quality; 'bad' = quality below 0; the score is a noisy, user-shifted quality."""
    qual = rng.normal(size=(n_users, n_items))
    score = 1 / (1 + np.exp(-(qual + rng.normal(scale=1.0, size=qual.shape))))
    return score, qual < 0


def test_ltt_controls_fdr():
    rng = np.random.default_rng(6)
    lambdas = np.linspace(0.99, 0.3, 30)  # strict → loose
    alpha, delta = 0.2, 0.1
    test_s, test_bad = _fdr_world(rng, 4000)
    true_risk = fdp_losses(test_s, test_bad, lambdas).mean(axis=0)
    over, chosen = 0, []
    for _ in range(150):
        s, bad = _fdr_world(rng, 200)
        valid = ltt_calibrate(fdp_losses(s, bad, lambdas), alpha, delta, pvalue="hb")
        assert valid.tolist() == list(range(valid.size))  # a prefix of the grid
        if valid.size:
            j = valid[-1]
            chosen.append(j)
            over += true_risk[j] > alpha
    assert over / 150 <= delta + 0.05
    assert len(chosen) > 100 and np.mean([true_risk[j] for j in chosen]) <= alpha + 0.02
    # the chosen thresholds are not trivially strict: some valid λ admit large sets
    assert max(chosen) > 5


def test_select_lambda_diverse_and_ild():
    lambdas = [0.9, 0.7, 0.5, 0.3]
    assert select_lambda(lambdas, [0, 1, 2]) == 0.5
    assert select_lambda(lambdas, [0, 1, 2], diversity=[0.1, 0.8, 0.4, 0.99]) == 0.7
    assert math.isnan(select_lambda(lambdas, []))
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    scores = np.array([[0.95, 0.8, 0.6]])  # λ=.9: {0}; .7: {0,1} identical → ILD 0; .5: adds an orthogonal
    tot, cnt = mean_ild(scores, emb, lambdas)
    assert cnt.tolist() == [0, 1, 1, 1]
    assert tot[1] == pytest.approx(0.0) and tot[2] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------------- MAPIE
def _mapie_setup(score: str, seed: int):
    mapie = pytest.importorskip("mapie.classification")
    from sklearn.base import BaseEstimator, ClassifierMixin

    class FixedProba(ClassifierMixin, BaseEstimator):
        """Fitted classifier whose probabilities are a fixed table indexed by X[:, 0]."""

        def __init__(self, probs=None):
            self.probs = probs

        def fit(self, X, y=None):
            self.classes_ = np.arange(self.probs.shape[1])
            return self

        def predict_proba(self, X):
            return self.probs[np.asarray(X)[:, 0].astype(int)]

        def predict(self, X):
            return self.predict_proba(X).argmax(axis=1)

    rng = np.random.default_rng(seed)
    n, m, k = 300, 200, 8
    p = rng.dirichlet(np.ones(k) * 0.7, size=n + m)
    y = (rng.random(n + m)[:, None] > np.cumsum(p, 1)).sum(1).clip(max=k - 1)
    x = np.arange(n + m)[:, None]
    clf = FixedProba(p).fit(x, y)
    mc = mapie.SplitConformalClassifier(estimator=clf, confidence_level=0.9, conformity_score=score,
                                        prefit=True, random_state=seed)
    mc.conformalize(x[:n], y[:n])
    return mc, p, y, x, n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mapie_lac_agreement(seed):
    mc, p, y, x, n = _mapie_setup("lac", seed)
    ours = scores_lac(p[np.arange(n), y[:n]])
    assert np.allclose(np.ravel(mc.conformity_scores), ours)
    q = conformal_quantile(ours, 0.1)
    _, sets = mc.predict_set(x[n:])  # MAPIE computes its quantile at prediction time
    assert q == pytest.approx(float(mc._mapie_classifier.conformity_score_function_.quantiles_[0]))
    assert (sets[:, :, 0] == sets_lac(p[n:], q)).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mapie_aps_agreement(seed):
    """MAPIE randomises APS calibration scores (cumsum − u·p_y); with u_ours = 1 − u_mapie the scores are
    ours, its quantile is our q̂ on them, and its non-randomised sets (include_last_label=False) are our
    u = 1 sets wherever ours is non-empty (MAPIE always keeps the top label)."""
    mc, p, y, x, n = _mapie_setup("aps", seed)
    u_mapie = np.random.RandomState(seed).uniform(size=n)
    mapie_scores = np.ravel(mc.conformity_scores)
    assert np.allclose(mapie_scores, scores_aps(p[:n], y[:n], u=1 - u_mapie))
    q = conformal_quantile(mapie_scores, 0.1)
    _, sets = mc.predict_set(x[n:], conformity_score_params={"include_last_label": False})
    assert q == pytest.approx(float(mc._mapie_classifier.conformity_score_function_.quantiles_[0]))
    ours = sets_aps(p[n:], q)
    nonempty = ours.any(axis=1)
    assert nonempty.mean() > 0.9
    assert (sets[nonempty, :, 0] == ours[nonempty]).all()
    top = p[n:][~nonempty].argmax(axis=1)
    assert (sets[~nonempty, :, 0].sum(axis=1) == 1).all()
    assert sets[~nonempty, :, 0][np.arange(top.size), top].all()
