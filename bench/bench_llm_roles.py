"""Cycle-time overhead of the LLM roles with the surrogate backend (issue 4 target: <= 10 % at 10,000 users).

    python bench/bench_llm_roles.py [--users 10000] [--items 2000] [--steps 12] [--users-per-cycle 50]

Each configuration runs in a real FeedbackLoop (BPR retrained every cycle; a temporary run directory,
so with the cache on every LLM request is a real surrogate call plus a cache write).
The overhead compares the median cycle time (retrain included: R1 works inside ``fit``) of

* R1 ``llm_augmented`` over BPR against plain BPR;
* R3 a pipeline BPR -> ``llm_rank`` re-ranker against the same pipeline without the re-ranker.

The LLM risk metric components are on in every configuration (they emit nothing without an LLM role).
By default (``cache: auto``) surrogate responses are not written to disk; ``--cache on`` measures
the cost of the response cache too (one small JSON file per request).

The first ``--warmup`` cycles are dropped. Prints a table and one JSON line per configuration.
Besides the end-to-end difference (wall and CPU), it reports the CPU time spent inside the LLM stage
itself (R1 ``augment``, R3 ``rerank`` incl. the base-order sort it takes over from the pipeline, and
the LLM metric components) as a share of the baseline cycle: on a shared, loaded machine this direct
figure is far more stable than the difference of two noisy cycle times.

Measured on the 2-core dev box (load average 3-5 from other jobs), 10,000 users, 2,000 items:
R1 at 50 users/cycle ~35 ms CPU per cycle (~10 % of a 0.33-0.41 s BPR cycle), at 100 users/cycle
~55 ms (~14 %); R3 at 50 users/cycle ~45 ms beyond the idle stage (~10 % of the pipeline cycle).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time


def scenario(n_users: int, n_items: int, steps: int, policy: dict, cache="auto"):
    from recloop.sim.config import validate_mapping

    return validate_mapping(
        {
            "name": "bench-llm-roles",
            "seed": 0,
            "steps": steps,
            "k": 10,
            "world": {"type": "chaney", "n_users": n_users, "n_items": n_items, "dim": 16, "n_creators": 0},
            "users": {"choice": {"type": "mnl", "temperature": 0.05, "no_click_utility": 0.02}},
            "policy": policy,
            "retrain": {"every": 1, "warm_start": True},
            "initial_log": {"interactions_per_user": 10},
            "metrics": {
                "include": ["utility", "exposure", "llm_generation", "llm_recommendation", "llm_feedback"],
                "user_sample": 1000,
                "regret_sample": 0,
            },
            "llm": {"backend": {"type": "surrogate"}, "cache": cache},
        }
    )


_ROLE_CPU = [0.0]


def _instrument() -> None:
    """Count the CPU time spent inside the LLM stages (R1 ``augment``, R3 ``rerank``) and the LLM
    metric components, so the overhead can also be read directly (robust to machine load)."""
    from recloop.analysis import llm_collectors as C
    from recloop.llm import role_augment, role_rank

    def wrap(cls, name):
        f = getattr(cls, name)

        def g(*a, **k):
            t = time.process_time()
            try:
                return f(*a, **k)
            finally:
                _ROLE_CPU[0] += time.process_time() - t

        setattr(cls, name, g)

    wrap(role_augment.LLMAugmented, "augment")
    wrap(role_rank.LLMRank, "rerank")
    for cls in (C.LLMGeneration, C.LLMRecommendation, C.LLMFeedback):
        wrap(cls, "compute")


def run(name: str, policy: dict, args) -> dict:
    from recloop.sim.model import FeedbackLoop

    sc = scenario(args.users, args.items, args.steps, policy, cache=args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = FeedbackLoop(sc, name, sc.policy, 0, run_dir=tmp)
        setup = time.perf_counter() - t0
        cpu: list[float] = []
        role_cpu: list[float] = []
        for _ in range(args.steps):
            c0, r0 = time.process_time(), _ROLE_CPU[0]
            model.step()
            cpu.append(time.process_time() - c0)
            role_cpu.append(_ROLE_CPU[0] - r0)
        cyc = model.timings["cycle"][args.warmup :]
        cpu, role_cpu = cpu[args.warmup :], role_cpu[args.warmup :]
        svc = model.services.get("llm")
        acc = svc.accounting if svc is not None else {}
    return {
        "bench": "llm_roles",
        "config": name,
        "users": args.users,
        "items": args.items,
        "cycle_s_median": statistics.median(cyc),
        "cycle_s_mean": statistics.fmean(cyc),
        "setup_s": setup,
        "cycle_cpu_s_median": statistics.median(cpu),
        "llm_stage_cpu_s_median": statistics.median(role_cpu),
        "llm_requests": acc.get("requests", 0),
        "llm_calls": acc.get("calls", 0),
        "llm_model_wall_s": acc.get("wall_s", 0.0),
        "cycles": len(cyc),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--items", type=int, default=2_000)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--users-per-cycle", type=int, default=50)
    ap.add_argument("--shuffles", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="alternate baseline/role runs this many times")
    ap.add_argument(
        "--cache",
        choices=["auto", "on", "off"],
        default="auto",
        help="response cache (auto: off for the surrogate); 'on' adds a file write per request",
    )
    args = ap.parse_args()
    args.cache = {"auto": "auto", "on": True, "off": False}[args.cache]
    bpr = {"type": "bpr", "factors": 32}
    upc = args.users_per_cycle
    configs = {
        "bpr": bpr,
        "r1_augmenter": {
            "type": "llm_augmented",
            "base": bpr,
            "users_per_cycle": upc,
            "n": 10,
            "candidates": 40,
            "unmatched": "phantom",
        },
        "pipeline": {"type": "pipeline", "retrieval": bpr, "candidates": 50},
        "r3_ranker": {
            "type": "pipeline",
            "retrieval": bpr,
            "candidates": 50,
            "reranker": {
                "type": "llm_rank",
                "mode": "generate",
                "max_candidates": 20,
                "shuffles": args.shuffles,
                "users_per_cycle": upc,
            },
        },
    }
    _instrument()
    results: dict[str, list[dict]] = {k: [] for k in configs}
    for _ in range(args.repeats):
        for name, pol in configs.items():
            results[name].append(run(name, pol, args))

    def med(k, field):
        return statistics.median(r[field] for r in results[k])

    pairs = {"r1_augmenter": "bpr", "r3_ranker": "pipeline"}
    overhead = {}
    for role, base in pairs.items():
        overhead[role] = {
            "wall": med(role, "cycle_s_median") / med(base, "cycle_s_median") - 1.0,
            "cpu": med(role, "cycle_cpu_s_median") / med(base, "cycle_cpu_s_median") - 1.0,
            "llm_stage_cpu": med(role, "llm_stage_cpu_s_median") / med(base, "cycle_cpu_s_median"),
        }
    print(
        f"{'config':14s} {'wall s/cycle':>13s} {'CPU s/cycle':>12s} {'LLM-stage CPU s':>16s} "
        f"{'LLM requests':>13s}"
    )
    for k, v in results.items():
        print(
            f"{k:14s} {med(k, 'cycle_s_median'):13.4f} {med(k, 'cycle_cpu_s_median'):12.4f} "
            f"{med(k, 'llm_stage_cpu_s_median'):16.4f} {v[-1]['llm_requests']:13d}"
        )
    for k, v in overhead.items():
        print(
            f"overhead {k} vs {pairs[k]}: wall {100 * v['wall']:+.1f} %, CPU {100 * v['cpu']:+.1f} %, "
            f"LLM stage alone {100 * v['llm_stage_cpu']:.1f} % of the baseline cycle (CPU)"
        )
    for v in results.values():
        for r in v:
            print(json.dumps(r))
    print(
        json.dumps(
            {
                "bench": "llm_roles_overhead",
                "users": args.users,
                "users_per_cycle": upc,
                "shuffles": args.shuffles,
                "cache": args.cache,
                "overhead": overhead,
                "machine": platform.machine(),
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
