#!/usr/bin/env python3
# ruff: noqa
# Copied unchanged (below this header) from the project's peer references, /work/shared/peers/bench_trecs.py:
# the T-RECS 0.2.1 reference loop that bench/run_bench.py runs in its own virtual environment
# (T-RECS needs numpy < 2). Attribution: the recloop maintainers' peer-benchmark scripts; T-RECS is
# by Lucherini et al. (https://github.com/elucherini/t-recs, BSD-3-Clause).
"""Time one T-RECS (trecs 0.2.1) feedback loop: wall seconds per step and peak RSS.

Runs ContentFiltering (default) or PopularityRecommender with N users, M items,
d attributes, k recommendations per step for T steps. Each step is one call of
model.run(timesteps=1), i.e. recommend -> user feedback -> internal update ->
train -> record state -> measurements; its wall time is read with perf_counter.

Prints one JSON line. Peak RSS is this process's ru_maxrss (setup included);
rss_after_setup_mib is the peak reached by the end of model construction.

Example:
  python bench_trecs.py --users 1000 --items 1000 --attrs 32 --k 10 --steps 10
  python bench_trecs.py --users 1000 --items 1000 --metric interaction
  python bench_trecs.py --users 1000 --items 1000 --profile /tmp/trecs.prof
"""
import argparse
import json
import resource
import statistics
import sys
import time
import warnings


def rss_peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_now_mib():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def make_metric(name, num_users, rng):
    from trecs import metrics

    if name == "none":
        return None
    if name == "interaction":  # per-item interaction histogram (popularity bias)
        return metrics.InteractionMeasurement()
    if name == "spread":
        return metrics.InteractionSpread()
    if name == "recsim":  # homogenization of recommendations over user pairs
        pairs = [tuple(p) for p in rng.integers(0, num_users, size=(1000, 2))]
        return metrics.RecSimilarity(pairs)
    if name == "mse":  # dense: predicted vs true score matrix
        return metrics.MSEMeasurement()
    raise SystemExit(f"unknown metric {name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--attrs", type=int, default=32)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", choices=["content", "popularity"], default="content")
    ap.add_argument("--metric", default="none",
                    choices=["none", "interaction", "spread", "recsim", "mse"])
    ap.add_argument("--no-train", action="store_true",
                    help="run(train_between_steps=False): skips the per-step retrain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default=None,
                    help="write a cProfile of the stepping loop here and print the top rows")
    args = ap.parse_args()

    warnings.simplefilter("ignore")
    import numpy as np
    import trecs

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    common = dict(num_users=args.users, num_items=args.items,
                  num_items_per_iter=args.k, seed=args.seed)
    if args.model == "content":
        model = trecs.models.ContentFiltering(num_attributes=args.attrs, **common)
    else:
        # popularity ranks by item interaction counts; users' true profiles
        # still have d attributes (actual_user_representation).
        item_attrs = rng.binomial(1, 0.5, size=(args.attrs, args.items)).astype(float)
        user_prof = rng.normal(size=(args.users, args.attrs))
        model = trecs.models.PopularityRecommender(
            actual_user_representation=user_prof,
            actual_item_representation=item_attrs, **common)
    metric = make_metric(args.metric, args.users, rng)
    if metric is not None:
        model.add_metrics(metric)
    setup_s = time.perf_counter() - t0
    rss_setup = rss_peak_mib()

    prof = None
    if args.profile:
        import cProfile
        prof = cProfile.Profile()

    step_s = []
    for _ in range(args.steps):
        if prof:
            prof.enable()
        t = time.perf_counter()
        model.run(timesteps=1, disable_tqdm=True, train_between_steps=not args.no_train)
        step_s.append(time.perf_counter() - t)
        if prof:
            prof.disable()

    out = {
        "tool": "trecs",
        "trecs_version": getattr(trecs, "__version__", "0.2.1"),
        "numpy": np.__version__,
        "model": args.model,
        "metric": args.metric,
        "train_between_steps": not args.no_train,
        "users": args.users, "items": args.items, "attrs": args.attrs,
        "k": args.k, "steps": args.steps,
        "setup_s": round(setup_s, 4),
        "step_median_s": round(statistics.median(step_s), 5),
        "step_min_s": round(min(step_s), 5),
        "step_max_s": round(max(step_s), 5),
        "steps_s": [round(s, 5) for s in step_s],
        "rss_after_setup_mib": round(rss_setup, 1),
        "rss_now_mib": round(rss_now_mib(), 1),
        "peak_rss_mib": round(rss_peak_mib(), 1),
    }
    if metric is not None:
        m = model.get_measurements()
        out["metric_series_len"] = {k: len(v) for k, v in m.items()}
    print(json.dumps(out), flush=True)

    if prof:
        import pstats
        prof.dump_stats(args.profile)
        st = pstats.Stats(prof, stream=sys.stderr)
        st.sort_stats("tottime").print_stats(20)
        st.sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
