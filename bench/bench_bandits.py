"""Issue 10's targets for the bandits, over seeds, with 95 % intervals (benchmarks, not timed tests).

    python bench/bench_bandits.py                # everything (about 10 minutes on 2 cores)
    python bench/bench_bandits.py --only cost    # one part: stationary | periodic | familiarity | cost

* stationary (`scenarios/bandits.yaml`): the slope of log cumulative regret against log cycle over cycles
  20–200 for LinUCB, LinTS and ε-greedy (target below 0.8 for LinUCB and LinTS), and their final regret
  against random's;
* periodic (`scenarios/bandits-timevar.yaml`): HyperBandit's cumulative reward minus LinUCB's (paired by
  seed: common random numbers), and what the LLM warm start does to regret over the first 20 cycles;
* familiarity (`scenarios/familiarity.yaml`): LAFB's novel-item share of consumption and utility
  relative to the base ranking;
* cost: seconds per cycle of per-user LinUCB at M against content filtering (target ≤ 4x), and of
  LinTS, ε-greedy and LinUCB in shared mode at L (target ≤ 2x), measured in the same process.

Intervals are t intervals over seeds (paired differences where two policies are compared). Results are
printed and appended to ``bench/results/bandits.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats

from recloop.sim.config import load_scenario, shipped_scenario
from recloop.sim.model import FeedbackLoop
from recloop.sim.runner import run_scenario

OUT = Path(__file__).resolve().parent / "results"
SEEDS = [1, 2, 3, 4, 5]


def interval(values) -> tuple[float, float, float]:
    """(mean, lo, hi) of a 95 % t interval."""
    v = np.asarray(values, float)
    m = float(v.mean())
    if len(v) < 2:
        return m, m, m
    h = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, m - h, m + h


def _runs(name: str, out: Path, overrides: dict | None = None) -> pl.DataFrame:
    frames = []
    for seed in SEEDS:
        sc = load_scenario(shipped_scenario(name), overrides={"seed": seed, **(overrides or {})})
        run_scenario(sc, out / f"{name}-{seed}", overwrite=True, progress=False)
        frames.append(pl.read_parquet(out / f"{name}-{seed}" / "metrics.parquet"))
    return pl.concat(frames)


def _series(df: pl.DataFrame, policy: str, metric: str, seed: int) -> np.ndarray:
    d = df.filter((pl.col("policy") == policy) & (pl.col("metric") == metric) & (pl.col("seed") == seed))
    return d.sort("step")["value"].to_numpy()


def stationary(out: Path) -> dict:
    df = _runs("bandits", out)
    res = {}
    for pol in ("linucb", "lints", "egreedy", "random"):
        slopes, finals = [], []
        for seed in SEEDS:
            r = _series(df, pol, "cumulative_regret", seed)
            t = np.arange(1, len(r) + 1)
            sel = (t >= 20) & (t <= 200)
            slopes.append(float(np.polyfit(np.log(t[sel]), np.log(np.maximum(r[sel], 1e-9)), 1)[0]))
            finals.append(float(r[-1]))
        res[pol] = {"slope": interval(slopes), "final_regret": interval(finals)}
    return res


def periodic(out: Path) -> dict:
    df = _runs("bandits-timevar", out)
    diff, warm = [], []
    for seed in SEEDS:
        diff.append(_series(df, "hyperbandit", "cumulative_reward", seed)[-1]
                    - _series(df, "linucb", "cumulative_reward", seed)[-1])
        warm.append(_series(df, "hyperbandit_llm", "cumulative_regret", seed)[19]
                    - _series(df, "hyperbandit", "cumulative_regret", seed)[19])
    finals = {p: interval([_series(df, p, "cumulative_reward", s)[-1] for s in SEEDS])
              for p in ("linucb", "hyperbandit", "hyperbandit_llm", "ideal")}
    return {"reward_hyperbandit_minus_linucb": interval(diff), "regret20_warm_minus_cold": interval(warm),
            "final_reward": finals}


def familiarity(out: Path) -> dict:
    df = _runs("familiarity", out)
    rel_novel, rel_util = [], []
    for seed in SEEDS:
        mean = {p: {m: float(np.nanmean(_series(df, p, m, seed))) for m in ("novel_share", "utility")}
                for p in ("base", "lafb")}
        rel_novel.append(mean["lafb"]["novel_share"] / mean["base"]["novel_share"] - 1)
        rel_util.append(mean["lafb"]["utility"] / mean["base"]["utility"] - 1)
    return {"novel_share_relative_gain": interval(rel_novel), "utility_relative_change": interval(rel_util)}


def _cycle_seconds(size: str, policy: dict, cycles: int) -> float:
    sc = load_scenario(shipped_scenario(f"bench-{size}"), overrides={"policy": policy, "steps": cycles + 2})
    m = FeedbackLoop(sc, "p", sc.policy, sc.seed)
    for _ in range(cycles + 2):
        m.step()
    return statistics.median(m.timings["cycle"][2:])


def cost() -> dict:
    res = {}
    for size, cycles, pols in (("M", 8, {"linucb": {"type": "linucb"}}),
                               ("L", 4, {"lints": {"type": "lints", "mode": "shared"},
                                         "egreedy": {"type": "egreedy", "mode": "shared"},
                                         "linucb_shared": {"type": "linucb", "mode": "shared"}})):
        base = _cycle_seconds(size, {"type": "content"}, cycles)
        for name, pol in pols.items():
            t = _cycle_seconds(size, pol, cycles)
            res[f"{size}:{name}"] = {"s_per_cycle": t, "content_s": base, "ratio": t / base}
        res[f"{size}:content_after"] = {"s_per_cycle": _cycle_seconds(size, {"type": "content"}, cycles)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["stationary", "periodic", "familiarity", "cost"])
    ap.add_argument("--out", default="/tmp/recloop-bench-bandits")
    args = ap.parse_args()
    out = Path(args.out)
    parts = {"stationary": stationary, "periodic": periodic, "familiarity": familiarity}
    results = {}
    for name, fn in parts.items():
        if args.only in (None, name):
            t0 = time.perf_counter()
            results[name] = fn(out)
            print(f"[{name}] {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.only in (None, "cost"):
        results["cost"] = cost()
    print(json.dumps(results, indent=2))
    OUT.mkdir(exist_ok=True)
    with open(OUT / "bandits.jsonl", "a") as f:
        f.write(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), **results}) + "\n")


if __name__ == "__main__":
    main()
