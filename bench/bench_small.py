#!/usr/bin/env python3
"""Small worlds (issue 12): the bench-S cycle as a ratio to the naive composition, and a small study's time.

The ratio is measured in one process; the study is a 2 x 3 grid x 5 seeds of bench-S for 200 cycles run
with ``recloop sweep``.

    python bench/bench_small.py                               # ratio (5 rounds) and the sweep
    python bench/bench_small.py --no-sweep --rounds 7
    python bench/bench_small.py --baseline /tmp/recloop-old   # also another checkout, interleaved

**Ratio.** A child process builds ``scenarios/bench-S.yaml`` (1,000 users x 1,000 items, the core
metrics) through recloop's own model (``FeedbackLoop``), runs warm-up cycles, then ``--rounds`` rounds
of: ``--cycles`` timed cycles, the naive composition (``bench/roofline_ref.py`` mode c: product +
argpartition top-k + logit choice + profile update, 1 and 2 workers, the faster), ``--cycles`` more
cycles. A round's ratio is its median cycle over its naive step; the figure is the median over rounds.
Also reported: process CPU per cycle and per naive step (its 2-worker variant) and their ratio.
Both sides run in one process minutes apart at most, so a shared machine's load hits both; the ratio is
reported, never asserted. ``--baseline DIR`` runs the same child on another checkout (``DIR`` holds its
``recloop/`` package, e.g. ``git archive HEAD | tar -x -C DIR``), alternating with this one.

**Sweep.** ``recloop sweep bench/study-S.yaml --workers 2`` (2 x 3 cells x 5 seeds x 200 cycles, the
metrics and interactions written as a study does) into a temporary directory; its wall time.

Results: a table on stderr, one JSON line per checkout on stdout, appended to
``bench/results/small.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
STUDY = HERE / "study-S.yaml"
PHASES = ("scoring", "update", "metrics", "retrain")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _naive_step_s(users: int, items: int, d: int, k: int, steps: int) -> tuple[float, float]:
    """The naive composition's wall seconds per step (mode c, the faster of 1 and 2 workers), and its
    process CPU seconds per step with 2 workers (BLAS on one thread: no spinning BLAS threads counted)."""
    from roofline_ref import roofline

    c0 = time.process_time()
    r = roofline(users, items, d, k, steps=steps, workers=2, modes="c")
    cpu = (time.process_time() - c0) / (steps + 1)  # + its warm-up step
    wall = roofline(users, items, d, k, steps=steps, workers=1, modes="c")["c_median_s"]
    time.sleep(0.5)  # OpenBLAS threads spin a while after a multi-threaded call: not into the next cycles' CPU
    return min(wall, r["c_median_s"]), cpu


def child(rounds: int, cycles: int, warmup: int, naive_steps: int, overrides: dict) -> dict:
    """One checkout: per round, cycles / naive composition / cycles, all in this process."""
    sys.path.insert(0, str(HERE))
    import recloop
    from recloop.sim.config import load_scenario
    from recloop.sim.model import FeedbackLoop

    sc = load_scenario(ROOT / "scenarios" / "bench-S.yaml", overrides={"steps": 100_000, **overrides})
    w = sc.world
    model = FeedbackLoop(sc, "content", sc.policy, sc.seed)
    for _ in range(warmup):
        model.step()
    ratios, naive, cycle, cpu, naive_cpu = [], [], [], [], []
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    for _ in range(rounds):
        model.timings.clear()
        c0 = time.process_time()
        for _ in range(cycles):
            model.step()
        c1 = time.process_time()
        step, step_cpu = _naive_step_s(w.n_users, w.n_items, w.dim, sc.k, naive_steps)
        c2 = time.process_time()
        for _ in range(cycles):
            model.step()
        cpu.append((c1 - c0 + time.process_time() - c2) / (2 * cycles))
        tm = model.timings
        med = statistics.median(tm["cycle"])
        ratios.append(med / step)
        naive.append(step)
        naive_cpu.append(step_cpu)
        cycle.append(med)
        for p in PHASES:
            phases[p].append(statistics.median(tm[p]) if tm.get(p) else 0.0)
    ms = lambda xs: round(1e3 * statistics.median(xs), 3)  # noqa: E731
    return {
        "recloop": str(Path(recloop.__file__).resolve().parent.parent),
        "rounds": rounds, "cycles_per_round": 2 * cycles,
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "cycle_ms": ms(cycle), "naive_ms": ms(naive), "cycle_cpu_ms": ms(cpu), "naive_cpu_ms": ms(naive_cpu),
        "cpu_ratio": round(statistics.median(cpu) / statistics.median(naive_cpu), 3),
        **{f"{p}_ms": ms(v) for p, v in phases.items()},
        "metrics_share": round(statistics.median(phases["metrics"]) / statistics.median(cycle), 3),
        "loadavg": [round(x, 2) for x in os.getloadavg()], "overrides": overrides,
    }


def run_child(args, tree: Path | None) -> dict | None:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--rounds", str(args.rounds),
           "--cycles", str(args.cycles), "--warmup", str(args.warmup), "--naive-steps", str(args.naive_steps)]
    cmd += [a for kv in args.set for a in ("--set", kv)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        log(p.stderr[-4000:])
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_sweep(tree: Path | None, workers: int) -> dict | None:
    """``recloop sweep`` of the study into a fresh directory; wall seconds and cycles run."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(prefix="recloop-bench-small-") as tmp:
        cmd = [sys.executable, "-m", "recloop", "sweep", str(STUDY), "--out", str(Path(tmp) / "sweep"),
               "--workers", str(workers), "--no-progress"]
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)  # not ROOT: -m would import it
        wall = time.perf_counter() - t
        if p.returncode != 0:
            log(p.stderr[-4000:])
            return None
        cells = len(list((Path(tmp) / "sweep" / "cells").iterdir()))
    return {"sweep_wall_s": round(wall, 1), "sweep_cells": cells, "sweep_workers": workers,
            "sweep_loadavg": [round(x, 2) for x in os.getloadavg()]}


