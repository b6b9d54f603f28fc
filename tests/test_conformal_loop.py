"""Conformal sets measured inside the loop (metric ``conformal``, policy ``conformal_set``, metric
``conformal_compress``; reference C-SPLIT, C-EXCH, C-ACI, C-FDR, C-COMPRESS)."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from recloop.conformance import check_component
from recloop.sim import conformal as C
from recloop.sim.checkpoint import flatten, roundtrip
from recloop.sim.config import load_scenario, validate_mapping
from recloop.sim.conformal_chunks import block_stats, fit_beta, label_stats, set_sizes, softmax_block
from recloop.sim.model import FeedbackLoop

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


def run(cfg: dict, steps: int, seed: int = 0, policy: str = "p") -> tuple[FeedbackLoop, list[list[tuple]]]:
    sc = validate_mapping({"steps": steps, **cfg})
    m = FeedbackLoop(sc, policy, sc.policy, seed)
    out = []
    for _ in range(steps):
        m.step()
        out.append(list(m.last_rows))
    return m, out


def series(rows: list[list[tuple]], metric: str, group: str) -> np.ndarray:
    return np.array([next((v for m, g, v in r if m == metric and g == group), np.nan) for r in rows])


WORLD = {"type": "gaussian_clusters", "n_users": 1500, "n_items": 200, "dim": 8, "n_clusters": 6, "n_creators": 0}
STATIONARY = {"choice": {"type": "mnl", "temperature": 0.05, "no_click_utility": None}, "repeat_consumption": True}


# ------------------------------------------------------------------------------------- the fast kernels
def test_set_sizes_and_label_scores_equal_the_reference_sets():
    """The histogram kernels give the sets of recloop.sim.conformal (sets_lac, sets_aps, scores_aps) exactly,
    ties and impossible items (−inf scores) included."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, m = 40, int(rng.integers(2, 300))
        S = (rng.standard_normal((n, m)) * rng.uniform(0.1, 5)).astype(np.float32)
        if trial % 3 == 0:
            S = np.round(S, 1)  # ties
        S[rng.random((n, m)) < 0.1] = -np.inf
        S[:, 0] = np.where(np.isfinite(S[:, 0]), S[:, 0], 0.0)
        y = rng.integers(0, m, size=n)
        y = np.where(np.isfinite(S[np.arange(n), y]), y, 0)
        E, Z = softmax_block(S.copy(), 1.3)
        P = E / Z[:, None]
        p_y, above = label_stats(E, Z, y)
        assert np.allclose(p_y, P[np.arange(n), y]) and np.allclose(C.scores_aps(P, y), above + p_y)
        u = rng.random(n)
        qs, modes = [0.5, 0.9, 0.99, 0.2, np.inf, -np.inf], [0, 1, 2, 2, 1, 0]
        sizes = set_sizes(E, Z, qs, modes, u)
        for k, (q, mode) in enumerate(zip(qs, modes)):
            mask = C.sets_lac(P, q) if mode == 0 else C.sets_aps(P, q, u if mode == 2 else None)
            mask &= (P > 0) if np.isfinite(q) else np.isfinite(S)
            assert np.array_equal(mask.sum(axis=1), sizes[:, k]), (trial, q, mode)
        S2 = S.copy()
        p2, a2, sz2, z2 = block_stats(S2, 1.3, y, np.array(qs)[None, :].repeat(n, 0), modes, u)
        assert np.allclose(p2, p_y) and np.allclose(a2, above) and np.array_equal(sz2, sizes)


def test_temperature_fit_recovers_the_generating_temperature():
    rng = np.random.default_rng(1)
    S = rng.standard_normal((3000, 50)).astype(np.float32)
    P = np.exp(2.5 * S)
    P /= P.sum(axis=1, keepdims=True)
    y = (P.cumsum(axis=1) < rng.random((3000, 1))).sum(axis=1)

    def blocks():
        for lo in range(0, 3000, 700):
            yield lo, min(lo + 700, 3000), S[lo:lo + 700].copy()

    assert abs(fit_beta(blocks, y, 0.3, max_iter=30) - 2.5) < 0.15


