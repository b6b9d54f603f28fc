"""End-to-end runs: the run-store contract, determinism, common random numbers, resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest
import yaml

from recloop.cli import main
from recloop.sim.config import load_scenario
from recloop.sim.model import FeedbackLoop
from recloop.sim.runner import run_scenario


def test_run_store_contract(tiny_yaml, tmp_path):
    out = tmp_path / "run"
    main(["run", str(tiny_yaml), "--out", str(out), "--no-progress"])
    df = pl.read_parquet(out / "metrics.parquet")
    assert df.columns == ["policy", "seed", "step", "metric", "group", "value"]
    assert df.schema == {"policy": pl.Utf8, "seed": pl.Int64, "step": pl.Int64, "metric": pl.Utf8,
                         "group": pl.Utf8, "value": pl.Float64}
    assert set(df["policy"].unique()) == {"pop", "ideal", "mf"}
    assert sorted(df["step"].unique().to_list()) == list(range(12))
    names = df["metric"].unique().to_list()
    assert all(n == n.lower() and " " not in n for n in names)
    for needed in ("gini_exposure", "coverage", "utility", "homogenization", "drift_mean", "miscalibration"):
        assert needed in names
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete" and man["seed"] == 3
    assert len(man["config_hash"]) == 16 and "numpy" in man["versions"]
    for key in ("cycle_s_median", "scoring_s_median", "metrics_s_median", "retrain_s_total", "peak_rss_mb"):
        assert key in man["timings"]
    resolved = yaml.safe_load((out / "scenario.yaml").read_text())
    assert resolved["users"]["choice"]["type"] == "mnl" and resolved["steps"] == 12
    assert list((out / "checkpoints").iterdir())


def test_same_seed_same_metrics_and_other_seed_differs(tiny_yaml, tmp_path):
    a = run_scenario(tiny_yaml, tmp_path / "a", progress=False)
    b = run_scenario(tiny_yaml, tmp_path / "b", progress=False)
    run_scenario(tiny_yaml, tmp_path / "c", progress=False, seed=99)
    assert a["config_hash"] == b["config_hash"]
    da = pl.read_parquet(tmp_path / "a" / "metrics.parquet")
    db = pl.read_parquet(tmp_path / "b" / "metrics.parquet")
    dc = pl.read_parquet(tmp_path / "c" / "metrics.parquet")
    assert da.equals(db)
    assert not da["value"].equals(dc["value"])


def test_chunk_size_and_workers_do_not_change_results(write_yaml, tiny_yaml, tmp_path):
    base = run_scenario(tiny_yaml, tmp_path / "a", progress=False)
    assert base["status"] == "complete"
    chunked = write_yaml("extends: tiny.yaml\nengine: {chunk_rows: 7}\n", "chunked.yaml")
    run_scenario(chunked, tmp_path / "b", progress=False, workers=2)
    da = pl.read_parquet(tmp_path / "a" / "metrics.parquet")
    db = pl.read_parquet(tmp_path / "b" / "metrics.parquet")
    assert da.equals(db)  # bit-identical (canonical tiles), not merely close


def test_policies_share_the_initial_world_and_random_numbers(tiny_yaml):
    sc = load_scenario(tiny_yaml)
    m1 = FeedbackLoop(sc, "pop", sc.policies["pop"], 3)
    m2 = FeedbackLoop(sc, "ideal", sc.policies["ideal"], 3)
    assert np.array_equal(m1.world.users.prefs, m2.world.users.prefs)
    assert np.array_equal(m1.world.items.attrs, m2.world.items.attrs)
    u1, i1 = m1.history.to_coo()
    u2, i2 = m2.history.to_coo()
    assert np.array_equal(u1, u2) and np.array_equal(i1, i2)  # same initial organic log


def test_retrain_on_initial_log_only_control(write_yaml, tiny_yaml, tmp_path):
    p = write_yaml("extends: tiny.yaml\nretrain: {every: 1, data: initial}\npolicies: {pop: {type: popularity}}\n",
                   "ctrl.yaml")
    sc = load_scenario(p)
    m = FeedbackLoop(sc, "pop", sc.policies["pop"], 3)
    n0 = len(m.training_data())
    for _ in range(3):
        m.step()
    assert len(m.training_data()) == n0  # the policy never sees the induced interactions


PY = sys.executable


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(write_yaml, tiny_yaml, tmp_path):
    p = write_yaml("""
        extends: tiny.yaml
        steps: 60
        world: {type: chaney, n_users: 1500, n_items: 800, dim: 16, n_creators: 10}
        policies: {mf: {type: als, factors: 16, iterations: 8}, pop: {type: popularity}}
        output: {checkpoint_every: 5, flush_every: 3}
        """, "long.yaml")
    full = tmp_path / "full"
    run_scenario(p, full, progress=False)
    cut = tmp_path / "cut"
    proc = subprocess.Popen([PY, "-m", "recloop", "run", str(p), "--out", str(cut), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    ck = cut / "checkpoints"
    while time.time() < deadline:
        if ck.exists() and any(ck.glob("mf__seed3/step_*.json")):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "metrics.parquet").exists(), "killed too late: the run had already finished"
    assert json.loads((cut / "manifest.json").read_text())["status"] == "running"
    main(["resume", str(cut), "--no-progress"])
    a = pl.read_parquet(full / "metrics.parquet")
    b = pl.read_parquet(cut / "metrics.parquet")
    assert a.equals(b)
    assert json.loads((cut / "manifest.json").read_text())["status"] == "complete"


def test_cli_list_schema_plot(tiny_yaml, tmp_path, capsys):
    main(["list"])
    out = capsys.readouterr().out
    for name in ("mnl", "cascade", "chaney", "drift", "satiation", "familiarity", "trecs", "popularity", "ideal",
                 "als", "bpr", "item_knn", "pipeline", "gini_exposure", "homogenization"):
        assert name in out
    main(["schema"])
    schema = json.loads(capsys.readouterr().out)
    assert "world" in schema["properties"] and "extends" in schema["properties"]
    run = tmp_path / "run"
    main(["run", str(tiny_yaml), "--out", str(run), "--steps", "4", "--no-progress"])
    png = tmp_path / "p.png"
    main(["plot", str(run), "--out", str(png)])
    assert png.stat().st_size > 10_000
    main(["validate", str(tiny_yaml)])
    assert "ok:" in capsys.readouterr().out


def test_ray_executor_matches_serial(tiny_yaml, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is installed by scripts/setup.sh")
    run_scenario(tiny_yaml, tmp_path / "serial", progress=False, steps=4)
    run_scenario(tiny_yaml, tmp_path / "ray", progress=False, steps=4, executor="ray", workers=2)
    a = pl.read_parquet(tmp_path / "serial" / "metrics.parquet")
    b = pl.read_parquet(tmp_path / "ray" / "metrics.parquet")
    assert a.equals(b)
