"""Issue 11's compression target: on the 6 × 6 grid (GROUNDING §4.5) over many seeds, the number of edges the
min-cut chain (``lp``, fixed-context procedure §4.4(c)) selects against Forward and Reverse Greedy at
φ ∈ {0.2, 0.4, 0.6, 0.8} (plus 0.75, 0.9, 1.0 for the reproduction table), with paired 95 % t intervals of the
differences (greedy − lp; the target is that they exclude 0 with lp smaller at φ ≤ 0.8), the held-out
coverage on fresh routes, and the max-flow backend timing (scipy Dinic vs networkx preflow-push).

    python bench/bench_conformal_compress.py             # 200 seeds (about 2 minutes on one core)
    python bench/bench_conformal_compress.py --seeds 50

Writes ``bench/results/conformal_compress.json`` and prints the table beside GROUNDING §4.5's
reproduction figures (a third-party clean-room run, 200 seeds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats

from recloop.analysis.conformal_compress import (
    bag,
    coverage,
    forward_greedy,
    incidence,
    lp_fixed,
    mincut_chain,
    reverse_greedy,
)
from recloop.analysis.conformal_compress_tasks import grid_task

OUT = Path(__file__).resolve().parent / "results" / "conformal_compress.json"
PHIS = [0.2, 0.4, 0.6, 0.75, 0.8, 0.9, 1.0]
TARGET_PHIS = [0.2, 0.4, 0.6, 0.8]
METHODS = {"lp": lp_fixed, "forward_greedy": forward_greedy, "reverse_greedy": reverse_greedy}
# GROUNDING §4.5 reproduction targets [S]: mean selected edges, 200 seeds
GROUNDING = {
    "lp": [29.28, 38.47, 45.00, 57.38, 63.40, 74.03, 78.86],
    "forward_greedy": [44.22, 55.78, 63.21, 68.44, 69.72, 73.80, 78.78],
    "reverse_greedy": [39.35, 53.90, 61.34, 67.24, 68.70, 73.37, 78.88],
}


def interval(values) -> tuple[float, float, float]:
    """(mean, lo, hi) of a 95 % t interval."""
    v = np.asarray(values, float)
    m = float(v.mean())
    h = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return m, m - h, m + h


def run(seeds: int, n_test: int) -> dict:
    """Sizes and held-out coverages per seed, method and φ (seed s: numpy Generator(s))."""
    size = {m: np.zeros((seeds, len(PHIS))) for m in METHODS}
    cov = {m: np.zeros((seeds, len(PHIS))) for m in METHODS}
    for s in range(seeds):
        t = grid_task(np.random.default_rng(s), n_test=n_test)
        inc = incidence(t.test, t.n_vertices)
        for m, fn in METHODS.items():
            for j, phi in enumerate(PHIS):
                mask = fn(t.train, t.calib, t.n_vertices, phi)
                size[m][s, j], cov[m][s, j] = mask.sum(), coverage(mask, inc)
    return {"size": size, "coverage": cov}


def backend_timing(n: int = 10) -> dict:
    """Seconds per min-cut chain on the grid's training bag, scipy vs networkx, same chains."""
    out = {}
    bags = [bag(grid_task(np.random.default_rng(1000 + i), n_test=0).train, 80) for i in range(n)]
    chains = {}
    for backend in ("scipy", "networkx"):
        t0 = time.perf_counter()
        chains[backend] = [[s.sum() for s in mincut_chain(b, backend).sets] for b in bags]
        out[backend] = (time.perf_counter() - t0) / n
    out["same_chains"] = chains["scipy"] == chains["networkx"]
    return out


def summarise(res: dict) -> dict:
    rows = []
    for j, phi in enumerate(PHIS):
        row = {"phi": phi}
        for m in METHODS:
            row[m] = interval(res["size"][m][:, j])
            row[f"{m}_coverage"] = interval(res["coverage"][m][:, j])
            row[f"{m}_grounding"] = GROUNDING[m][j]
        for m in ("forward_greedy", "reverse_greedy"):
            row[f"{m}_minus_lp"] = interval(res["size"][m][:, j] - res["size"]["lp"][:, j])
        rows.append(row)
    return {"rows": rows}


def table(summary: dict, n: int) -> str:
    lines = [f"6x6 grid, {n} seeds: mean edges selected (ours | GROUNDING §4.5 [S], 200 seeds); "
             "paired 95% CI of greedy − lp; held-out coverage (fresh routes)",
             "| φ | lp | FG | RG | FG − lp [95% CI] | RG − lp [95% CI] | cov lp / FG / RG |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        def cell(m, r=r):
            return f"{r[m][0]:.2f} \\| {r[m + '_grounding']:.2f}"

        def ci(m, r=r):
            mean, lo, hi = r[f"{m}_minus_lp"]
            return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"

        covs = " / ".join(f"{r[m + '_coverage'][0]:.3f}" for m in METHODS)
        lines.append(f"| {r['phi']} | {cell('lp')} | {cell('forward_greedy')} | {cell('reverse_greedy')} | "
                     f"{ci('forward_greedy')} | {ci('reverse_greedy')} | {covs} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=1000, help="fresh routes per seed for held-out coverage")
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = run(args.seeds, args.n_test)
    summary = summarise(res)
    passed = all(r[f"{m}_minus_lp"][1] > 0 for r in summary["rows"] if r["phi"] in TARGET_PHIS
                 for m in ("forward_greedy", "reverse_greedy"))
    timing = backend_timing()
    out = {"seeds": args.seeds, "n_test": args.n_test, "target_passed": passed,
           "seconds": time.perf_counter() - t0, "maxflow_seconds_per_chain": timing, **summary,
           "per_seed_sizes": {m: v.tolist() for m, v in res["size"].items()}, "phis": PHIS}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1))
    print(table(summary, args.seeds))
    print(f"target (both paired CIs > 0 at φ ∈ {TARGET_PHIS}): {'PASS' if passed else 'FAIL'}")
    print(f"max-flow per chain: scipy {timing['scipy'] * 1e3:.1f} ms, networkx {timing['networkx'] * 1e3:.1f} ms, "
          f"same chains: {timing['same_chains']}; wrote {OUT}")


if __name__ == "__main__":
    main()
