"""The LLM service inside runs: response-cache replay, budgets, accounting across resume, every
malformed-output path with its fallback, and timeouts against a real HTTP server on loopback
(``recloop.llm.openai_stub``)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from llm_helpers import R1, R3, ScriptedBackend, metrics, scenario  # noqa: E402

from recloop.llm.config import LLMConfig
from recloop.llm.service import LLMService
from recloop.llm.types import LLMRequest, LLMResponse
from recloop.sim.checkpoint import roundtrip
from recloop.sim.llm_accounting import sum_accounting
from recloop.sim.runner import run_scenario

# ---------------------------------------------------------------------------------------------
# cache, budget, resume


def test_cache_replay_makes_no_model_calls(tmp_path):
    cache = tmp_path / "shared_cache"
    llm = {"backend": {"type": "surrogate", "h": 0.2}, "cache": True, "cache_dir": str(cache)}
    both = {"type": "pipeline", "retrieval": R1, "candidates": 20, "reranker": R3["reranker"]}
    sc = scenario({"both": both}, llm=llm)
    m1 = run_scenario(sc, tmp_path / "a", progress=False)
    m2 = run_scenario(sc, tmp_path / "b", progress=False)
    assert m1["llm"]["calls"] > 0 and m1["llm"]["cache_hits"] == 0
    assert m2["llm"]["calls"] == 0 and m2["llm"]["cache_hits"] == m1["llm"]["calls"] > 0
    assert m2["llm"]["requests"] == m1["llm"]["requests"]
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert a.sort("step", "metric", "group").equals(b.sort("step", "metric", "group"))


def test_surrogate_cache_is_off_by_default_and_on_for_real_models(tmp_path):
    svc = LLMService(LLMConfig(), run_dir=tmp_path)
    assert svc.cache_dir is None
    svc2 = LLMService(LLMConfig(backend={"type": "test_scripted"}), run_dir=tmp_path)
    assert svc2.cache_dir == str(tmp_path / "llm_cache")


def test_budget_stops_llm_calls_cleanly(tmp_path):
    both = {"type": "pipeline", "retrieval": R1, "candidates": 20, "reranker": R3["reranker"]}
    sc = scenario({"both": both}, llm={"backend": {"type": "surrogate"}, "budget": {"max_calls": 30}})
    out = tmp_path / "run"
    m = run_scenario(sc, out, progress=False)
    acc = m["runs"]["both__seed5"]["llm"]
    assert m["status"] == "complete" and m["runs"]["both__seed5"]["steps_done"] == 4
    assert acc["budget_exhausted"] is True and acc["calls"] == 30
    assert acc["malformed"]["budget"] > 0 and acc["fallbacks"] > 0
    fb = metrics(out).filter(pl.col("metric") == "llm_fallback_rate")
    assert (fb["value"] > 0).any()
    lines = (out / "llm_failures.jsonl").read_text().splitlines()
    assert lines and json.loads(lines[0])["reason"] == "budget"


def test_accounting_survives_resume(tmp_path):
    from recloop.sim.model import FeedbackLoop

    sc = scenario({"r1": R1}, llm={"backend": {"type": "surrogate"}, "budget": {"max_calls": 50}})
    model = FeedbackLoop(sc, "r1", sc.policies["r1"], 5, run_dir=str(tmp_path))
    model.step()
    state = roundtrip(model.state())  # as a checkpoint on disk (npz + JSON skeleton)
    before = model.services["llm"].accounting
    resumed = FeedbackLoop(sc, "r1", sc.policies["r1"], 5, restore=state, run_dir=str(tmp_path))
    assert resumed.services["llm"].accounting == before
    resumed.step()
    model.step()
    assert resumed.services["llm"].accounting["calls"] == model.services["llm"].accounting["calls"] == 50
    assert resumed.services["llm"].accounting["budget_exhausted"]
    assert resumed.last_rows == model.last_rows


def test_sum_accounting():
    a = {
        "calls": 2,
        "cache_hits": 1,
        "budget_exhausted": False,
        "malformed": {"empty": 1},
        "roles": {"ranker": {"calls": 2, "malformed": {"empty": 1}}},
        "backend": "surrogate",
        "model": "m",
    }
    b = {
        "calls": 3,
        "cache_hits": 0,
        "budget_exhausted": True,
        "malformed": {"empty": 2},
        "roles": {"ranker": {"calls": 3, "malformed": {"empty": 2}}},
        "backend": "surrogate",
        "model": "m",
    }
    s = sum_accounting([a, b])
    assert s["calls"] == 5 and s["budget_exhausted"] and s["malformed"]["empty"] == 3
    assert s["roles"]["ranker"]["calls"] == 5 and s["roles"]["ranker"]["malformed"]["empty"] == 3


# ---------------------------------------------------------------------------------------------
# malformed output: every path counted, logged with its prompt, and the run completes


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("empty", "empty"), ("unparsable", "unparsable"), ("too_long", "too_long"), ("raise", "backend_error")],
)
def test_malformed_outputs_are_counted_logged_and_fall_back(tmp_path, mode, reason):
    plain = {"type": "pipeline", "retrieval": R3["retrieval"], "candidates": 20}
    sc = scenario(
        {"r1": R1, "r3": R3, "plain": plain},
        llm={"backend": {"type": "test_scripted", "mode": mode}},
        steps=3,
    )
    out = tmp_path / "run"
    m = run_scenario(sc, out, progress=False)
    assert m["status"] == "complete"
    for key, role in (("r1__seed5", "augmenter"), ("r3__seed5", "ranker")):
        acc = m["runs"][key]["llm"]
        assert acc["malformed"][reason] == acc["failures"] > 0, (key, acc["malformed"])
        assert acc["roles"][role]["fallbacks"] > 0
    # R1 fallback: no augmentation; R3 fallback: the base order (identical to the plain pipeline)
    df = metrics(out)
    share = df.filter(
        (pl.col("metric") == "log_share")
        & (pl.col("group") == "provenance=llm_augmented")
        & (pl.col("policy") == "r1")
    )["value"]
    assert (share == 0).all()
    util = df.filter(pl.col("metric").is_in(["utility", "gini_exposure"]))
    a = util.filter(pl.col("policy") == "plain").sort("step", "metric")["value"].to_numpy()
    b = util.filter(pl.col("policy") == "r3").sort("step", "metric")["value"].to_numpy()
    assert np.array_equal(a, b)
    fb = df.filter((pl.col("metric") == "llm_fallback_rate") & (pl.col("policy") == "r3"))["value"]
    assert (fb == 1.0).all()
    recs = [json.loads(x) for x in (out / "llm_failures.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in recs} == {reason}
    assert all(r["prompt"] and r["role"] in ("augmenter", "ranker") for r in recs)


def test_loglik_failures_fall_back(tmp_path):
    r3 = copy.deepcopy(R3)
    r3["reranker"]["mode"] = "loglik"
    sc = scenario({"r3": r3}, llm={"backend": {"type": "test_scripted"}}, steps=2)
    m = run_scenario(sc, tmp_path / "run", progress=False)
    acc = m["runs"]["r3__seed5"]["llm"]
    assert m["status"] == "complete" and acc["malformed"]["backend_error"] > 0 and acc["fallbacks"] > 0


@pytest.mark.skipif(importlib.util.find_spec("httpx") is None, reason="needs httpx")
def test_timeouts_against_a_real_http_server(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from recloop.llm.openai_stub import OpenAICompatServer

    backend = ScriptedBackend(ScriptedBackend.Params(mode="ok"))
    with OpenAICompatServer(backend) as srv:
        srv.delay_s = 1.0
        r1 = {**R1, "users_per_cycle": 3}
        llm = {
            "backend": {
                "type": "openai",
                "base_url": srv.url,
                "model": "m",
                "max_retries": 0,
                "concurrency": 3,
            },
            "timeout_s": 0.2,
        }
        sc = scenario({"r1": r1}, llm=llm, steps=1)
        m = run_scenario(sc, tmp_path / "run", progress=False)
    acc = m["runs"]["r1__seed5"]["llm"]
    assert m["status"] == "complete"
    assert acc["malformed"]["timeout"] == acc["failures"] == 6 and acc["fallbacks"] == 6


def test_slow_local_answers_count_as_timeouts(tmp_path):
    """For local backends, an answer slower than timeout_s is a timeout too (and stays one on replay)."""

    class Slow(ScriptedBackend):
        def generate(self, requests, params):
            return [LLMResponse(text="1. A", wall_s=5.0) for _ in requests]

    svc = LLMService(
        LLMConfig(backend={"type": "test_scripted"}, timeout_s=1.0), run_dir=tmp_path, backend=Slow()
    )
    req = [LLMRequest("p", "augment")]
    assert svc.generate(req, "augmenter")[0].error == "timeout"
    assert svc.generate(req, "augmenter")[0].error == "timeout"  # replayed from the cache
    assert svc.accounting["malformed"]["timeout"] == 2 and svc.accounting["calls"] == 1




def test_resumed_run_matches_and_replays_from_the_cache(tmp_path):
    from recloop.sim.runner import resume_run

    both = {
        "type": "pipeline",
        "retrieval": {**R1, "unmatched": "phantom"},
        "candidates": 20,
        "reranker": R3["reranker"],
    }
    llm = {"backend": {"type": "surrogate", "h": 0.3}, "cache": True}
    sc = scenario({"both": both}, llm=llm)
    full = tmp_path / "full"
    m_full = run_scenario(sc, full, progress=False)
    # make it look interrupted after the checkpoint at step 2
    cut = tmp_path / "cut"
    import shutil

    shutil.copytree(full, cut)
    (cut / "metrics.parquet").unlink()
    for ck in (cut / "checkpoints" / "both__seed5").glob("step_0000004.*"):
        ck.unlink()
    man = json.loads((cut / "manifest.json").read_text())
    man["status"] = "running"
    man["runs"]["both__seed5"]["status"] = "running"
    man.pop("llm", None)
    (cut / "manifest.json").write_text(json.dumps(man))
    m_cut = resume_run(cut, progress=False)
    assert metrics(full).equals(metrics(cut))
    a, b = m_full["runs"]["both__seed5"]["llm"], m_cut["runs"]["both__seed5"]["llm"]
    assert b["requests"] == a["requests"] and b["malformed"] == a["malformed"]
    assert b["calls"] < a["calls"] and b["cache_hits"] > a["cache_hits"]  # steps 2-3 replayed from the cache