def pooled(children: list[dict]) -> dict:
    """One row for a checkout's children: the ratio over all their rounds, the median child's details."""
    ratios = [r for c in children for r in c["ratios"]]
    mid = sorted(children, key=lambda c: c["ratio_median"])[(len(children) - 1) // 2]
    return {**mid, "ratio_median": round(statistics.median(ratios), 3), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "ratios": ratios, "children": [c["ratio_median"] for c in children],
            "cpu_ratio": round(statistics.median(c["cpu_ratio"] for c in children), 3),
            "cpu_ratios": [c["cpu_ratio"] for c in children]}


def table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="bench-S: cycle vs the naive composition (same process; medians over rounds)")
    for col in ("checkout", "ratio", "range", "cycle ms", "naive ms", "CPU ratio", "cycle CPU ms", "naive CPU ms",
                "scoring", "metrics", "sweep s"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["label"], f"{r['ratio_median']:.3f}", f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}",
                  f"{r['cycle_ms']:.2f}", f"{r['naive_ms']:.2f}", f"{r['cpu_ratio']:.3f}", f"{r['cycle_cpu_ms']:.2f}",
                  f"{r['naive_cpu_ms']:.2f}",
                  f"{r['scoring_ms']:.2f}", f"{r['metrics_ms']:.2f}",
                  f"{r['sweep_wall_s']:.0f}" if r.get("sweep_wall_s") else "-")
    Console(stderr=True, width=160).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of cycles / naive step / cycles per child")
    ap.add_argument("--cycles", type=int, default=20, help="timed cycles before and after each naive step")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--naive-steps", type=int, default=5, help="timed steps of the naive composition")
    ap.add_argument("--repeats", type=int, default=1, help="children per checkout (alternating)")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout to measure alongside")
    ap.add_argument("--no-sweep", action="store_true", help="skip the 2 x 3 x 5-seed sweep")
    ap.add_argument("--sweep-workers", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a scenario override for the ratio (e.g. metrics.regret_sample=100); repeatable")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import yaml

        overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
        print(json.dumps(child(args.rounds, args.cycles, args.warmup, args.naive_steps, overrides)), flush=True)
        return
    trees: list[tuple[str, Path | None]] = [("this", None)]
    if args.baseline is not None:
        trees.append(("baseline", args.baseline.resolve()))
    runs: dict[str, list[dict]] = {label: [] for label, _ in trees}
    for rep in range(args.repeats):
        for label, tree in trees if rep % 2 == 0 else trees[::-1]:
            log(f"[{label}] bench-S ratio, child {rep + 1}/{args.repeats} ...")
            res = run_child(args, tree)
            if res is not None:
                runs[label].append(res)
                log(f"[{label}] ratio {res['ratio_median']} (cycle {res['cycle_ms']} ms, naive {res['naive_ms']} ms)")
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for label, tree in trees:
        if not runs[label]:
            continue
        row = pooled(runs[label])
        row.update(label=label, date=stamp)
        if not args.no_sweep:
            log(f"[{label}] recloop sweep {STUDY.name} --workers {args.sweep_workers} ...")
            row.update(run_sweep(tree, args.sweep_workers) or {})
        rows.append(row)
    table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "small.jsonl", "a") as fh:
        for r in rows:
            line = json.dumps(r)
            print(line, flush=True)
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
