"""The engine's worker pool and thread budget.

Chunks of the factor path (and row-parallel kernels, metric loops) run on one process-wide pool of
worker threads, one per core (``RECLOOP_ENGINE_WORKERS`` overrides), with BLAS pinned to one thread
per worker: on this project's 2-core machines two single-threaded products beat one 2-thread
product, by far under load. ``engine.threads`` fixes the budget of BLAS, Numba and torch outside the
pool (:func:`apply_thread_budget`); results never depend on either.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def default_workers() -> int:
    """Worker threads for chunked scoring: ``RECLOOP_ENGINE_WORKERS``, else the usable cores (max 16)."""
    env = os.environ.get("RECLOOP_ENGINE_WORKERS")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


def apply_thread_budget(threads: int) -> None:
    """Fix the process's thread budget (``engine.threads``): BLAS outside the engine's products (which
    always run on one BLAS thread per worker), Numba's parallel layer and torch's intra-op threads.

    Results do not depend on it (tested); it only keeps a run from oversubscribing the machine."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads, user_api="blas")
    except Exception:  # threadpoolctl missing or no BLAS found: run as is
        pass
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except Exception:
        pass
    torch = sys.modules.get("torch")  # only when already imported: never import torch for this
    if torch is not None:
        torch.set_num_threads(threads)


_POOL: dict[str, object] = {"pid": None, "pool": None, "size": 0, "blas": None}
_POOL_LOCK = threading.Lock()


def worker_pool(size: int) -> ThreadPoolExecutor:
    """A process-wide thread pool (recreated after fork: a child does not inherit live threads)."""
    with _POOL_LOCK:
        if _POOL["pid"] != os.getpid() or _POOL["size"] < size:
            _POOL.update(pid=os.getpid(), size=size, blas=None,
                         pool=ThreadPoolExecutor(max_workers=size, thread_name_prefix="recloop-engine"))
        return _POOL["pool"]  # type: ignore[return-value]


class _BlasOneThread:
    """Pin BLAS to one thread per worker while the pool runs (threadpoolctl), then restore."""

    def __enter__(self):
        self.ctx = None
        try:
            ctl = _POOL.get("blas")
            if ctl is None:
                from threadpoolctl import ThreadpoolController

                ctl = _POOL["blas"] = ThreadpoolController()
            self.ctx = ctl.limit(limits=1, user_api="blas")
            self.ctx.__enter__()
        except Exception:  # threadpoolctl missing or no BLAS found: run as is
            self.ctx = None
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
        return False


def parallel_rows(n: int, fn: Callable[[int, int], None], workers: int, min_rows: int = 32) -> None:
    """Run ``fn(lo, hi)`` over contiguous row blocks on the worker pool (inline for one worker).

    ``fn`` must release the GIL to gain anything (the Numba kernels do) and must not itself use the
    pool (no nesting)."""
    w = min(workers, max(1, n // min_rows))
    if w <= 1:
        fn(0, n)
        return
    cuts = np.linspace(0, n, w + 1).astype(np.int64)
    pool = worker_pool(w)
    futs = [pool.submit(fn, int(cuts[i]), int(cuts[i + 1])) for i in range(w)]
    for f in futs:
        f.result()


def blas_single_thread() -> _BlasOneThread:
    """Context manager pinning BLAS to one thread (small products: thread start-up and spinning cost
    more than they save, especially on a loaded machine)."""
    return _BlasOneThread()
