"""Golden files: every shipped scenario at a reduced size, its ``metrics.parquet`` kept in
``tests/golden/`` with the fingerprint of the machine that made it (CPU, BLAS and its kernel).

On a machine with the same fingerprint the comparison is bitwise; elsewhere (another CPU, another
BLAS kernel) float-level differences are allowed and the check uses a tolerance. Restructurings must
leave these files unchanged; a change that alters results regenerates them in one commit that lists
each scenario and why:

    OPENBLAS_CORETYPE=Haswell RECLOOP_REGEN_GOLDEN=1 python3 -m pytest tests/test_golden.py

(``OPENBLAS_CORETYPE=Haswell`` is the environment of this project's machines and CI.) The real-model
scenarios (``*-real``) are left out: they need minutes of a local LLM per cycle.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

GOLDEN = Path(__file__).parent / "golden"
FINGERPRINT = GOLDEN / "FINGERPRINT.json"
REGEN = os.environ.get("RECLOOP_REGEN_GOLDEN") == "1"

SMALL_WORLD = {"n_users": 3000, "n_items": 1500}
#: shipped scenario → overrides (dotted keys) that shrink it; every case runs 3 steps
CASES: dict[str, dict] = {
    "quickstart": {},
    "chaney-homogenization": {},
    "popularity-amplification": {},
    "mf-10k": {},
    "bench-S": {},
    "bench-M": {},
    "bench-L": {"world": {"type": "gaussian_clusters", "dim": 32, "n_clusters": 16, "n_creators": 0,
                          **SMALL_WORLD}},
    "bench-XL": {"world": {"type": "gaussian_clusters", "dim": 64, "n_clusters": 16, "n_creators": 0,
                           **SMALL_WORLD}},
    "llm-roles": {},
    "echotrace-ml100k": {},
    "echotrace-ml100k-behavioural": {},
    "familiarity": {},
    "bandits": {},
    "bandits-timevar": {},
    "conformal-control": {},
    "conformal-validity": {},
    "conformal-compress": {},
    "sequential": {"policies": {  # short cold fits: the full ones take minutes
        "popularity": {"type": "popularity"}, "als": {"type": "als", "factors": 16},
        "bpr": {"type": "bpr", "factors": 16, "iterations": 10},
        "sasrec": {"type": "sasrec", "initial_epochs": 2, "epochs": 1, "dim": 16, "max_len": 20},
        "cosrec": {"type": "cosrec", "initial_epochs": 2, "epochs": 1, "dim": 16, "max_len": 20}}},
}
LEFT_OUT = {"llm-roles-real", "echotrace-ml100k-real"}


def machine_fingerprint() -> dict[str, str]:
    """What decides float rounding here: the CPU model, the BLAS library, its version and kernel."""
    from threadpoolctl import threadpool_info

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas" and "numpy" in i.get("filepath", "")]
    b = blas[0] if blas else {}
    return {"machine": platform.machine(), "cpu": cpu, "blas": str(b.get("internal_api")),
            "blas_version": str(b.get("version")), "blas_kernel": str(b.get("architecture")),
            "numpy": np.__version__}


def _run(name: str, tmp_path: Path) -> pl.DataFrame:
    from recloop.sim.config import load_scenario, shipped_scenario
    from recloop.sim.runner import run_scenario

    sc = load_scenario(shipped_scenario(name), overrides={"steps": 3, **CASES[name]})
    run_scenario(sc, tmp_path / name, progress=False)
    return pl.read_parquet(tmp_path / name / "metrics.parquet")


def test_every_shipped_scenario_has_a_golden_case():
    from importlib import resources

    shipped = {p.name[:-5] for p in resources.files("recloop.scenarios").iterdir() if p.name.endswith(".yaml")}
    assert shipped == set(CASES) | LEFT_OUT


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str, tmp_path: Path):
    got = _run(name, tmp_path)
    path = GOLDEN / f"{name}.parquet"
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        got.write_parquet(path)
        FINGERPRINT.write_text(json.dumps(machine_fingerprint(), indent=2, sort_keys=True) + "\n")
        return
    assert path.exists(), f"no golden file for {name}: regenerate (see this module's docstring)"
    want = pl.read_parquet(path)
    if json.loads(FINGERPRINT.read_text()) == machine_fingerprint():
        assert got.equals(want), f"{name}: results changed on the machine that made the golden files"
    else:  # another CPU or BLAS kernel
        assert_close_elsewhere(got, want, name)


#: metrics computed from a few draws, with their relative cross-machine tolerance
SMALL_SAMPLE = {"llm_demo_jsd": 0.25, "llm_demo_jsd_genre": 0.25}


def assert_close_elsewhere(got: pl.DataFrame, want: pl.DataFrame, name: str) -> None:
    """The tolerance for another machine: the same rows exactly, and every metric's mean absolute
    difference within 5 % of its typical size (+ 1e-3). A float-level difference can flip one user's
    slate and so move a few values far (seen: 1-9 % of values by up to 80 %, on OpenBLAS's SkylakeX vs
    Haswell kernels), while the metrics stay close on average. Statistics of a handful of draws get a
    wider band (:data:`SMALL_SAMPLE`): one flipped answer of the LLM demographic probe (8 samples per
    group) moves its JSD by a sizeable share."""
    keys = ["policy", "seed", "step", "metric", "group"]
    assert_frame_equal(got.select(keys), want.select(keys))
    both = got.with_columns(want["value"].alias("want")).with_columns(
        pl.col("value").fill_nan(None).alias("v"), pl.col("want").fill_nan(None).alias("w"))
    per_metric = both.group_by("metric").agg(
        (pl.col("v") - pl.col("w")).abs().mean().fill_null(0.0).alias("mad"),
        pl.col("w").abs().mean().fill_null(0.0).alias("scale"),
        (pl.col("value").is_nan() == pl.col("want").is_nan()).all().alias("same_nans"),
    )
    rel = pl.col("metric").replace_strict(SMALL_SAMPLE, default=0.05, return_dtype=pl.Float64)
    bad = per_metric.filter((pl.col("mad") > rel * pl.col("scale") + 1e-3) | ~pl.col("same_nans"))
    assert bad.height == 0, f"{name}: metrics differ beyond float-level divergence:\n{bad}"


def test_the_tolerance_for_other_machines_still_catches_real_changes():
    want = pl.read_parquet(GOLDEN / "quickstart.parquet")
    assert_close_elsewhere(want, want, "same")
    jitter = want.with_columns(pl.col("value") * (1 + 1e-6))  # float-level: accepted
    assert_close_elsewhere(jitter, want, "jitter")
    changed = want.with_columns(
        pl.when(pl.col("metric") == "utility").then(pl.col("value") * 1.2).otherwise(pl.col("value")).alias("value"))
    with pytest.raises(AssertionError, match="utility"):
        assert_close_elsewhere(changed, want, "changed")
    with pytest.raises(AssertionError):
        assert_close_elsewhere(want.head(want.height - 1), want.tail(want.height - 1), "rows")
