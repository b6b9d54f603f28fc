"""Resume identity of runs with LLM roles (issue 7): a run interrupted after a checkpoint and resumed ends
with the same ``metrics.parquet``, bit for bit, as the uninterrupted run.

The shipped LLM scenarios run reduced (surrogate backend, response cache off as shipped, so every answer
after the resume is generated again): ``llm-roles`` (R1 augmenter with phantom items, R2 profiler, R3
re-ranker, all three) cut after each checkpoint, and ``echotrace-ml100k`` (MovieLens replay, R1 + R2 with
the demographic probe + R3). An interruption is simulated as in ``test_checkpoints.py``: the final
metrics and the later checkpoints are deleted and the manifest is marked running.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from recloop.llm.surrogate import SurrogateLLM, SurrogateParams
from recloop.llm.types import GenerationParams, LLMRequest
from recloop.sim.checkpoint import roundtrip
from recloop.sim.config import load_scenario, shipped_scenario
from recloop.sim.runner import resume_run, run_scenario

CKPT = {"output.checkpoint_every": 2, "output.flush_every": 2, "output.keep_checkpoints": 5}


def _interrupted(full: Path, dest: Path, after: int) -> Path:
    """A copy of the finished run ``full`` that looks killed right after its checkpoints of cycle ``after``."""
    shutil.copytree(full, dest)
    (dest / "metrics.parquet").unlink()
    man = json.loads((dest / "manifest.json").read_text())
    man["status"] = "running"
    man.pop("llm", None)
    for key, run in man["runs"].items():
        run["status"] = "running"
        for p in (dest / "checkpoints" / key).iterdir():
            if int(p.stem.split("_")[1]) > after:
                p.unlink()
    (dest / "manifest.json").write_text(json.dumps(man))
    return dest


def _assert_resume_identical(full: Path, tmp_path: Path, after: int) -> None:
    cut = _interrupted(full, tmp_path / f"cut{after}", after)
    resume_run(cut, progress=False)
    a = pl.read_parquet(full / "metrics.parquet")
    b = pl.read_parquet(cut / "metrics.parquet")
    if not a.equals(b):
        keys = [c for c in a.columns if c != "value"]
        j = a.join(b, on=keys, how="full", suffix="_resumed", nulls_equal=True)
        bad = j.filter(~pl.col("value").eq_missing(pl.col("value_resumed")))
        pytest.fail(f"resumed after cycle {after}: {bad.height} metric rows differ, first:\n{bad.sort('step').head(8)}")
    assert json.loads((cut / "manifest.json").read_text())["status"] == "complete"


@pytest.fixture(scope="module")
def llm_roles_full(tmp_path_factory) -> Path:
    """llm-roles, reduced: 300 users, 250 items, 6 cycles, checkpoints after cycles 2, 4, 6."""
    d = tmp_path_factory.mktemp("llm_roles")
    sc = load_scenario(shipped_scenario("llm-roles"), overrides={
        "steps": 6, "world.n_users": 300, "world.n_items": 250,
        "metrics": {"pairs": 100, "user_sample": 150, "regret_sample": 50}, **CKPT})
    run_scenario(sc, d / "full", progress=False)
    return d / "full"


@pytest.mark.parametrize("after", [2, 4])
def test_llm_roles_resume_is_bit_identical(llm_roles_full, tmp_path, after):
    """Every LLM role (phantom items included) resumes to the uninterrupted run's metrics."""
    _assert_resume_identical(llm_roles_full, tmp_path, after)


def test_echotrace_resume_is_bit_identical(tmp_path):
    """EchoTrace on MovieLens (replay choice, R1 with phantoms, R2 with demographics and the probe, R3)."""
    probe = {"every": 3, "samples": 4}
    prof = {"type": "llm_profiler", "base": {"type": "als", "factors": 16}, "refresh_every": 2,
            "users_per_refresh": 100, "use_demographics": True, "demographic_probe": probe}
    all_three = {
        "type": "pipeline",
        "retrieval": {"type": "llm_augmented", "base": prof, "users_per_cycle": 60, "n": 10, "candidates": 40,
                      "unmatched": "phantom"},
        "candidates": 60,
        "reranker": {"type": "llm_rank", "mode": "generate", "max_candidates": 20, "shuffles": 2,
                     "users_per_cycle": 100},
    }
    sc = load_scenario(shipped_scenario("echotrace-ml100k"), overrides={
        "steps": 4, "policies": {"all_three": all_three},
        "metrics": {"pairs": 100, "user_sample": 150, "regret_sample": 50}, **CKPT})
    run_scenario(sc, tmp_path / "full", progress=False)
    _assert_resume_identical(tmp_path / "full", tmp_path, 2)


# ------------------------------------------------------------------------------------ the surrogate's state
TITLES = [f"{a} {b} of {c}" for a in ("The Red", "A Quiet", "Lost", "Silver") for b in ("Garden", "Harbor", "Night")
          for c in ("Dreams", "Echoes", "Stone", "Glass", "Winter")]
GP = GenerationParams()


def _answers(s: SurrogateLLM) -> list[str]:
    cands = list(range(0, len(TITLES), 3))
    reqs = [LLMRequest("p", "augment", {"candidates": cands, "n": 8, "seed": i}) for i in range(40)]
    return [r.text for r in s.generate(reqs, GP)]


def test_surrogate_catalog_and_pools_survive_a_checkpoint():
    """The surrogate keeps the catalog it was built with when bound to a grown (resumed) world, and its
    fabricated-title pools, which depend on how a bound catalog grew, round-trip through a checkpoint."""
    params = SurrogateParams(h=0.9, eps_near=0.2, seed=4)
    grown = TITLES + ["Phantom Harbor Glass", "Quiet Winter Stone Echo"]
    s = SurrogateLLM(params, titles=TITLES, pool_size=32)
    before = _answers(s)
    s.bind_catalog(grown)  # a resumed world: same first titles, later phantom items
    assert s.titles == TITLES and _answers(s) == before
    s2 = SurrogateLLM(params, titles=TITLES, pool_size=32)
    s2.load_state_dict(roundtrip(s.state_dict()))
    assert _answers(s2) == before
    with pytest.raises(ValueError, match="catalog differs"):
        SurrogateLLM(params, titles=grown, pool_size=32).load_state_dict(roundtrip(s.state_dict()))
    # a bound catalog that grows in place: the pool is filtered and topped up, so it depends on the sizes
    # it was used at; the checkpoint keeps it (a fresh build over the grown catalog differs)
    live = list(TITLES)
    s.titles = live
    _answers(s)
    live.extend(s.pool_for(live).fabricated[:28])  # most of the pool becomes catalog titles: topped up
    after = _answers(s)
    st = roundtrip(s.state_dict())
    fresh = SurrogateLLM(params, titles=list(live), pool_size=32)
    assert _answers(fresh) != after
    fresh.load_state_dict(st)
    assert _answers(fresh) == after
