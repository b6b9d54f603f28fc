#!/usr/bin/env python3
"""recloop benchmark (issue 3): seconds per cycle, peak RSS, the roofline and T-RECS, per size.

For each size (S 1,000 x 1,000; M 10,000 x 5,000; L 100,000 x 10,000; XL 1,000,000 x 50,000 with
d=64) a fresh subprocess (so peak RSS is per size) builds the shipped scenario
``scenarios/bench-<SIZE>.yaml`` and runs cycles through recloop's own model (``FeedbackLoop``: the
content policy, logit choice, drift, the core metrics), then measures the roofline in the same
process (``bench/roofline_ref.py``: the bare chunked BLAS product, mode a, and product + argpartition
+ choice, mode c, as in the peers' roofline.py, with 1 and 2 workers; the faster is the reference),
then a second batch of cycles (so load changes on a shared machine hit both). For S and M, T-RECS
0.2.1 runs the equivalent loop (``bench/bench_trecs.py``) in its own virtual environment, created
here on first use.

Prints a table and one JSON line per size, appends the JSON lines to bench/results/results.jsonl,
writes bench/results/latest.json and a log-log scaling plot bench/results/scaling.png.

    python bench/run_bench.py            # S, M, L (+ XL when the estimate fits --xl-budget)
    python bench/run_bench.py --quick    # S and M only
    python bench/run_bench.py --sizes L --no-trecs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

# users, items, d; timed cycles (in two batches around the roofline), warm-up cycles; roofline steps,
# roofline worker variants (1: BLAS threads as NumPy sets them; 2: a 2-thread pool, BLAS pinned to one
# thread each; the faster is the reference) and modes (XL: the bare product only: mode c's argpartition
# would take minutes per step there and no XL target refers to it)
SIZES = {
    "S": dict(users=1_000, items=1_000, d=32, cycles=20, warmup=2,
              roof_steps=5, roof_workers=(1, 2), modes="a,c"),
    "M": dict(users=10_000, items=5_000, d=32, cycles=10, warmup=2,
              roof_steps=5, roof_workers=(1, 2), modes="a,c"),
    "L": dict(users=100_000, items=10_000, d=32, cycles=6, warmup=1,
              roof_steps=3, roof_workers=(2,), modes="a,c"),
    "XL": dict(users=1_000_000, items=50_000, d=64, cycles=2, warmup=1,
               roof_steps=1, roof_workers=(2,), modes="a"),
}
TRECS_STEPS = {"S": 5, "M": 3}
TRECS_VENV = Path(os.environ.get("RECLOOP_TRECS_VENV", "/tmp/trecs"))
TRECS_INSTALL = [
    [sys.executable, "-m", "venv", str(TRECS_VENV)],
    [str(TRECS_VENV / "bin/pip"), "install", "--no-deps", "trecs==0.2.1"],
    [str(TRECS_VENV / "bin/pip"), "install", "numpy==1.26.4", "numba==0.58.1", "llvmlite==0.41.1", "scipy",
     "networkx", "tqdm", "pandas", "lenskit==0.14.4"],
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# child: one size in a fresh process
# ---------------------------------------------------------------------------------------------
def child(size: str, cycles: int | None, backend: str) -> dict:
    sys.path.insert(0, str(HERE))
    from roofline_ref import roofline

    from recloop.sim.config import load_scenario
    from recloop.sim.model import FeedbackLoop

    spec = SIZES[size]
    n_cycles = cycles or spec["cycles"]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    sc = load_scenario(ROOT / "scenarios" / f"bench-{size}.yaml", overrides={"engine.backend": backend})
    model = FeedbackLoop(sc, "content", sc.policy, sc.seed)
    setup_s = time.perf_counter() - t0
    for _ in range(spec["warmup"]):
        model.step()
    model.timings.clear()
    first = n_cycles - n_cycles // 2
    for _ in range(first):
        model.step()
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    # the roofline in the same process, after the model's peak RSS was read
    d = spec["d"]
    roof = {}
    for w in spec["roof_workers"]:
        roof[w] = roofline(spec["users"], spec["items"], d, sc.k, steps=spec["roof_steps"], workers=w,
                           modes=spec["modes"])
    for _ in range(n_cycles - first):
        model.step()
    tm = model.timings

    def med(name):
        xs = tm.get(name) or []
        return statistics.median(xs) if xs else 0.0

    cyc = med("cycle")
    best_a = min(r["a_median_s"] for r in roof.values())
    best_c = min((r["c_median_s"] for r in roof.values() if "c_median_s" in r), default=None)
    out = {
        "size": size, "users": spec["users"], "items": spec["items"], "d": d, "k": sc.k,
        "backend": model.engine.backend_name, "engine_workers": model.engine.workers,
        "chunk_rows": model.engine.rows_per_chunk(spec["items"]),
        "cycles": len(tm.get("cycle", [])), "setup_s": round(setup_s, 3),
        "cycle_s_median": round(cyc, 5), "cycle_s_min": round(min(tm["cycle"]), 5),
        "scoring_s_median": round(med("scoring"), 5), "update_s_median": round(med("update"), 5),
        "metrics_s_median": round(med("metrics"), 5), "retrain_s_median": round(med("retrain"), 5),
        "metrics_share": round(med("metrics") / cyc, 4) if cyc else None,
        "peak_rss_mb": round(rss_model, 1),
        "roofline_a_s": best_a, "roofline_c_s": best_c,
        "roofline": {f"w{w}": {key: r[key] for key in ("a_median_s", "c_median_s", "a_gflops", "chunk_rows")
                               if key in r} for w, r in roof.items()},
        "cycle_over_roofline_a": round(cyc / best_a, 3),
        "cycle_over_roofline_c": round(cyc / best_c, 3) if best_c else None,
        "loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    return out


def run_child(size: str, args) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", size, "--backend", args.backend]
    if args.cycles:
        cmd += ["--cycles", str(args.cycles)]
    log(f"[{size}] recloop + roofline in a fresh process ...")
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        log(p.stderr[-4000:])
        log(f"[{size}] failed (exit {p.returncode})")
        return None
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = round(time.perf_counter() - t, 1)
    c = res["roofline_c_s"]
    log(f"[{size}] {res['cycle_s_median']:.4f} s/cycle, roofline a {res['roofline_a_s']:.4f} s, "
        f"c {c if c is None else round(c, 4)} s, peak RSS {res['peak_rss_mb']:.0f} MB ({res['wall_s']} s)")
    return res


# ---------------------------------------------------------------------------------------------
# T-RECS
# ---------------------------------------------------------------------------------------------
def ensure_trecs() -> Path | None:
    py = TRECS_VENV / "bin/python"
    if py.exists():
        ok = subprocess.run([str(py), "-c", "import trecs"], capture_output=True)
        if ok.returncode == 0:
            return py
    log(f"creating the T-RECS environment in {TRECS_VENV} ...")
    for cmd in TRECS_INSTALL:
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            log(p.stderr[-2000:])
            return None
    return py


def run_trecs(size: str, py: Path) -> dict | None:
    spec = SIZES[size]
    cmd = [str(py), str(HERE / "bench_trecs.py"), "--users", str(spec["users"]), "--items",
           str(spec["items"]), "--attrs", str(spec["d"]), "--k", "10", "--steps", str(TRECS_STEPS[size])]
    log(f"[{size}] T-RECS 0.2.1 ({TRECS_STEPS[size]} steps) ...")
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        log(p.stderr[-2000:])
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# XL estimate
# ---------------------------------------------------------------------------------------------
def estimate_xl_s(results: dict) -> float | None:
    """Wall seconds the XL child would take, extrapolated from the largest measured size."""
    base = next((results[s] for s in ("L", "M", "S") if results.get(s)), None)
    if base is None:
        return None
    scale = (1e6 * 5e4 * 64) / (base["users"] * base["items"] * base["d"])
    cycle = base["cycle_s_median"] * scale
    roof = base["roofline_a_s"] * scale  # mode a only at XL
    setup = base["setup_s"] * (1e6 * 5e4) / (base["users"] * base["items"])
    spec = SIZES["XL"]
    return setup + cycle * (spec["warmup"] + spec["cycles"]) + roof * (spec["roof_steps"] + 1)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def machine() -> dict:
    import numpy as np

    info = {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import numba

        info["numba"] = numba.__version__
    except ImportError:
        pass
    return info


def table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="recloop benchmark (median seconds per cycle)")
    for col in ("size", "users x items", "backend", "s/cycle", "roofline a", "roofline c", "cycle/a",
                "cycle/c", "metrics %", "peak RSS MB", "T-RECS s", "x faster"):
        t.add_column(col, justify="right")
    for r in rows:
        if r.get("skipped"):
            t.add_row(r["size"], f"{r['users']:,} x {r['items']:,}", "-", "skipped", *[""] * 8)
            continue
        tr = r.get("trecs_s")
        c = r.get("roofline_c_s")
        t.add_row(r["size"], f"{r['users']:,} x {r['items']:,}", r["backend"], f"{r['cycle_s_median']:.4f}",
                  f"{r['roofline_a_s']:.4f}", f"{c:.4f}" if c else "-", f"{r['cycle_over_roofline_a']:.2f}",
                  f"{r['cycle_over_roofline_c']:.2f}" if c else "-", f"{100 * r['metrics_share']:.1f}",
                  f"{r['peak_rss_mb']:.0f}", f"{tr:.3f}" if tr else "-",
                  f"{r['trecs_speedup']:.0f}" if tr else "-")
    Console(stderr=True, width=200).print(t)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if not r.get("skipped")]
    if not done:
        return
    x = [r["users"] * r["items"] for r in done]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.loglog(x, [r["cycle_s_median"] for r in done], "o-", label="recloop cycle")
    ax.loglog(x, [r["roofline_a_s"] for r in done], "s--", label="roofline a: bare product")
    rc = [(r["users"] * r["items"], r["roofline_c_s"]) for r in done if r.get("roofline_c_s")]
    if rc:
        ax.loglog(*zip(*rc, strict=True), "^--", label="roofline c: product+argpartition+choice")
    tr = [(r["users"] * r["items"], r["trecs_s"]) for r in done if r.get("trecs_s")]
    if tr:
        ax.loglog(*zip(*tr, strict=True), "x:", ms=9, label="T-RECS 0.2.1")
    for r in done:
        ax.annotate(r["size"], (r["users"] * r["items"], r["cycle_s_median"]), textcoords="offset points",
                    xytext=(4, -12))
    ax.set_xlabel("users x items")
    ax.set_ylabel("seconds per cycle")
    ax.set_title("recloop scaling (d=32, XL d=64; k=10)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help="comma-separated sizes (default S,M,L,XL; XL if it fits)")
    ap.add_argument("--quick", action="store_true", help="S and M only")
    ap.add_argument("--cycles", type=int, default=None, help="timed cycles per size (default per size)")
    ap.add_argument("--backend", default="auto", help="engine.backend for recloop (default auto)")
    ap.add_argument("--no-trecs", action="store_true", help="skip the T-RECS comparison")
    ap.add_argument("--xl-budget", type=float, default=600.0,
                    help="skip XL when its estimated run time exceeds this many seconds")
    ap.add_argument("--force-xl", action="store_true", help="run XL whatever the estimate")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        print(json.dumps(child(args.child, args.cycles, args.backend)), flush=True)
        return

    sizes = ["S", "M"] if args.quick else (args.sizes.split(",") if args.sizes else ["S", "M", "L", "XL"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    info = machine()
    results: dict[str, dict] = {}
    rows = []
    py = None if args.no_trecs else ensure_trecs()
    for size in sizes:
        spec = SIZES[size]
        if size == "XL" and not args.force_xl:
            est = estimate_xl_s(results)
            if est is None or est > args.xl_budget:
                note = (f"XL skipped on CPU: estimated {est:.0f} s > budget {args.xl_budget:.0f} s"
                        if est is not None else "XL skipped: no smaller size measured to estimate it from")
                log(note + " (run with --force-xl or --sizes XL --force-xl)")
                rows.append({"size": size, "users": spec["users"], "items": spec["items"], "skipped": note,
                             "estimate_s": round(est, 0) if est else None})
                continue
        res = run_child(size, args)
        if res is None:
            continue
        if py is not None and size in TRECS_STEPS:
            tr = run_trecs(size, py)
            if tr is not None:
                res["trecs_s"] = tr["step_median_s"]
                res["trecs_peak_rss_mb"] = tr["peak_rss_mib"]
                res["trecs_speedup"] = round(tr["step_median_s"] / res["cycle_s_median"], 1)
        res["date"] = stamp
        res["machine"] = info
        results[size] = res
        rows.append(res)
    table(rows)
    with open(out / "results.jsonl", "a") as fh:
        for r in rows:
            line = json.dumps(r)
            print(line, flush=True)
            fh.write(line + "\n")
    latest = latest_per_size(out / "results.jsonl")  # sizes run separately (e.g. XL) join the plot
    (out / "latest.json").write_text(json.dumps({"date": stamp, "machine": info, "rows": latest}, indent=2))
    plot(latest, out / "scaling.png")
    log(f"wrote {out / 'latest.json'}, {out / 'results.jsonl'}, {out / 'scaling.png'}")


def latest_per_size(path: Path) -> list[dict]:
    """The most recent measured row of every size in results.jsonl (S, M, L, XL order)."""
    best: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not r.get("skipped") or r["size"] not in best:
            best[r["size"]] = r
    return [best[s] for s in SIZES if s in best]


if __name__ == "__main__":
    main()
