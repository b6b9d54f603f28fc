"""In-process roofline: modes (a) and (c) of the peers' ``roofline.py``, callable from the benchmark.

Adapted from the project's peer reference /work/shared/peers/roofline.py (copied unchanged as
``bench/roofline.py``); the work per step is the same:

  (a) matmul  : scores = U_hat (N x d) @ V_hat (d x M), float32, row-chunked (``chunk_mib`` per block)
  (c) + top-k : ``np.argpartition`` per chunk, sort the k winners (ranked slate); + choice: each
                user's true utility for its k items (gather + einsum, N*k*d), multinomial-logit choice
                by Gumbel-max, an interaction histogram and an O(N*d) content-profile update.

``workers=2`` runs chunks on a 2-thread pool with BLAS pinned to one thread per worker (roofline.py
sets the environment before importing NumPy; here threadpoolctl does it for the duration of the run);
``workers=1`` leaves BLAS threading at its default. Each mode: one warm-up step, then ``steps`` timed
steps; the median per-step seconds are returned.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _blas_limit(workers: int):
    if workers <= 1:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def roofline(users: int, items: int, attrs: int = 32, k: int = 10, steps: int = 3, workers: int = 1,
             chunk_mib: float = 8.0, modes: str = "a,c", seed: int = 0) -> dict:
    N, M, d = users, items, attrs
    dt = np.dtype(np.float32)
    rng = np.random.default_rng(seed)
    U_hat = rng.standard_normal((N, d), dtype=np.float32)
    V_hat = rng.standard_normal((d, M), dtype=np.float32)
    U_true = rng.standard_normal((N, d), dtype=np.float32)
    V_true_T = np.ascontiguousarray(V_hat.T) + np.float32(0.1) * rng.standard_normal((M, d), dtype=np.float32)
    rows = max(k + 1, int(chunk_mib * 2**20 // (M * dt.itemsize)))
    rows = min(rows, N)
    bounds = [(s, min(s + rows, N)) for s in range(0, N, rows)]
    nw = max(1, workers)
    bufs = [np.empty((rows, M), dtype=dt) for _ in range(nw)]
    slate = np.empty((N, k), dtype=np.int64)
    choice = np.empty(N, dtype=np.int64)
    counts = np.zeros(M, dtype=np.int64)
    gens = [np.random.default_rng(100 + i) for i in range(nw)]

    def chunk_work(mode, wid, lo, hi):
        S = bufs[wid][: hi - lo]
        np.matmul(U_hat[lo:hi], V_hat, out=S)  # (a)
        if mode == "a":
            return
        top = np.argpartition(S, M - k, axis=1)[:, M - k:]  # (b) top-k
        sc = np.take_along_axis(S, top, axis=1)
        order = np.argsort(-sc, axis=1)
        slate[lo:hi] = np.take_along_axis(top, order, axis=1)
        if mode == "b":
            return
        sl = slate[lo:hi]  # (c) choice
        util = np.einsum("nkd,nd->nk", V_true_T[sl], U_true[lo:hi])
        g = gens[wid].gumbel(size=util.shape).astype(dt, copy=False)
        pick = np.argmax(util + g, axis=1)
        choice[lo:hi] = sl[np.arange(hi - lo), pick]
        U_hat[lo:hi] += np.float32(0.01) * (V_true_T[choice[lo:hi]] - U_hat[lo:hi])

    def one_step(mode, pool):
        if pool is None:
            for lo, hi in bounds:
                chunk_work(mode, 0, lo, hi)
        else:
            def run(w):
                for lo, hi in bounds[w::nw]:
                    chunk_work(mode, w, lo, hi)

            list(pool.map(run, range(nw)))
        if mode == "c":
            counts[:] += np.bincount(choice, minlength=M)

    res = {"users": N, "items": M, "attrs": d, "k": k, "steps": steps, "workers": nw, "chunk_rows": rows,
           "n_chunks": len(bounds)}
    pool = ThreadPoolExecutor(nw) if nw > 1 else None
    try:
        with _blas_limit(nw):
            for mode in modes.split(","):
                one_step(mode, pool)  # warm-up
                ts = []
                for _ in range(steps):
                    t = time.perf_counter()
                    one_step(mode, pool)
                    ts.append(time.perf_counter() - t)
                res[f"{mode}_median_s"] = round(statistics.median(ts), 6)
                res[f"{mode}_min_s"] = round(min(ts), 6)
                if mode == "a":
                    res["a_gflops"] = round(2.0 * N * M * d / statistics.median(ts) / 1e9, 1)
    finally:
        if pool is not None:
            pool.shutdown()
    return res
