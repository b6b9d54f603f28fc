"""The reproduction gallery (scenarios/papers/): every study is shipped, valid and found by name; the headline
checks of recloop.analysis.gallery compute what they say on known data; and each study, shrunk (fewer users,
cycles and seeds), runs through the sweep machinery with its headline effects on the paper's side."""

from __future__ import annotations

import importlib.util
from importlib import resources

import numpy as np
import polars as pl
import pytest
import yaml

from recloop.analysis import gallery
from recloop.sim.scenario_yaml import load_raw, shipped_scenario
from recloop.sim.study import load_study, shipped_study
from recloop.sim.sweep import read_sweep_metrics, run_sweep

HAVE_ML = importlib.util.find_spec("recbole") is not None
needs_ml = pytest.mark.skipif(not HAVE_ML, reason="needs `pip install --no-deps recbole==1.2.1` (MovieLens-100K)")
PAPERS = sorted(p.name[:-5] for p in resources.files("recloop.scenarios").joinpath("papers").iterdir()
                if p.name.endswith(".yaml"))


def test_every_gallery_study_is_shipped_checked_and_valid():
    assert PAPERS == sorted(gallery.GALLERY), "each study in scenarios/papers/ has a headline check, and back"
    for name in PAPERS:
        assert shipped_study(name) is not None and shipped_study(f"{name}.yaml") == shipped_study(name)
        study = load_study(name, preflight=False)  # found by name, every cell validated
        assert study.name == name and len(study.seeds) >= 5, name
    assert shipped_study("retrain-frequency") is not None  # the studies folder is still searched
    assert shipped_study("no-such-paper") is None


@needs_ml
def test_gallery_studies_pass_sweep_preflight():
    for name in PAPERS:
        load_study(name)  # as `recloop sweep` checks them before the first cell starts


# ------------------------------------------------------------------------------------------ known data
def _rows(policy: str, seed: int, metric: str, values, group: str = "", cell: str = "base") -> pl.DataFrame:
    n = len(values)
    return pl.DataFrame({"policy": [policy] * n, "seed": [seed] * n, "step": np.arange(n, dtype=np.int64),
                         "metric": [metric] * n, "group": [group] * n, "value": np.asarray(values, float),
                         "cell": [cell] * n})


def test_mansoury_check_is_last_window_minus_first_per_seed():
    frames = []
    for s in range(4):
        frames.append(_rows("mf", s, "arp", [10.0] * 10 + [12.0 + s] * 10))  # rises by 2, 3, 4, 5
        frames.append(_rows("bpr", s, "arp", [10.0] * 10 + [9.0] * 10))  # falls by 1
        frames.append(_rows("popularity", s, "arp", [10.0] * 10 + [10.0 + (-1) ** s] * 10))  # ±1: mean 0
    eff = {e.policy: e for e in gallery.mansoury_2020(pl.concat(frames))}
    assert eff["mf"].mean == pytest.approx(3.5) and eff["mf"].n == 4 and eff["mf"].passed
    sd = np.std([2, 3, 4, 5], ddof=1)
    assert eff["mf"].t_lo == pytest.approx(3.5 - 3.182446305 * sd / 2, rel=1e-6)
    assert eff["bpr"].mean == pytest.approx(-1.0) and not eff["bpr"].passed
    assert eff["popularity"].mean == pytest.approx(0.0) and not eff["popularity"].passed
    # a shorter window compares the first and last 5 cycles
    short = {e.policy: e for e in gallery.mansoury_2020(pl.concat(frames), window=5)}
    assert short["mf"].mean == pytest.approx(3.5)


