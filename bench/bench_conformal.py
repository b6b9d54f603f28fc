"""Issue 11's targets for conformal sets measured in the loop (benchmarks, not timed tests).

    python bench/bench_conformal.py                  # both parts (a few minutes on 2 cores)
    python bench/bench_conformal.py --only cost      # one part: cost | control

* cost (`scenarios/bench-L.yaml`, 100,000 users × 10,000 items): the ``conformal`` metric with 2,000
  calibration and 2,000 test users per cycle, LAC and APS at one α (recalibrated every cycle, the
  temperature of the serving content policy refitted every cycle on 300 further users, set-size strata),
  timed inside the run (its component's ``compute``) against the cycle without it. Target ≤ 15 %.
* control (`scenarios/conformal-control.yaml`): for 5 seeds × α ∈ {0.05, 0.1, 0.2} × the split methods
  (LAC, APS, randomised APS), each seed's mean coverage over its cycles must lie within three standard
  errors of [1 − α, 1 − α + 1/(n + 1)]; the standard error counts the calibration and the test samples
  (recal: a fresh q̂ each cycle, var α(1 − α)(1/(n + 2) + 1/m)/T; frozen: one q̂ for all cycles,
  var α(1 − α)(1/(n + 2) + 1/(mT))).

Results are printed and written to ``bench/results/conformal.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from recloop.sim.config import load_scenario, shipped_scenario
from recloop.sim.model import FeedbackLoop
from recloop.sim.runner import run_scenario

OUT = Path(__file__).resolve().parent / "results"
SEEDS = [0, 1, 2, 3, 4]
ALPHAS = [0.05, 0.1, 0.2]
METHODS = ["lac", "aps", "aps_rand"]


# ------------------------------------------------------------------------------------------------- cost
def cost(cycles: int = 6, warmup: int = 2) -> dict:
    """Seconds per cycle at L of the conformal metric against the rest of the cycle, in one run."""
    metric = {"type": "conformal", "methods": ["lac", "aps"], "alphas": [0.1], "calibration": ["recal"],
              "calibration_users": 2000, "test_users": 2000, "temperature_users": 300, "strata": ["set_size"]}
    sc = load_scenario(shipped_scenario("bench-L"))
    include = [*sc.metrics.include, metric]
    sc = load_scenario(shipped_scenario("bench-L"), overrides={"metrics.include": include, "steps": cycles})
    t0 = time.perf_counter()
    model = FeedbackLoop(sc, "content", sc.policy, sc.seed)
    setup = time.perf_counter() - t0
    comp = next(c for c in model.metrics.components if c.registry_name == "conformal")
    spent: list[float] = []
    inner = comp.compute

    def timed(rec):
        t = time.perf_counter()
        rows = inner(rec)
        spent.append(time.perf_counter() - t)
        return rows

    comp.compute = timed
    cycle = []
    for _ in range(cycles):
        t = time.perf_counter()
        model.step()
        cycle.append(time.perf_counter() - t)
    conf = spent[warmup:]
    total = cycle[warmup:]
    rest = [c - s for c, s in zip(total, conf)]
    share = statistics.median(s / r for s, r in zip(conf, rest))
    rows = {g: v for m, g, v in model.last_rows if m == "conformal_coverage" and "stratum" not in g}
    return {"size": "L (100,000 x 10,000, d=32, k=10; scenarios/bench-L.yaml)", "setup_s": round(setup, 2),
            "cycles_timed": len(total), "cycle_s_median": round(statistics.median(total), 4),
            "cycle_without_conformal_s_median": round(statistics.median(rest), 4),
            "conformal_s_median": round(statistics.median(conf), 4),
            "conformal_share_of_cycle_median": round(share, 4), "target": "<= 0.15", "met": share <= 0.15,
            "conformal_s_all": [round(x, 4) for x in spent], "cycle_s_all": [round(x, 4) for x in cycle],
            "temperature_fits": comp.fits, "beta": comp.beta, "last_coverage": rows,
            "engine": {"backend": model.engine.backend_name, "workers": model.engine.workers}}


# ---------------------------------------------------------------------------------------------- control
def control(out: Path) -> dict:
    sc0 = load_scenario(shipped_scenario("conformal-control"))
    metric = next(m for m in sc0.metrics.include if (m["type"] if isinstance(m, dict) else m) == "conformal")
    n, m = metric["calibration_users"], metric["test_users"]
    frames = []
    for seed in SEEDS:
        sc = load_scenario(shipped_scenario("conformal-control"), overrides={"seed": seed})
        run_scenario(sc, out / f"control-{seed}", overwrite=True, progress=False)
        frames.append(pl.read_parquet(out / f"control-{seed}" / "metrics.parquet"))
    df = pl.concat(frames).filter((pl.col("metric") == "conformal_coverage") & ~pl.col("group").str.contains("stratum"))
    cells, ok = [], True
    for calib in metric["calibration"]:
        for method in METHODS:
            for a in ALPHAS:
                g = f"method={method},calib={calib},alpha={a:g}"
                for seed in SEEDS:
                    cov = df.filter((pl.col("group") == g) & (pl.col("seed") == seed)).sort("step")["value"].to_numpy()
                    T = len(cov)
                    var = a * (1 - a) * ((1 / (n + 2) + 1 / m) / T if calib != "frozen" else 1 / (n + 2) + 1 / (m * T))
                    se = math.sqrt(var)
                    lo, hi = 1 - a, 1 - a + 1 / (n + 1)
                    inside = bool(lo - 3 * se <= cov.mean() <= hi + 3 * se)
                    ok &= bool(inside)
                    mean = float(cov.mean())
                    z = (mean - lo) / se if mean < lo else (mean - hi) / se if mean > hi else 0.0
                    cells.append({"calib": calib, "method": method, "alpha": a, "seed": seed, "cycles": T,
                                  "mean_coverage": round(float(cov.mean()), 4), "se": round(se, 4),
                                  "band": [lo, round(hi, 4)], "z_outside_band": round(float(z), 2), "inside": inside})
    worst = max(cells, key=lambda c: abs(c["z_outside_band"]))
    inside = int(sum(c["inside"] for c in cells))
    return {"scenario": "scenarios/conformal-control.yaml", "n_calib": n, "n_test": m, "seeds": SEEDS,
            "alphas": ALPHAS, "methods": METHODS, "all_inside": ok, "cells_inside": inside, "cells": len(cells),
            "worst": worst, "table": cells}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["cost", "control"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/recloop-bench-conformal"))
    args = ap.parse_args(argv)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": sys.version.split()[0],
           "machine": platform.processor() or platform.machine(), "numpy": np.__version__,
           "load_average_1_5_15_at_start": [round(x, 2) for x in os.getloadavg()]}
    path = OUT / "conformal.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if args.only in (None, "cost"):
        res["cost"] = cost()
        print(json.dumps({k: v for k, v in res["cost"].items() if not k.endswith("_all")}, indent=1))
    if args.only in (None, "control"):
        res["control"] = control(args.out)
        c = res["control"]
        print(f"control: {c['cells_inside']}/{c['cells']} inside; worst {c['worst']}")
    path.write_text(json.dumps({**old, **res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
