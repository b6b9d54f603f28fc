"""Interval statistics (checked against scipy) and ``recloop report`` for a run and a sweep directory,
including a headless Chromium rendering of the HTML that must not be blank."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from recloop.analysis import stats
from recloop.analysis.report import write_report
from recloop.cli import main

DATA = [np.array([1.2, 3.4, 2.2, 5.1, 0.3, 2.9]), np.array([10.0, 11.5]), np.arange(12.0) ** 1.5,
        np.random.default_rng(7).normal(3.0, 2.0, 25)]


def _main(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


# ------------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("x", DATA)
def test_t_interval_matches_scipy(x):
    ref = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert stats.t_interval(x) == pytest.approx(ref, rel=1e-12)
    iv = stats.summarize(x)
    assert (iv.t_lo, iv.t_hi) == pytest.approx(ref, rel=1e-12) and iv.n == len(x) and iv.mean == pytest.approx(x.mean())


@pytest.mark.parametrize("x", DATA)
@pytest.mark.parametrize("seed", [0, 11])
def test_bootstrap_matches_scipy_percentile(x, seed):
    ref = sps.bootstrap((x,), np.mean, method="percentile", n_resamples=2000, confidence_level=0.95,
                        rng=np.random.default_rng(seed)).confidence_interval
    assert stats.bootstrap_interval(x, seed=seed) == pytest.approx((ref.low, ref.high), rel=1e-9)


def test_interval_table_is_vectorised_per_group_and_deterministic():
    rows = [("a", s, v) for s, v in enumerate(DATA[0])] + [("b", s, v) for s, v in enumerate(DATA[2])]
    df = pl.DataFrame(rows, schema=["policy", "seed", "value"], orient="row")
    tab = stats.interval_table(df, ["policy"])
    assert tab["policy"].to_list() == ["a", "b"] and tab["n"].to_list() == [6, 12]
    for r, x in zip(tab.iter_rows(named=True), (DATA[0], DATA[2])):
        assert (r["t_lo"], r["t_hi"]) == pytest.approx(stats.t_interval(x), rel=1e-12)
        assert (r["boot_lo"], r["boot_hi"]) == pytest.approx(stats.bootstrap_interval(x), rel=1e-12)
    assert stats.interval_table(df, ["policy"]).equals(tab)  # seeded: the same table every time


def test_one_seed_gives_no_interval_and_constant_data_a_point():
    one = stats.summarize([4.0])
    assert one.n == 1 and one.mean == 4.0 and np.isnan([one.t_lo, one.t_hi, one.boot_lo, one.boot_hi]).all()
    assert one.note == "n = 1: no interval"
    const = stats.summarize([2.5, 2.5, 2.5])
    assert (const.t_lo, const.t_hi, const.boot_lo, const.boot_hi) == (2.5, 2.5, 2.5, 2.5)
    assert const.note == "constant"


def test_paired_differences_known_answer():
    """Baselines far apart across seeds, policy = baseline + (1, 2, 3): the paired interval is that of
    (1, 2, 3) exactly, far narrower than the unpaired ones; a seed without a baseline is dropped."""
    base = [0.0, 100.0, 200.0]
    rows = [("base", s, b) for s, b in enumerate(base)] + [("pol", s, b + d) for s, (b, d) in
                                                         enumerate(zip(base, (1.0, 2.0, 3.0)))]
    rows.append(("pol", 9, 1e6))
    df = pl.DataFrame(rows, schema=["policy", "seed", "value"], orient="row")
    tab = stats.paired_table(df, "base", [])
    assert tab["policy"].to_list() == ["pol"]
    r = tab.row(0, named=True)
    half = sps.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)
    assert r["n"] == 3 and r["mean"] == pytest.approx(2.0)
    assert (r["t_lo"], r["t_hi"]) == pytest.approx((2.0 - half, 2.0 + half))
    assert (r["boot_lo"], r["boot_hi"]) == pytest.approx(stats.bootstrap_interval([1.0, 2.0, 3.0]))
    assert 1.0 <= r["boot_lo"] <= r["boot_hi"] <= 3.0
    unpaired = stats.interval_table(df.filter(pl.col("seed") < 9), ["policy"])
    assert (unpaired["t_hi"] - unpaired["t_lo"]).min() > 50 * (r["t_hi"] - r["t_lo"])


def test_band_is_t_interval_per_step():
    df = pl.DataFrame({"policy": ["a"] * 4, "step": [0, 0, 0, 1], "value": [1.0, 2.0, 4.0, 5.0]})
    b = stats.band(df.lazy(), ["policy", "step"])
    lo, hi = stats.t_interval([1.0, 2.0, 4.0])
    assert b["lo"][0] == pytest.approx(lo) and b["hi"][0] == pytest.approx(hi)
    assert b["lo"][1] is None and b["mean"][1] == 5.0  # one seed: no band


# ------------------------------------------------------------------------------------------ real run
RUN_YAML = """
name: report-tiny
seed: 5
replicates: 3
steps: 10
k: 4
world: {type: chaney, n_users: 60, n_items: 50, dim: 6, n_creators: 4}
users:
  choice: {type: mnl, temperature: 0.02, no_click_utility: 0.05, position_bias: 0.5}
