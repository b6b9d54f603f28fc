"""Tests for recloop.analysis.metrics and .user_metrics: reference sanity values (§A) and property tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from recloop.analysis import metrics as M
from recloop.analysis import user_metrics as UM

TOL = 1e-6
approx = lambda x: pytest.approx(x, abs=TOL)  # noqa: E731

FAST = settings(max_examples=60, deadline=None)


# --------------------------------------------------------------------- sanity values (reference §A)
class TestSanity:
    def test_gini(self):  # M-GINI
        assert M.gini(np.array([0, 0, 0, 4])) == approx(0.75)
        assert M.gini(np.array([1, 1, 1, 1])) == approx(0.0)
        assert M.gini(np.array([1, 2, 3, 4])) == approx(0.25)
        assert M.gini_normalised(np.array([0, 0, 0, 4])) == approx(1.0)
        assert M.gini_normalised(np.array([1, 2, 3, 4])) == approx(0.25 * 4 / 3)

    def test_coverage(self):  # M-COV: {a,b},{b,c} over 5 items
        assert M.coverage(np.array([[0, 1], [1, 2]]), 5) == approx(0.6)

    def test_entropy(self):  # M-ENT
        assert M.entropy(np.array([1, 2, 1])) == approx(1.039721)

    def test_arp(self):  # M-ARP
        pop = np.array([10, 4, 2])
        assert M.arp(np.array([[0, 1], [1, 2]]), pop) == approx(5.0)

    def test_aplt_aclt(self):  # M-APLT / M-ACLT
        pop = np.array([6, 2, 1, 1])
        head = M.short_head_mask(pop, 0.8)
        assert head.tolist() == [True, True, False, False]
        slates = np.array([[0, 2], [0, 1]])
        assert M.aplt(slates, head) == approx(0.25)
        assert M.aclt(slates, head) == approx(0.5)

    def test_poplift(self):  # M-POPLIFT: profile [4,4], recs [10,2]
        # as two users' per-user means ...
        assert M.popularity_lift(np.array([4.0, 4.0]), np.array([10.0, 2.0])) == approx(0.5)
        # ... and as one user whose means come from per_user_mean
        pop = np.array([4.0, 10.0, 2.0, 4.0])
        p = M.per_user_mean(np.array([[0, 3]]), pop)
        r = M.per_user_mean(np.array([[1, 2]]), pop)
        assert M.popularity_lift(p, r) == approx(0.5)

    def test_calkl(self):  # M-CALKL
        out = UM.miscalibration(np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]]), alpha=0.01)
        assert out.shape == (1,)
        assert out[0] == approx(1.958518)

    def test_ild(self):  # M-ILD: one-hot genres A, A, B
        attrs = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        assert UM.intra_list_diversity(np.array([[0, 1, 2]]), attrs)[0] == approx(2 / 3)

    def test_homog(self):  # M-HOMOG
        assert UM.jaccard(np.array([1, 2, 3]), np.array([2, 3, 4])) == approx(0.5)
        indptr = np.array([0, 3, 6])
        indices = np.array([1, 2, 3, 2, 3, 4])
        assert UM.mean_pair_jaccard(indptr, indices, np.array([[0, 1]])) == approx(0.5)
        assert UM.mean_pair_jaccard_slates(np.array([[1, 2, 3], [2, 3, 4]]), np.array([[0, 1]])) == approx(0.5)

    def test_polvar(self):  # M-POLVAR
        p, v = UM.polarization_variance(np.array([-1.0, -1.0, 1.0, 1.0]))
        assert p == approx(4.0)
        assert v == approx(1.0)

    def test_disagree(self):  # M-DISAGREE
        assert UM.disagreement(np.array([0.0, 1.0]), np.array([[0, 1]])) == approx(1.0)

    def test_er(self):  # M-ER
        assert UM.esteban_ray_from_hist(np.array([0.5, 0.5]), np.array([-1.0, 1.0]), a=1.0, K=1.0) == approx(
            0.5
        )

    def test_bc(self):  # M-BC
        assert UM.bimodality_coefficient(np.array([0.0] * 10 + [1.0] * 10)) == approx(0.766917)
        assert UM.bimodality_coefficient(np.arange(6.0)) == approx(0.198020)

    def test_drift(self):  # M-DRIFT: (1,0) -> (0,1)
        d = UM.drift(np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]]))
        assert d["cosine_distance"][0] == approx(1.0)
        assert d["angle"][0] == approx(math.pi / 2)
        assert d["l2"][0] == approx(math.sqrt(2))

    def test_expfair(self):  # M-EXPFAIR: one list [G0, G0, G1, G1]
        out = M.exposure_fairness(np.array([[0, 1, 2, 3]]), np.array([0, 0, 1, 1]), 4)
        assert out["exp_g0"] == approx(0.815465)
        assert out["exp_g1"] == approx(0.465338)
        assert out["dpr"] == approx(0.570642)
        e0, e1 = 2 * 0.8154648767857288, 2 * 0.46533827903669656
        assert out["share_gap"] == approx(e1 / (e0 + e1) - 0.5)

    def test_util(self):  # M-UTIL
        out = UM.utility_stats(np.array([0.2, 0.6]), n_users=2, n_clicks=2, n_slots=8)
        assert out["mean_utility"] == approx(0.4)
        assert out["ctr"] == approx(0.25)
        assert out["no_click_rate"] == approx(0.0)

    def test_novelty(self):  # M-NOV: φ/n_U = 0.25 -> 2 bits
        assert M.novelty(np.array([[0]]), np.array([1]), n_users=4) == approx(2.0)

    def test_serendipity(self):  # M-SEREN: L={a,b,c,d}, PM={a,b}, USEFUL={a,c}
        slates = np.array([[0, 1, 2, 3]])
        useful = np.array([[True, False, True, False]])
        assert UM.serendipity(slates, np.array([[0, 1]]), useful) == approx(0.25)


# --------------------------------------------------------------------- documented conventions / edge cases
class TestConventions:
    def test_empty_inputs(self):
        assert math.isnan(M.gini(np.array([])))
        assert M.gini(np.zeros(5)) == 0.0
        assert math.isnan(M.entropy(np.array([])))
        assert M.entropy(np.zeros(3)) == 0.0
        assert math.isnan(M.arp(np.full((2, 3), -1), np.ones(4)))
        assert math.isnan(M.aplt(np.empty((0, 3), dtype=int), np.ones(4, bool)))
        assert M.coverage(np.full((2, 3), -1), 4) == 0.0
        assert math.isnan(UM.mean_pair_jaccard_slates(np.array([[0, 1]]), np.empty((0, 2), int)))
        assert math.isnan(UM.bimodality_coefficient(np.array([0.0, 1.0, 2.0])))
        assert UM.regret(np.array([]), np.array([])) == 0.0
        assert UM.disagreement(np.array([0.0, 1.0]), np.empty((0, 2), int)) == 0.0

    def test_zero_users_give_nan_means(self):
        """Every mean over users is nan with no users (M-SEREN used to raise); sums are 0, per-user arrays
        empty, and coverage 0 (nothing was shown from a non-empty catalog)."""
        none = np.empty((0, 4), np.int64)
        pop, attrs = np.arange(5.0), np.eye(5)
        head = M.short_head_mask(pop)
        assert math.isnan(UM.serendipity(none, np.empty((0, 2), np.int64), np.empty((0, 4), bool)))
        assert math.isnan(UM.serendipity(none, np.array([], np.int64), np.array([], bool)))
        assert math.isnan(UM.serendipity(np.full((2, 3), -1), np.zeros((2, 1), np.int64), np.ones((2, 3), bool)))
        means = [M.arp(none, pop), M.aplt(none, head), M.aclt(none, head), M.novelty(none, pop, 4),
                 UM.afsr(none, attrs), UM.mean_pair_jaccard_slates(none, np.empty((0, 2), np.int64)),
                 M.popularity_lift([], []), UM.esteban_ray([]), UM.bimodality_coefficient([]),
                 UM.polarization_variance(np.empty((0, 3)))[1], *UM.utility_stats([], 0, 0, 0).values(),
                 M.exposure_fairness(none, np.array([0, 0, 1, 1, 0]), 5)["dpr"]]
        assert all(math.isnan(v) for v in means)
        assert M.coverage(none, 5) == 0.0 and UM.regret([], []) == 0.0
        assert UM.intra_list_diversity(none, attrs).shape == (0,) and M.per_user_mean(none, pop).shape == (0,)
        assert UM.drift(np.empty((0, 3)), np.empty((0, 3)))["cosine_distance"].shape == (0,)

    def test_empty_slots_ignored_and_positions_fixed(self):
        slates = np.array([[-1, 0, 1], [2, -1, -1]])
        assert M.coverage(slates, 4) == approx(0.75)
        e = M.exposure_counts(slates, 4, weighting="log")
        assert e.tolist() == pytest.approx([1 / np.log2(3), 1 / np.log2(4), 1.0, 0.0])
        assert M.exposure_counts(slates, 4).tolist() == [1.0, 1.0, 1.0, 0.0]
        with pytest.raises(ValueError):
            M.exposure_counts(slates, 4, weighting="bogus")
        with pytest.raises(ValueError):
            M.coverage(slates, 2)

    def test_short_head_ties_and_zero(self):
        # ties broken by lower item id: [3,3,3,1] total 10 -> need 8 -> items 0,1,2
        assert M.short_head_mask(np.array([3, 3, 3, 1])).tolist() == [True, True, True, False]
        assert M.short_head_mask(np.array([1, 5, 5, 1]), 0.4).tolist() == [False, True, False, False]
        assert not M.short_head_mask(np.zeros(3)).any()

    def test_user_groups(self):
        g = M.user_popularity_groups(np.arange(10.0))
        assert g.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 2, 2]
        assert M.user_popularity_groups(np.ones(5)).tolist() == [1] * 5
        assert M.user_popularity_groups(np.array([np.nan, 0.5])).tolist() == [-1, 1]
        hs = M.head_share(np.array([[0, 2], [0, 1], [2, 3]]), np.array([True, True, False, False]))
        assert hs.tolist() == [0.5, 1.0, 0.0]

    def test_genre_distribution_and_calibration(self):
        pg = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
        q = UM.genre_distribution(np.array([[0, 1, -1], [2, -1, -1], [-1, -1, -1]]), pg)
        assert q[0].tolist() == [0.5, 0.5]
        assert q[1].tolist() == [0.5, 0.5]
        assert np.isnan(q[2]).all()
        c = UM.miscalibration(np.array([[0.5, 0.5]] * 3), q)
        assert c[0] == approx(0.0) and c[1] == approx(0.0) and np.isnan(c[2])
        qw = UM.genre_distribution(np.array([[0, 1]]), pg, position_weights=np.array([3.0, 1.0]))
        assert qw[0].tolist() == pytest.approx([0.75, 0.25])

    def test_ild_short_lists_and_afsr(self):
        attrs = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
        ild = UM.intra_list_diversity(np.array([[0, -1], [0, 2]]), attrs)
        assert np.isnan(ild[0]) and ild[1] == approx(2.0)
        # T-RECS AFSR: per user max-min over attributes and slate, mean over users
        assert UM.afsr(np.array([[0, 1], [0, 2]]), attrs) == approx((1.0 + 2.0) / 2)

    def test_jaccard_empty(self):
        assert UM.jaccard(np.array([], int), np.array([], int)) == 0.0
        assert UM.jaccard(np.array([1, 1, -1]), np.array([1])) == 1.0

    def test_esteban_ray_hist(self):
        z = np.array([-1.0, -1.0, 1.0, 1.0])
        # two bins over [-1, 1]: centres -0.5 and 0.5, masses 0.5 each
        assert UM.esteban_ray(z, bins=2) == approx(0.25)
        assert UM.esteban_ray(z, bins=2, a=0.5, K=2.0) == approx(2 * 2 * 0.5**1.5 * 0.5)
        assert UM.esteban_ray(np.ones(5)) == 0.0
        with pytest.raises(ValueError):
            UM.esteban_ray_from_hist(np.array([1.0]), np.array([0.0]), a=2.0)

    def test_drift_zero_vectors(self):
        d = UM.drift(
            np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]), np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
        )
        assert d["cosine_distance"].tolist() == pytest.approx([0.0, 1.0, 0.0])
        assert d["l2"].tolist() == pytest.approx([0.0, 1.0, 1.0])

    def test_fairness_unexposed_items_count(self):
        out = M.exposure_fairness(np.array([[0]]), np.array([0, 0, 1]), 3)
        assert out["exp_g0"] == approx(0.5)
        assert out["exp_g1"] == 0.0 and out["dpr"] == 0.0
        assert out["share_gap"] == approx(-1 / 3)
        assert M.disparate_treatment(1.0, 0.5, 2.0, 0.5) == approx(2.0)
        assert math.isnan(M.disparate_treatment(1.0, 0.5, 0.0, 0.5))

    def test_utility_no_click(self):
        out = UM.utility_stats(np.array([0.2, np.nan, 0.6, 0.0]), n_users=4, n_clicks=2, n_slots=8)
        assert out["mean_utility"] == approx(0.2)
        assert out["no_click_rate"] == approx(0.5)
        assert UM.regret(np.array([1.0, 1.0]), np.array([0.5, np.nan])) == approx(1.5)

    def test_novelty_zero_popularity(self):
        assert M.novelty(np.array([[0, 1]]), np.array([0, 4]), n_users=4) == approx(1.0)


# --------------------------------------------------------------------- property tests
nonneg = hnp.arrays(np.float64, st.integers(1, 40), elements=st.floats(0, 1e6, allow_nan=False))


@st.composite
def slates_strategy(draw, n_items=None):
    n_items = n_items or draw(st.integers(1, 12))
    n_users = draw(st.integers(1, 8))
    k = draw(st.integers(1, 5))
    arr = draw(hnp.arrays(np.int64, (n_users, k), elements=st.integers(-1, n_items - 1)))
    return arr, n_items


@FAST
@given(st.floats(0.01, 1e6), st.integers(1, 50))
def test_gini_constant_is_zero(c, n):
    assert M.gini(np.full(n, c)) == pytest.approx(0.0, abs=1e-9)


@FAST
@given(nonneg)
def test_gini_range(e):
    n = e.size
    g = M.gini(e)
    assert 0.0 <= g <= (n - 1) / n + 1e-12
    assert 0.0 <= M.gini_normalised(e) <= 1.0


@FAST
@given(slates_strategy())
def test_coverage_range_and_inputs_unmodified(data):
    slates, n_items = data
    before = slates.copy()
    c = M.coverage(slates, n_items)
    assert 0.0 <= c <= 1.0
    e = M.exposure_counts(slates, n_items, weighting="log")
    assert e.shape == (n_items,)
    np.testing.assert_array_equal(slates, before)


@FAST
@given(nonneg)
def test_entropy_bound(e):
    h = M.entropy(e)
    assert -1e-12 <= h <= math.log(e.size) + 1e-9


@FAST
@given(st.lists(st.integers(-1, 20), max_size=15), st.lists(st.integers(-1, 20), max_size=15))
def test_jaccard_symmetric_and_bounded(a, b):
    a, b = np.array(a, dtype=int), np.array(b, dtype=int)
    j = UM.jaccard(a, b)
    assert j == UM.jaccard(b, a)
    assert 0.0 <= j <= 1.0
    sa, sb = {x for x in a.tolist() if x >= 0}, {x for x in b.tolist() if x >= 0}
    expected = len(sa & sb) / len(sa | sb) if sa | sb else 0.0
    assert j == pytest.approx(expected)


@FAST
@given(slates_strategy(), st.data())
def test_mean_pair_jaccard_matches_naive(data, draw):
    slates, _ = data
    n_users = slates.shape[0]
    pairs = np.array(
        draw.draw(
            st.lists(
                st.tuples(st.integers(0, n_users - 1), st.integers(0, n_users - 1)), min_size=1, max_size=10
            )
        )
    )
    before = (slates.copy(), pairs.copy())
    naive = np.mean([UM.jaccard(slates[u], slates[v]) for u, v in pairs])
    assert UM.mean_pair_jaccard_slates(slates, pairs) == pytest.approx(naive)
    np.testing.assert_array_equal(slates, before[0])
    np.testing.assert_array_equal(pairs, before[1])


dists = hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 6)), elements=st.floats(0.0, 10.0))


@FAST
@given(dists, st.data())
def test_miscalibration_nonneg_and_zero_at_equal(raw_p, data):
    raw_q = data.draw(hnp.arrays(np.float64, raw_p.shape, elements=st.floats(0.0, 10.0)))
    p = raw_p + 1e-3
    p /= p.sum(axis=1, keepdims=True)
    q = raw_q + 1e-3
    q /= q.sum(axis=1, keepdims=True)
    p0, q0 = p.copy(), q.copy()
    c = UM.miscalibration(p, q)
    assert np.all(c >= -1e-12)
    np.testing.assert_allclose(UM.miscalibration(p, p), 0.0, atol=1e-12)
    np.testing.assert_array_equal(p, p0)
    np.testing.assert_array_equal(q, q0)


@FAST
# attributes are 0 or at least 1e-6 in size: products of norms around 1e-160 underflow to 0 in the naive
# reference, which is not what the metric's definition is about
@given(slates_strategy(n_items=6), hnp.arrays(np.float64, (6, 3), elements=st.floats(-5, 5).filter(
    lambda x: x == 0 or abs(x) >= 1e-6)))
def test_ild_range_and_matches_naive(data, attrs):
    slates, _ = data
    a0, s0 = attrs.copy(), slates.copy()
    ild = UM.intra_list_diversity(slates, attrs)
    finite = ild[np.isfinite(ild)]
    assert np.all((finite >= 0.0) & (finite <= 2.0))
    norms = np.linalg.norm(attrs, axis=1)
    for u in range(slates.shape[0]):  # naive reference on a tiny case
        items = slates[u][slates[u] >= 0]
        if items.size < 2:
            assert np.isnan(ild[u])
            continue
        dsum, npairs = 0.0, 0
        for i in range(items.size):
            for j in range(i + 1, items.size):
                ni, nj = norms[items[i]], norms[items[j]]
                cos = attrs[items[i]] @ attrs[items[j]] / (ni * nj) if ni > 0 and nj > 0 else 0.0
                dsum += 1.0 - cos
                npairs += 1
        assert ild[u] == pytest.approx(dsum / npairs, abs=1e-7)
    np.testing.assert_array_equal(attrs, a0)
    np.testing.assert_array_equal(slates, s0)


@FAST
@given(slates_strategy(n_items=8), hnp.arrays(np.float64, 8, elements=st.floats(0, 100)))
def test_popularity_metrics_inputs_unmodified(data, pop):
    slates, _ = data
    s0, p0 = slates.copy(), pop.copy()
    head = M.short_head_mask(pop)
    h0 = head.copy()
    M.arp(slates, pop)
    a = M.aplt(slates, head)
    assert math.isnan(a) or 0.0 <= a <= 1.0
    M.aclt(slates, head)
    M.novelty(slates, pop, n_users=10)
    M.gini(pop)
    M.entropy(pop)
    np.testing.assert_array_equal(slates, s0)
    np.testing.assert_array_equal(pop, p0)
    np.testing.assert_array_equal(head, h0)
    if pop.sum() > 0:  # head reaches the ratio, and no shorter prefix does
        order = np.argsort(-pop, kind="stable")
        assert pop[head].sum() >= 0.8 * pop.sum() - 1e-6
        assert head[order[: head.sum()]].all()
        assert pop[order[: head.sum() - 1]].sum() < 0.8 * pop.sum()