def test_chaney_and_echotrace_checks():
    frames = []
    for s in range(3):
        frames.append(_rows("mf", s, "homogenization_vs_ideal", [-1.0] * 20 + [0.1 + 0.01 * s] * 10))
        frames.append(_rows("popularity", s, "homogenization_vs_ideal", [0.2] * 20 + [-0.05 + 0.01 * s] * 10))
        frames.append(_rows("mf", s, "utility_vs_ideal", [0.9 + 0.01 * s] * 30))
        frames.append(_rows("popularity", s, "utility_vs_ideal", [1.0 + 0.01 * s] * 30))
    eff = {(e.claim.split(",")[0], e.policy): e for e in gallery.chaney_2018(pl.concat(frames))}
    homog = "homogenization_vs_ideal"
    assert eff[homog, "mf"].mean == pytest.approx(0.11) and eff[homog, "mf"].passed
    assert not eff[homog, "popularity"].passed  # only the last 10 cycles count
    assert eff["utility_vs_ideal", "mf"].passed and not eff["utility_vs_ideal", "popularity"].passed
    frames = []
    for s in range(3):
        frames.append(_rows("no_llm", s, "arp", [100.0 + s] * 4))
        frames.append(_rows("r3_ranker", s, "arp", [101.9 + 1.1 * s] * 4))  # +1.9, +2, +2.1 over no_llm
        frames.append(_rows("all_three", s, "arp", [100.0 + s + (-1) ** s] * 4))
        frames.append(_rows("r1_augmenter", s, "llm_log_share", [0.0, 0.05, 0.1 + s / 100], gallery.AUGMENTER_GROUP))
        frames.append(_rows("all_three", s, "llm_log_share", [0.1, 0.1, 0.1], gallery.AUGMENTER_GROUP))
    eff = {(e.claim.split(",")[0], e.policy): e for e in gallery.echotrace_2026(pl.concat(frames))}
    assert eff["arp", "r3_ranker"].mean == pytest.approx(2.0) and eff["arp", "r3_ranker"].passed
    assert not eff["arp", "all_three"].passed
    share = next(k for k in eff if k[0].startswith("llm_log_share") and k[1] == "r1_augmenter")
    assert eff[share].mean == pytest.approx(0.11) and eff[share].passed
    assert not eff[share[0], "all_three"].passed  # a constant share does not grow
    # a metric a run did not record gives a failing effect, not a pass
    assert not any(e.passed for e in gallery.chaney_2018(pl.concat(frames)))


# ----------------------------------------------------------------------------------- shrunk studies
def _shrunk(tmp_path, name: str, seeds: list[int], steps: int, **settings) -> dict:
    """Run the shipped study ``name`` with fewer seeds and cycles and ``settings`` (dotted keys) added to
    its every cell, through the sweep machinery; returns the effects of its headline check."""
    data = yaml.safe_load(shipped_study(name).read_text())
    data.update(seeds=seeds, steps=steps)
    data["points"] = [{**p, **settings} for p in data.get("points", [{}])]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "sweep"
    sweep = run_sweep(path, out, progress=False)
    assert sweep["status"] == "complete" and sweep["study"] == name
    return read_sweep_metrics(out)


def _assert_all_pass(effects: list[gallery.Effect]) -> None:
    print(gallery.format_effects(effects))  # the figures, with -s
    assert effects and all(e.n >= 3 for e in effects), effects
    failed = [e for e in effects if not e.passed]
    assert not failed, gallery.format_effects(failed)


def _policies(scenario: str, drop: str) -> dict:
    policies = load_raw(shipped_scenario(scenario))["policies"]
    del policies[drop]
    return policies


def test_chaney_2018_shrunk(tmp_path):
    lf = _shrunk(tmp_path, "chaney-2018", [1, 2, 3], 40, **{
        "world.n_users": 300, "world.n_items": 500, "metrics.pairs": 300, "metrics.user_sample": 150,
        "metrics.include": ["utility", "homogenization"], "policies": _policies("chaney-homogenization", "random")})
    _assert_all_pass(gallery.chaney_2018(lf))


@needs_ml
def test_mansoury_2020_shrunk(tmp_path):
    lf = _shrunk(tmp_path, "mansoury-2020", [1, 2, 3], 12, **{
        "metrics.include": ["popularity_bias"],
        "policies": {"mf": {"type": "als", "factors": 32}, "bpr": {"type": "bpr", "factors": 32},
                     "popularity": {"type": "popularity"}, "random": {"type": "random"}}})
    _assert_all_pass(gallery.mansoury_2020(lf, window=5))


@needs_ml
def test_echotrace_2026_shrunk(tmp_path):
    policies = _policies("echotrace-ml100k", "r2_profiler")  # the profiler alone is in no headline
    profiler = policies["all_three"]["retrieval"]["base"]
    profiler.update(users_per_refresh=20, demographic_probe={"every": 5, "samples": 2})
    lf = _shrunk(tmp_path, "echotrace-2026", [0, 1, 2], 3, **{
        "policies": policies, "metrics.include": ["popularity_bias", "llm_feedback"]})
    _assert_all_pass(gallery.echotrace_2026(lf))