# --------------------------------------------------------------------------------------------- control
def test_control_coverage_lies_in_the_split_conformal_band():
    """C-EXCH control (no drift, frozen scorer, random slates, repeats): mean coverage over cycles within
    three standard errors of [1 − α, 1 − α + 1/(n + 1)] for every split method."""
    n, m, T, alpha = 300, 300, 8, 0.1
    metric = {"type": "conformal", "scorer": {"type": "als", "factors": 8}, "methods": ["lac", "aps", "aps_rand"],
              "alphas": [alpha], "calibration": ["recal"], "calibration_users": n, "test_users": m,
              "temperature_users": 300, "strata": []}
    _, rows = run({"world": WORLD, "users": STATIONARY, "policy": {"type": "random"}, "k": 10,
                   "retrain": {"every": 1000}, "metrics": {"include": [metric]}}, T)
    se = math.sqrt(alpha * (1 - alpha) * (1 / (n + 2) + 1 / m) / T)  # per cycle: calibration + test sampling
    for method in ("lac", "aps", "aps_rand"):
        cov = series(rows, "conformal_coverage", f"method={method},calib=recal,alpha={alpha:g}")
        assert len(cov) == T and np.isfinite(cov).all()
        lo, hi = 1 - alpha, 1 - alpha + 1 / (n + 1)
        assert lo - 3 * se <= cov.mean() <= hi + 3 * se, (method, cov.mean(), se)


DRIFT = {"world": WORLD, "k": 10, "policy": {"type": "random"}, "retrain": {"every": 1000},
         "users": {**STATIONARY, "dynamics": [{"type": "drift", "rate": 0.5}]}}


