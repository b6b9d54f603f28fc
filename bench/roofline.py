#!/usr/bin/env python3
# ruff: noqa
# Copied unchanged (below this header) from the project's peer references, /work/shared/peers/roofline.py:
# the standalone physical-limit reference. bench/run_bench.py measures the same modes in-process
# (bench/roofline_ref.py) so the ratio is taken under the same conditions as the cycle.
"""Physical-limit reference for one recommender feedback-loop step on this machine.

One step, for N users, M items, d latent dims, k recommendations:
  (a) matmul   : scores = U_hat (N x d) @ V_hat (d x M), float32, row-chunked so the
                 score block stays cache-sized (never N x M in memory)
  (b) + top-k  : np.argpartition per chunk, then sort the k winners (ranked slate)
  (c) + choice : each user's true utility for its k items (gather + dot, N*k*d),
                 multinomial-logit choice via Gumbel-max, interaction histogram
                 (np.bincount) and an O(N*d) content-profile update of U_hat.

Modes are timed separately, each for --steps repetitions after one warm-up; the
median per-step seconds and GFLOP/s of the matmul (2*N*M*d flops) are printed as
one JSON line. --workers 2 runs chunks on a 2-thread pool with BLAS pinned to one
thread per worker (set before numpy is imported); --workers 1 leaves BLAS threading
at its default and does top-k/choice on the main thread.

Example:
  python roofline.py --users 100000 --items 10000 --attrs 32 --k 10 --steps 5
  python roofline.py --users 100000 --items 10000 --workers 2
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--users", type=int, default=1000)
ap.add_argument("--items", type=int, default=1000)
ap.add_argument("--attrs", type=int, default=32)
ap.add_argument("--k", type=int, default=10)
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--chunk-mib", type=float, default=8.0,
                help="target size of one float32 score block (rows x M)")
ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
ap.add_argument("--workers", type=int, default=1)
ap.add_argument("--modes", default="a,b,c")
args = ap.parse_args()

if args.workers > 1:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"

import numpy as np  # noqa: E402  (after the thread env vars)
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

N, M, d, k = args.users, args.items, args.attrs, args.k
dt = np.dtype(args.dtype)
rng = np.random.default_rng(0)
U_hat = rng.standard_normal((N, d), dtype=np.float32).astype(dt)
V_hat = rng.standard_normal((d, M), dtype=np.float32).astype(dt)       # beliefs
U_true = rng.standard_normal((N, d), dtype=np.float32).astype(dt)
V_true_T = np.ascontiguousarray(V_hat.T) + dt.type(0.1) * rng.standard_normal(
    (M, d), dtype=np.float32).astype(dt)                                # M x d truth
rows = max(k + 1, int(args.chunk_mib * 2**20 // (M * dt.itemsize)))
rows = min(rows, N)
bounds = [(s, min(s + rows, N)) for s in range(0, N, rows)]
nw = max(1, args.workers)
bufs = [np.empty((rows, M), dtype=dt) for _ in range(nw)]
slate = np.empty((N, k), dtype=np.int64)
choice = np.empty(N, dtype=np.int64)
counts = np.zeros(M, dtype=np.int64)
state = {"gen": [np.random.default_rng(100 + i) for i in range(nw)]}


def chunk_work(mode, wid, lo, hi):
    S = bufs[wid][: hi - lo]
    np.matmul(U_hat[lo:hi], V_hat, out=S)                               # (a)
    if mode == "a":
        return
    top = np.argpartition(S, M - k, axis=1)[:, M - k:]                  # (b) top-k
    sc = np.take_along_axis(S, top, axis=1)
    order = np.argsort(-sc, axis=1)
    slate[lo:hi] = np.take_along_axis(top, order, axis=1)
    if mode == "b":
        return
    sl = slate[lo:hi]                                                   # (c) choice
    util = np.einsum("nkd,nd->nk", V_true_T[sl], U_true[lo:hi])
    g = state["gen"][wid].gumbel(size=util.shape).astype(dt, copy=False)
    pick = np.argmax(util + g, axis=1)
    choice[lo:hi] = sl[np.arange(hi - lo), pick]
    # content update: move the believed profile toward the consumed item
    U_hat[lo:hi] += dt.type(0.01) * (V_true_T[choice[lo:hi]] - U_hat[lo:hi])


def one_step(mode, pool):
    if pool is None:
        for lo, hi in bounds:
            chunk_work(mode, 0, lo, hi)
    else:
        # static round-robin split: worker w owns chunks w, w+nw, ...
        def run(w):
            for lo, hi in bounds[w::nw]:
                chunk_work(mode, w, lo, hi)
        list(pool.map(run, range(nw)))
    if mode == "c":
        counts[:] += np.bincount(choice, minlength=M)


pool = ThreadPoolExecutor(nw) if nw > 1 else None
res = {"tool": "roofline", "numpy": np.__version__, "dtype": args.dtype,
       "users": N, "items": M, "attrs": d, "k": k, "steps": args.steps,
       "workers": nw, "chunk_rows": rows, "n_chunks": len(bounds)}
flops = 2.0 * N * M * d
for mode in args.modes.split(","):
    one_step(mode, pool)  # warm-up
    ts = []
    for _ in range(args.steps):
        t = time.perf_counter()
        one_step(mode, pool)
        ts.append(time.perf_counter() - t)
    med = statistics.median(ts)
    res[f"{mode}_median_s"] = round(med, 6)
    res[f"{mode}_min_s"] = round(min(ts), 6)
    if mode == "a":
        res["a_gflops"] = round(flops / med / 1e9, 1)
res["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
res["check_interactions"] = int(counts.sum())
print(json.dumps(res), flush=True)