policies:
  pop: {type: popularity}
  ideal: {type: ideal}
retrain: {every: 3}
initial_log: {interactions_per_user: 3}
metrics: {pairs: 30, user_sample: 30, regret_sample: 20}
"""


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    from recloop.sim.runner import run_scenario

    d = tmp_path_factory.mktemp("report_run")
    (d / "s.yaml").write_text(textwrap.dedent(RUN_YAML))
    run_scenario(d / "s.yaml", d / "run", progress=False)
    assert _main(["report", str(d / "run")]) == 0
    return d / "run"


def _final_by_hand(run: Path, metric: str, policy: str) -> float:
    """Mean across seeds of the last cycle's value (10 cycles: the last 10 % is one cycle)."""
    df = pl.read_parquet(run / "metrics.parquet").filter((pl.col("metric") == metric) & (pl.col("group") == "")
                                                         & (pl.col("policy") == policy))
    return df.filter(pl.col("step") == df["step"].max())["value"].mean()


def test_report_of_a_run(real_run):
    html = (real_run / "report.html").read_text()
    md = (real_run / "report.md").read_text()
    for name in ("utility", "gini_exposure", "coverage_cum", "95% t", "95% bootstrap", "Δ vs pop", "Time average"):
        assert name in html and name in md, name
    assert "pop_lift" in md and "Metrics by group" in md  # grouped metrics, compactly
    assert html.count("data:image/png;base64,") == 1  # metrics over time, inline
    assert "band: 95 % t interval" in html
    assert not re.search(r"<script|<link|src=\"http|href=\"http", html)  # self-contained
    row = next(ln for ln in md.splitlines() if ln.startswith("| utility | ideal | 3 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[3]) == pytest.approx(_final_by_hand(real_run, "utility", "ideal"), rel=1e-3)
    assert re.fullmatch(r"\[-?[\d.e-]+, -?[\d.e-]+\]", cells[4]) and re.fullmatch(r"\[-?[\d.e-]+, -?[\d.e-]+\]",
                                                                                  cells[5])


def test_report_baseline_and_metrics_options(real_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    assert _main(["report", str(run), "--baseline", "ideal", "--metrics", "utility,ctr"]) == 0
    md = (run / "report.md").read_text()
    assert "Δ vs ideal" in md and "| utility | pop | 3 |" in md and "| gini_exposure |" not in md
    assert "| utility | ideal | 3 |" in md and "(baseline)" in md


def test_report_of_one_seed_states_no_interval(tmp_path):
    run = tmp_path / "one"
    run.mkdir()
    rows = [("solo", 1, t, m, "", float(t) if m != "undefined" else float("nan")) for t in range(7)
            for m in ("utility", "undefined")]
    pl.DataFrame(rows, schema=["policy", "seed", "step", "metric", "group", "value"], orient="row").write_parquet(
        run / "metrics.parquet")
    (run / "manifest.json").write_text(json.dumps({"scenario": "one", "policies": ["solo"]}))
    write_report(run)
    md = (run / "report.md").read_text()
    assert "| utility | solo | 1 | 6 | — (n = 1: no interval) | — (n = 1: no interval) | (baseline) |" in md
    assert "| utility | solo | 1 | 3 | — (n = 1: no interval)" in md  # time average of 0..6
    assert "| undefined |" not in md  # never finite: not tabulated


# ------------------------------------------------------------------------------------------ fake sweep
FACTORS = {"retrain.every": [1, 5], "users.choice.temperature": [0.02, 0.1]}
SEEDS = [1, 2, 3]


def _fake_sweep(root: Path) -> Path:
    """A sweep directory in the format of `recloop sweep`: utility = 1 + every/10 + temp + seed/100 for
    'base' and exactly 0.25 more for 'treat' (so every paired difference is 0.25 with interval [0.25, 0.25])."""
    cells = []
    for i, (every, temp) in enumerate([(e, t) for e in FACTORS["retrain.every"]
                                       for t in FACTORS["users.choice.temperature"]]):
        cid = f"c{i:02d}"
        rows = []
        for pol, extra in (("base", 0.0), ("treat", 0.25)):
            for seed in SEEDS:
                for step in range(20):
                    v = 1 + every / 10 + temp + seed / 100 + extra + 0.01 * step
                    rows += [(pol, seed, step, "utility", "", v), (pol, seed, step, "ctr", "", 0.1 * v),
                             (pol, seed, step, "pop_lift", "all", v)]
        df = pl.DataFrame(rows, schema=["policy", "seed", "step", "metric", "group", "value"], orient="row")
        df = df.with_columns(pl.lit(every).alias("retrain.every"), pl.lit(temp).alias("users.choice.temperature"))
        (root / "metrics" / cid).mkdir(parents=True)
        df.write_parquet(root / "metrics" / cid / "part-00000.parquet")
        cells.append({"id": cid, "factors": {"retrain.every": every, "users.choice.temperature": temp},
                      "run_dir": f"cells/{cid}"})
    spec = {"study": "fake-study", "baseline": "base", "factors": FACTORS, "seeds": SEEDS,
            "policies": ["base", "treat"], "cells": cells}
    (root / "sweep.json").write_text(json.dumps(spec))
    return root


def test_report_of_a_sweep_has_factor_plots_and_effects(tmp_path):
    root = _fake_sweep(tmp_path / "sweep")
    assert _main(["report", str(root)]) == 0
    md = (root / "report.md").read_text()
    html = (root / "report.html").read_text()
    assert "Effects by factor level" in md and "utility against the factors' levels" in md
    # figures: per plotted metric (utility, ctr) one over time and one against the factors
    assert html.count("data:image/png;base64,") == 4
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in md.split("### Effects by factor level")[1]
            .splitlines() if ln.startswith("| retrain.every") or ln.startswith("| users.choice")]
    assert {(r[0], r[1], r[2], r[3]) for r in rows} >= {("retrain.every", "1", "utility", "treat"),
                                                         ("users.choice.temperature", "0.1", "ctr", "base")}
    treat = {(r[0], r[1]): r for r in rows if r[2] == "utility" and r[3] == "treat"}
    assert treat[("retrain.every", "5")][8] == "0.25 *" and treat[("retrain.every", "5")][9] == "[0.25, 0.25]"
    # final value of base at every=5: mean over temp levels and seeds of the last 2 cycles (18, 19)
    expect = np.mean([1 + 0.5 + t + s / 100 + 0.01 * 18.5 for t in (0.02, 0.1) for s in SEEDS])
    base5 = next(r for r in rows if r[:4] == ["retrain.every", "5", "utility", "base"])
    assert float(base5[5]) == pytest.approx(expect, rel=1e-3)
    # per-cell summary rows name the factor levels
    assert "| utility | 5 | 0.1 | treat | 3 |" in md


def test_sweep_missing_cells_are_noted(tmp_path):
    root = _fake_sweep(tmp_path / "sweep")
    shutil.rmtree(root / "metrics" / "c03")
    write_report(root)
    assert "cells without metrics (not run yet): c03." in (root / "report.md").read_text()


# ------------------------------------------------------------------------------------------ bad input
def test_bad_directories_exit_2(tmp_path, capsys):
    assert _main(["report", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _main(["report", str(tmp_path / "empty")]) == 2
    assert "neither a run directory" in " ".join(capsys.readouterr().err.split())
    (tmp_path / "f.txt").write_text("x")
    assert _main(["report", str(tmp_path / "f.txt")]) == 2
    root = _fake_sweep(tmp_path / "sweep")
    assert _main(["report", str(root), "--baseline", "tret"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "baseline 'tret' is not a policy" in err and "Traceback" not in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{}")
    (bad / "metrics.parquet").write_text("not parquet")
    assert _main(["report", str(bad)]) == 2
    assert "cannot be read" in " ".join(capsys.readouterr().err.split())


# ------------------------------------------------------------------------------------------ chromium
def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (scripts/setup.sh installs Debian's)")
def test_chromium_renders_report_not_blank(real_run, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
           "--window-size=1200,2000", f"--user-data-dir={tmp_path / 'profile'}",
           (real_run / "report.html").resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2000, 1200)
    non_white = (img < 245).any(axis=2).mean()
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    assert non_white > 0.05 and colours > 50, (non_white, colours)