def test_frozen_calibration_falls_under_drift_while_recal_and_aci_hold():
    alpha, n, T = 0.1, 400, 30
    metric = {"type": "conformal", "scorer": {"type": "als", "factors": 8}, "methods": ["lac"], "alphas": [alpha],
              "calibration": ["frozen", "recal", "aci"], "calibration_users": n, "test_users": n,
              "temperature_users": 300, "strata": []}
    _, rows = run({**DRIFT, "metrics": {"include": [metric]}}, T)
    late = slice(T // 2, T)
    frozen = series(rows, "conformal_coverage", "method=lac,calib=frozen,alpha=0.1")[late].mean()
    recal = series(rows, "conformal_coverage", "method=lac,calib=recal,alpha=0.1")[late].mean()
    aci = series(rows, "conformal_coverage", "method=lac,calib=aci,alpha=0.1")[late].mean()
    se_frozen = math.sqrt(alpha * (1 - alpha) * (1 / (n + 2) + 1 / (n * (T // 2))))  # one q̂ for every cycle
    assert frozen < 1 - alpha - 3 * se_frozen, frozen
    assert abs(recal - (1 - alpha)) < 0.03 and abs(aci - (1 - alpha)) < 0.03, (recal, aci)


@pytest.mark.parametrize("calib,decay", [("aci", False), ("aci_decay", True)])
def test_aci_long_run_error_within_the_deterministic_bound(calib, decay):
    """C-ACI (Gibbs & Candès 2021): the α_t recorded follow α_{t+1} = α_t + γ_t(α − err_t) with err_t the
    uncovered fraction, and |(1/T)Σ err_t − α| stays within the deterministic bound at every T."""
    alpha, gamma, T = 0.1, 0.5, 25
    metric = {"type": "conformal", "scorer": {"type": "als", "factors": 8}, "methods": ["lac"], "alphas": [alpha],
              "calibration": [calib], "gamma": gamma, "calibration_users": 100, "test_users": 100,
              "temperature_users": 100, "strata": []}
    _, rows = run({**DRIFT, "metrics": {"include": [metric]}}, T, seed=2)
    g = f"method=lac,calib={calib},alpha=0.1"
    level, cov = series(rows, "conformal_alpha_t", g), series(rows, "conformal_coverage", g)
    err_run = series(rows, "conformal_err_running", g)
    st = C.ACIState(alpha, gamma, decay)
    for t in range(T):
        assert level[t] == pytest.approx(st.alpha_t)
        st.step(1.0 - cov[t])
        assert err_run[t] == pytest.approx(st.err_running)
        assert abs(err_run[t] - alpha) <= C.aci_bound(t + 1, alpha, gamma, decay) + 1e-12
        assert -gamma - 1e-12 <= st.alpha_t <= 1 + gamma + 1e-12
    assert np.ptp(level) > 0.05  # the level moved: the bound is not met trivially


# ----------------------------------------------------------------------------------- rows and resume
def test_strata_rows_and_group_format():
    metric = {"type": "conformal", "methods": ["lac", "aps"], "alphas": [0.1, 0.2],
              "calibration": ["recal", "weighted"], "calibration_users": 200, "test_users": 200,
              "temperature_users": 100, "group_conditional": True}
    _, rows = run({"world": WORLD, "users": STATIONARY, "policy": {"type": "als", "factors": 8}, "k": 10,
                   "metrics": {"include": [metric]}}, 2)
    groups = {g for m, g, _ in rows[-1]}
    base = "method=aps,calib=weighted,alpha=0.2"
    assert {base, "method=lac,calib=recal_mondrian,alpha=0.1"} <= groups
    strata = {g.split("stratum=")[1] for g in groups if g.startswith(base + ",stratum=")}
    assert {"pop:head", "pop:mid", "pop:tail"} <= strata
    assert any(s.startswith("size:") for s in strata)
    assert {s for s in strata if s.startswith("user:")} <= {"user:niche", "user:diverse", "user:blockbuster",
                                                              "user:new"} and any(s.startswith("user:") for s in strata)
    names = {m for m, _, _ in rows[-1]}
    assert {"conformal_coverage", "conformal_gap", "conformal_set_size_mean", "conformal_set_size_median",
            "conformal_qhat"} <= names


def test_resume_equals_an_uninterrupted_run():
    """Metric state (frozen q̂, weighted history, ACI levels, FDR λ̂, the frozen scorer, β) and the set policy's
    state survive the checkpoint format: resuming after cycle 3 gives the same rows as never stopping."""
    metric = {"type": "conformal", "scorer": {"type": "als", "factors": 6}, "methods": ["lac", "aps_rand"],
              "calibration": ["frozen", "weighted", "aci", "aci_decay"], "calibration_users": 80, "test_users": 80,
              "temperature_users": 60, "group_conditional": True, "fdr": {"users": 30, "grid": 8, "diverse": True}}
    cfg = {"world": {**WORLD, "n_users": 400}, "k": 8, "retrain": {"every": 2},
           "users": {"choice": {"type": "mnl", "temperature": 0.05, "no_click_utility": 0.1}, "organic_rate": 0.2,
                     "dynamics": [{"type": "drift", "rate": 0.2}]},
           "policy": {"type": "conformal_set", "base": {"type": "als", "factors": 6}, "calibration_users": 100,
                      "temperature_users": 60, "window": 2},
           "metrics": {"include": [metric, "exposure"]}}
    full, rows = run(cfg, 6)
    sc = validate_mapping({"steps": 6, **cfg})
    part = FeedbackLoop(sc, "p", sc.policy, 0)
    for _ in range(3):
        part.step()
    resumed = FeedbackLoop(sc, "p", sc.policy, 0, restore=roundtrip(part.state()))
    assert _same_state(part, resumed)  # everything restored, before any further cycle
    for t in range(3, 6):
        resumed.step()
        assert resumed.last_rows == rows[t], t
    assert any(m == "conformal_fdr" for m, _, _ in rows[-1])
    assert _same_state(full, resumed)


def _same_state(a: FeedbackLoop, b: FeedbackLoop) -> bool:
    """The metrics' and the policy's states are equal (skeleton and every array)."""
    (sk_a, ar_a), (sk_b, ar_b) = (flatten({"metrics": x.metrics.state_dict(), "policy": x.policy.state_dict()})
                                  for x in (a, b))
    return sk_a == sk_b and all(ar_a[k].dtype == ar_b[k].dtype and ar_a[k].tobytes() == ar_b[k].tobytes() for k in ar_a)


# ---------------------------------------------------------------------------------------- memory bound
def test_no_users_by_items_matrix():
    """Many items, small engine chunks: the metric's peak allocation stays far below one sample × items
    float32 matrix (let alone users × items)."""
    n_items = 20_000
    metric = {"type": "conformal", "scorer": {"type": "als", "factors": 4, "iterations": 2},
              "methods": ["lac", "aps", "aps_rand"], "calibration_users": 1000, "test_users": 1000,
              "temperature_users": 300, "strata": ["set_size"]}
    sc = validate_mapping({"world": {"type": "gaussian_clusters", "n_users": 2400, "n_items": n_items, "dim": 4,
                                     "n_creators": 0}, "steps": 1, "k": 5, "users": STATIONARY,
                           "policy": {"type": "random"}, "engine": {"chunk_rows": 64},
                           "initial_log": {"interactions_per_user": 1, "slate_size": 5},
                           "metrics": {"include": [metric]}})
    m = FeedbackLoop(sc, "random", sc.policy, 0)
    m.step()  # the scorer fit and the temperature fit happen in the first cycle: measure the second
    metric = m.metrics.components[0]
    compute, peak = metric.compute, []

    def traced(rec):
        tracemalloc.start()
        try:
            return compute(rec)
        finally:
            peak.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    metric.compute = traced
    m.step()
    assert any(r[0] == "conformal_coverage" for r in m.last_rows)
    block = m.engine.rows_per_chunk(n_items) * n_items * 4  # one engine chunk of float32 scores
    assert peak[0] < 4 * block and peak[0] < 1000 * n_items * 4 / 2, (peak[0] / 2**20, block / 2**20)


# ------------------------------------------------------------------------------------ the set policy
def test_set_policy_shows_variable_size_prefixes_and_the_loop_runs_on_them():
    cfg = {"world": {"type": "chaney", "n_users": 600, "n_items": 300, "dim": 8, "n_creators": 0}, "k": 15,
           "users": {"choice": {"type": "mnl", "temperature": 0.02, "no_click_utility": 0.0}, "organic_rate": 0.3},
           "policy": {"type": "conformal_set", "base": {"type": "als", "factors": 8}, "alpha": 0.2,
                      "calibration_users": 200, "temperature_users": 100},
           "metrics": {"include": ["exposure", "utility"]}}
    m, rows = run(cfg, 6)
    pol = m.policy
    assert math.isfinite(pol.qhat) and pol.qhat < 1.0  # calibrated from the loop's own feedback
    users = np.arange(200)
    slates, _ = pol.recommend(users, 15, m.platform.view, exclude=m.history, step=m.t)
    size = (slates >= 0).sum(axis=1)
    assert (size >= 1).all() and (size <= 15).all() and size.min() < 15
    assert all((row[:s] >= 0).all() and (row[s:] == -1).all() for row, s in zip(slates, size))  # prefixes
    assert all(np.isfinite(v) for r in rows for mm, _, v in r if mm == "utility")


@pytest.mark.parametrize("kind,name", [("metric", "conformal"), ("metric", "conformal_compress"),
                                       ("policy", "conformal_set")])
def test_conformance(kind, name):
    assert "seeded determinism" in check_component(kind, name)


# ----------------------------------------------------------------------------------------- scenarios
@pytest.mark.parametrize("name", ["conformal-control", "conformal-validity", "conformal-compress"])
def test_scenarios_validate(name):
    sc = load_scenario(SCENARIOS / f"{name}.yaml")
    assert sc.name == name


def test_compress_trials_are_paired_and_grouped():
    sc = load_scenario(SCENARIOS / "conformal-compress.yaml",
                       overrides={"metrics.include": [{"type": "conformal_compress", "tasks": ["grid", "session"],
                                                       "phis": [0.6], "methods": ["lp", "forward_greedy"]}]})
    m = FeedbackLoop(sc, "random", sc.policy, 0)
    m.step()
    rows = {(a, b): v for a, b, v in m.last_rows}
    for task in ("grid", "session"):
        for method in ("lp", "forward_greedy"):
            g = f"method={method},phi=0.6,task={task}"
            assert rows[("conformal_compress_size", g)] > 0 and 0 <= rows[("conformal_compress_coverage", g)] <= 1


def test_rows_do_not_depend_on_chunk_size_or_threads():
    metric = {"type": "conformal", "methods": ["lac", "aps", "aps_rand"], "calibration": ["recal", "weighted"],
              "calibration_users": 300, "test_users": 300, "temperature_users": 200}
    cfg = {"world": WORLD, "k": 8, "users": {**STATIONARY, "repeat_consumption": False},
           "policy": {"type": "conformal_set", "base": {"type": "als", "factors": 8}, "calibration_users": 200,
                      "temperature_users": 100},
           "metrics": {"include": [metric]}}
    runs = [run({**cfg, "engine": eng}, 3)[1] for eng in ({"chunk_rows": 128, "threads": 1},
                                                         {"chunk_rows": 1024, "threads": 2})]
    assert runs[0] == runs[1]
