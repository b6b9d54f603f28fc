"""Cycle-time overhead of the LLM roles with the surrogate backend (issue 4 target: <= 10 % at 10,000 users).

    python bench/bench_llm_roles.py [--users 10000] [--items 2000] [--steps 8] [--users-per-cycle 100]

Each configuration runs in a real FeedbackLoop (BPR, retrained every cycle, fresh response cache
in a temporary run directory, so every LLM request is a real surrogate call plus a cache write).
The overhead compares the median cycle time (retrain included: R1 works inside ``fit``) of

* R1 ``llm_augmented`` over BPR against plain BPR;
* R3 a pipeline BPR -> ``llm_rank`` re-ranker against the same pipeline without the re-ranker.

The first ``--warmup`` cycles are dropped. Prints a table and one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time


def scenario(n_users: int, n_items: int, steps: int, policy: dict):
    from recloop.sim.config import validate_mapping

    return validate_mapping({
        "name": "bench-llm-roles",
        "seed": 0,
        "steps": steps,
        "k": 10,
        "world": {"type": "chaney", "n_users": n_users, "n_items": n_items, "dim": 16, "n_creators": 0},
        "users": {"choice": {"type": "mnl", "temperature": 0.05, "no_click_utility": 0.02}},
        "policy": policy,
        "retrain": {"every": 1, "warm_start": True},
        "initial_log": {"interactions_per_user": 10},
        "metrics": {"include": ["utility", "exposure"], "user_sample": 1000, "regret_sample": 0},
        "llm": {"backend": {"type": "surrogate"}},
    })


def run(name: str, policy: dict, args) -> dict:
    from recloop.sim.model import FeedbackLoop

    sc = scenario(args.users, args.items, args.steps, policy)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = FeedbackLoop(sc, name, sc.policy, 0, run_dir=tmp)
        setup = time.perf_counter() - t0
        for _ in range(args.steps):
            model.step()
        cyc = model.timings["cycle"][args.warmup:]
        svc = model.llm_service
        acc = svc.accounting if svc is not None else {}
    return {"bench": "llm_roles", "config": name, "users": args.users, "items": args.items,
            "cycle_s_median": statistics.median(cyc), "cycle_s_mean": statistics.fmean(cyc), "setup_s": setup,
            "llm_requests": acc.get("requests", 0), "llm_calls": acc.get("calls", 0),
            "llm_model_wall_s": acc.get("wall_s", 0.0), "cycles": len(cyc)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--items", type=int, default=2_000)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--users-per-cycle", type=int, default=100)
    ap.add_argument("--shuffles", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="alternate baseline/role runs this many times")
    args = ap.parse_args()
    bpr = {"type": "bpr", "factors": 32}
    upc = args.users_per_cycle
    configs = {
        "bpr": bpr,
        "r1_augmenter": {"type": "llm_augmented", "base": bpr, "users_per_cycle": upc, "n": 10, "candidates": 40,
                         "unmatched": "phantom"},
        "pipeline": {"type": "pipeline", "retrieval": bpr, "candidates": 50},
        "r3_ranker": {"type": "pipeline", "retrieval": bpr, "candidates": 50,
                      "reranker": {"type": "llm_rank", "mode": "generate", "max_candidates": 20,
                                   "shuffles": args.shuffles, "users_per_cycle": upc}},
    }
    results: dict[str, list[dict]] = {k: [] for k in configs}
    for _ in range(args.repeats):
        for name, pol in configs.items():
            results[name].append(run(name, pol, args))
    med = {k: statistics.median(r["cycle_s_median"] for r in v) for k, v in results.items()}
    overhead = {"r1_augmenter": med["r1_augmenter"] / med["bpr"] - 1.0,
                "r3_ranker": med["r3_ranker"] / med["pipeline"] - 1.0}
    print(f"{'config':14s} {'cycle_s (median)':>17s} {'LLM requests':>13s}")
    for k, v in results.items():
        print(f"{k:14s} {med[k]:17.4f} {v[-1]['llm_requests']:13d}")
    for k, v in overhead.items():
        print(f"overhead {k}: {100 * v:+.1f} %")
    for k, v in results.items():
        for r in v:
            print(json.dumps(r))
    print(json.dumps({"bench": "llm_roles_overhead", "users": args.users, "users_per_cycle": upc,
                      "shuffles": args.shuffles, "overhead": overhead, "machine": platform.machine(),
                      "python": platform.python_version()}))


if __name__ == "__main__":
    main()
