"""Chunked scoring with a fused top-k: memory is bounded by the chunk, never by users x items.

For a chunk of users the engine computes the score block (a BLAS product of factors, or a policy's
own scoring function) and keeps the k best items per row, skipping each user's excluded items
(history, when repeats are off) given as a per-row exclusion list (CSR): no dense users x items mask
is ever built. Ties break by lower item id, so every backend returns the same slates. Items that
cannot be recommended (excluded, or scored ``-inf``) come back as ``-1`` with score ``-inf``.

Backends (``engine.backend``):

* ``numpy``: BLAS product, then ``argpartition`` with an exact tie fix (the reference);
* ``numba``: BLAS product, then a fused one-pass top-k kernel (:mod:`recloop.sim.kernels`): per row a
  small insertion buffer, a vectorised block test against the current k-th value, and a merge-walk
  over the sorted exclusion list instead of scattering ``-inf``;
* ``torch``: ``matmul`` + ``topk`` on CPU tensors, or on CUDA when a GPU is present;
* ``cupy``: product and top-k on the GPU (imported lazily; never required);
* ``auto``: cupy / torch-CUDA when a GPU is present, else numba, else numpy.

Determinism: every product (and every call of a policy's scoring function) covers exactly one
**canonical tile** of :data:`TILE_ROWS` users (``GPU_TILE_ROWS`` on a GPU), aligned to the start of the
user list; the last tile is padded. A user's scores therefore come from the same BLAS call shape at the
same row position whatever the chunk size or worker count, so results are bit-identical on one machine
without relying on BLAS rounding a row the same way for every block shape. Products run with BLAS on
one thread (the engine's own workers give the parallelism), and ``on_chunk`` callbacks get canonical
batches of :data:`CALLBACK_ROWS` users. The chunk size (users per score block) is ``chunk_rows`` when
given, else ``chunk_mib`` of float32 scores (L3-friendly), rounded up to a whole number of tiles; it
sets memory and scheduling, never results, and nothing depends on the free memory.

On the factor path the chunks run on a pool of worker threads, one per core (``RECLOOP_ENGINE_WORKERS``
overrides), with BLAS pinned to one thread per worker: on this project's 2-core machines two
single-threaded products beat one 2-thread product, by far under load. Warm start: each user's previous
slate gives the Numba kernel a lower bound for the k-th score (exact; about 2.5x faster top-k).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

NEG_INF = np.float32(-np.inf)
#: callbacks (``on_chunk``) get the users in canonical batches of this many (the last one shorter),
#: whatever the score-chunk size: per-batch computations (choice, re-rankers) see the same shapes
CALLBACK_ROWS = 4096
#: users per canonical score tile on CPU backends (a BLAS call always has exactly this many rows)
TILE_ROWS = 128
#: users per canonical score tile on GPU backends (bigger products keep the device busy)
GPU_TILE_ROWS = 4096


def tile_bounds(n: int, tile: int) -> list[tuple[int, int]]:
    """Canonical tiles ``[(lo, hi), ...]`` of ``n`` rows (aligned to 0; the last may be short)."""
    return [(lo, min(lo + tile, n)) for lo in range(0, n, tile)]


def tiled_rows(fn: Callable[[np.ndarray], np.ndarray], X: np.ndarray, tile: int, out: np.ndarray) -> np.ndarray:
    """``out[r] = fn(X[tile rows])[r]`` evaluated one canonical tile at a time.

    Every call of ``fn`` gets exactly ``tile`` rows (a short last tile is padded by repeating its last
    row), so a row's result never depends on how many rows the caller passed at once."""
    n = len(X)
    for lo, hi in tile_bounds(n, tile):
        if hi - lo == tile:
            out[lo:hi] = fn(X[lo:hi])
        else:
            pad = np.concatenate([X[lo:hi], np.repeat(X[hi - 1:hi], tile - (hi - lo), axis=0)])
            out[lo:hi] = fn(pad)[: hi - lo]
    return out


# ---------------------------------------------------------------------------------------------
# reference top-k (NumPy)
# ---------------------------------------------------------------------------------------------
def topk_rows_numpy(S: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k per row with ties broken by lower column index. Returns (idx, vals), ranked."""
    return _topk_xp(np, S, k)


def _topk_xp(xp, S, k: int):
    """Top-k for an array module ``xp`` (NumPy or CuPy): argpartition, then an exact tie fix.

    Returns host (NumPy) arrays ``(idx int64, vals float32)``, ranked by (-score, item id).
    """
    n, m = S.shape
    k = min(k, m)
    if n == 0 or k == 0:
        return np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)
    if k == m:
        Sh = _to_host(xp, S)
        order = np.lexsort((np.broadcast_to(np.arange(m), Sh.shape), -Sh), axis=-1)
        return order.astype(np.int64), np.take_along_axis(Sh, order, axis=1).astype(np.float32)
    part = xp.argpartition(S, m - k, axis=1)[:, m - k:]
    vals = xp.take_along_axis(S, part, axis=1)
    thr = vals.min(axis=1)
    # rows whose k-th value is tied with an item outside the chosen set need the lowest ids
    n_ge = xp.count_nonzero(S >= thr[:, None], axis=1)
    part = _to_host(xp, part).astype(np.int64)
    vals = _to_host(xp, vals).astype(np.float32)
    thr_h = _to_host(xp, thr)
    bad = np.flatnonzero((_to_host(xp, n_ge) > k) & (thr_h > -np.inf))
    for r in bad:  # only rows with boundary ties (rare for continuous scores)
        row = _to_host(xp, S[int(r)])
        cand = np.flatnonzero(row >= thr_h[r])
        best = cand[np.lexsort((cand, -row[cand]))][:k]
        part[r] = best
        vals[r] = row[best]
    order = np.lexsort((part, -vals), axis=-1)
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)


def _to_host(xp, a):
    if xp is np:
        return np.asarray(a)
    return xp.asnumpy(a)


def _finish(idx: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-inf scores mean "not recommendable": their slot is -1."""
    idx = np.where(np.isneginf(vals), -1, idx).astype(np.int64, copy=False)
    return idx, vals.astype(np.float32, copy=False)


def _excl_rows(ex_ptr: np.ndarray, ex_idx: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.repeat(np.arange(len(ex_ptr) - 1, dtype=np.int64), np.diff(ex_ptr))
    keep = (ex_idx < m) & (ex_idx >= 0)
    return rows[keep], ex_idx[keep]


EMPTY_I64 = np.zeros(0, np.int64)


def exclusion_csr(exclude, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-row excluded items for ``ids`` as CSR ``(ptr, items)`` (unsorted, duplicates allowed).

    ``exclude`` has ``rows_csr(ids)`` (fast path, e.g. :class:`History`) or ``pairs(ids) -> (rows,
    items)``; None means nothing is excluded.
    """
    if exclude is None:
        return None
    n = len(ids)
    f = getattr(exclude, "rows_csr", None)
    if f is not None:
        ptr, items = f(ids)
        return np.asarray(ptr, np.int64), np.asarray(items, np.int64)
    r, c = exclude.pairs(ids)
    r = np.asarray(r, np.int64)
    c = np.asarray(c, np.int64)
    if len(r) == 0:
        return np.zeros(n + 1, np.int64), EMPTY_I64
    if len(r) > 1 and not bool(np.all(r[1:] >= r[:-1])):
        order = np.argsort(r, kind="stable")
        r, c = r[order], c[order]
    ptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(r, minlength=n), out=ptr[1:])
    return ptr, c


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------
@dataclass
class Backend:
    """A compute backend (NumPy reference): the product and the top-k of one chunk.

    ``prepare`` turns the item side (factors, bias) into the backend's form once per call;
    ``score_topk`` scores a chunk of user factors against it and returns host arrays.
    """

    name: str = "numpy"
    device: str = "cpu"
    gpu: bool = False
    workers: int = 1  # set by the engine: threads for row-parallel kernels
    tile_rows: int = TILE_ROWS  # canonical rows per product (see the module docstring)

    # -- generic (host) score blocks ---------------------------------------------------------
    def matmul(self, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return np.matmul(a, b, out=out)

    #: chunks may run on the engine's worker threads (BLAS pinned to one thread each)
    poolable: ClassVar[bool] = True

    #: whether ``topk`` uses ``hint`` (items expected near the top of each row) to skip work
    uses_hints: ClassVar[bool] = False

    def topk(self, S: np.ndarray, k: int, excl=None, serial: bool = False,
             hint=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of a host score block ``S`` (rows, m) with an optional exclusion CSR; may write S.

        ``serial``: the caller is one of several worker threads (no nested parallelism). ``hint``:
        optional (rows, h) item ids expected near the top (the result never depends on it)."""
        if excl is not None and len(excl[1]):
            if not S.flags.writeable:
                S = S.copy()
            r, c = _excl_rows(excl[0], excl[1], S.shape[1])
            S[r, c] = NEG_INF
        return _finish(*topk_rows_numpy(S, k))

    # -- factor fast path ----------------------------------------------------------------------
    def prepare(self, V: np.ndarray, bias: np.ndarray | None):
        VT = np.ascontiguousarray(np.asarray(V, np.float32).T)
        b = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        return VT, b

    def product(self, prep, U: np.ndarray, S: np.ndarray) -> np.ndarray:
        """``S = U @ VT (+ b)`` one canonical tile at a time (identical rows whatever len(U))."""
        VT, b = prep
        T = self.tile_rows
        for lo, hi in tile_bounds(U.shape[0], T):
            if hi - lo == T:
                self.matmul(U[lo:hi], VT, out=S[lo:hi])
            else:
                pad = np.zeros((T, U.shape[1]), np.float32)
                pad[: hi - lo] = U[lo:hi]
                S[lo:hi] = self.matmul(pad, VT)[: hi - lo]
        if b is not None:
            S += b
        return S

    def score_topk(self, prep, U: np.ndarray, k: int, excl, buf: np.ndarray, serial: bool = False, hint=None):
        S = self.product(prep, U, buf[: U.shape[0]])
        return self.topk(S, k, excl, serial, hint)

    def free_bytes(self) -> int | None:
        return None


class NumbaBackend(Backend):
    """BLAS product, then the fused top-k kernel (rows in parallel, exclusion by merge-walk)."""

    def __init__(self):
        super().__init__("numba")
        from recloop.sim import kernels

        if not kernels.HAVE_NUMBA:
            raise ImportError("numba is not importable")
        self.k = kernels

    uses_hints = True

    def topk(self, S, k, excl=None, serial=False, hint=None):
        n = S.shape[0]
        k = min(k, S.shape[1])
        if excl is None:
            excl = (np.zeros(n + 1, np.int64), EMPTY_I64)
        if hint is None or hint.shape[0] != n:
            hint = np.full((n, 0), -1, np.int32)
        hint = np.ascontiguousarray(hint, dtype=np.int32)
        S = np.ascontiguousarray(S, dtype=np.float32)
        out_i = np.empty((n, k), np.int64)
        out_v = np.empty((n, k), np.float32)
        if n and k:
            ptr, ex = excl

            def rows(lo, hi):
                self.k.topk_rows(S[lo:hi], k, ptr[lo:hi + 1], ex, hint[lo:hi], out_i[lo:hi], out_v[lo:hi])

            if serial:
                rows(0, n)
            else:  # threads only pay off for a few million scores
                parallel_rows(n, rows, self.workers, min_rows=max(32, 2_000_000 // max(S.shape[1], 1)))
        return out_i, out_v


class TorchBackend(Backend):
    """torch ``matmul`` + ``topk`` (CPU tensors, or CUDA), with the exact tie fix."""

    def __init__(self, device: str | None = None):
        import torch

        self.torch = torch
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__("torch", device=device, gpu=device.startswith("cuda"))
        self.poolable = False  # torch has its own intra-op threads
        if self.gpu:
            self.tile_rows = GPU_TILE_ROWS

    def _topk_tensor(self, S, k: int):
        torch = self.torch
        n, m = S.shape
        k = min(k, m)
        if n == 0 or k == 0:
            return np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)
        vals, idx = torch.topk(S, k, dim=1, largest=True, sorted=True)
        thr = vals[:, -1]
        n_ge = (S >= thr[:, None]).sum(dim=1)
        bad = ((n_ge > k) & torch.isfinite(thr)).nonzero().flatten()
        idx = idx.cpu().numpy().astype(np.int64)
        vals = vals.cpu().numpy().astype(np.float32)
        if len(bad):
            thr_h = thr.cpu().numpy()
            for r in bad.cpu().numpy():
                row = S[int(r)].cpu().numpy()
                cand = np.flatnonzero(row >= thr_h[r])
                best = cand[np.lexsort((cand, -row[cand]))][:k]
                idx[r] = best
                vals[r] = row[best]
        order = np.lexsort((idx, -vals), axis=-1)
        return _finish(np.take_along_axis(idx, order, axis=1), np.take_along_axis(vals, order, axis=1))

    def _mask(self, S, excl):
        if excl is not None and len(excl[1]):
            r, c = _excl_rows(excl[0], excl[1], S.shape[1])
            torch = self.torch
            S[torch.from_numpy(r).to(S.device), torch.from_numpy(c).to(S.device)] = float("-inf")

    def topk(self, S, k, excl=None, serial=False, hint=None):
        torch = self.torch
        if not S.flags.writeable:
            S = S.copy()
        St = torch.from_numpy(np.ascontiguousarray(S, dtype=np.float32)).to(self.device)
        self._mask(St, excl)
        return self._topk_tensor(St, k)

    def prepare(self, V, bias):
        torch = self.torch
        VT = torch.from_numpy(np.ascontiguousarray(np.asarray(V, np.float32).T)).to(self.device)
        b = None
        if bias is not None:
            b = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32)).to(self.device)
        return VT, b

    def score_topk(self, prep, U, k, excl, buf, serial=False, hint=None):
        torch = self.torch
        VT, b = prep
        Ut = torch.from_numpy(U).to(self.device)
        n, T = U.shape[0], self.tile_rows
        S = torch.empty((n, VT.shape[1]), dtype=torch.float32, device=self.device) if self.gpu \
            else torch.from_numpy(buf[:n])
        for lo, hi in tile_bounds(n, T):  # canonical tiles: a row's scores never depend on the chunk
            blk = Ut[lo:hi]
            if hi - lo < T:
                blk = torch.cat([blk, blk.new_zeros((T - (hi - lo), blk.shape[1]))])
            S[lo:hi] = (blk @ VT)[: hi - lo]
        if b is not None:
            S += b
        self._mask(S, excl)
        return self._topk_tensor(S, k)

    def free_bytes(self):
        if self.gpu:
            return int(self.torch.cuda.mem_get_info()[0])
        return None


class CupyBackend(Backend):
    """CuPy product and top-k on the GPU (argpartition + exact tie fix); results come back to host."""

    def __init__(self, xp=None):
        if xp is None:
            import cupy as xp  # noqa: F811
        self.xp = xp
        super().__init__("cupy", device="cuda", gpu=xp is not np)
        self.poolable = False
        self.tile_rows = GPU_TILE_ROWS if self.gpu else TILE_ROWS

    def topk(self, S, k, excl=None, serial=False, hint=None):
        xp = self.xp
        Sd = xp.array(np.ascontiguousarray(S, dtype=np.float32))
        return self._topk_dev(Sd, k, excl)

    def _topk_dev(self, Sd, k, excl):
        xp = self.xp
        if excl is not None and len(excl[1]):
            r, c = _excl_rows(excl[0], excl[1], Sd.shape[1])
            Sd[xp.asarray(r), xp.asarray(c)] = -np.inf
        return _finish(*_topk_xp(xp, Sd, k))

    def prepare(self, V, bias):
        xp = self.xp
        VT = xp.asarray(np.ascontiguousarray(np.asarray(V, np.float32).T))
        b = None if bias is None else xp.asarray(np.asarray(bias, np.float32))
        return VT, b

    def score_topk(self, prep, U, k, excl, buf, serial=False, hint=None):
        xp = self.xp
        VT, b = prep
        Ud = xp.asarray(U)
        n, T = U.shape[0], self.tile_rows
        S = xp.empty((n, VT.shape[1]), dtype=xp.float32)
        for lo, hi in tile_bounds(n, T):  # canonical tiles: a row's scores never depend on the chunk
            blk = Ud[lo:hi]
            if hi - lo < T:
                blk = xp.concatenate([blk, xp.zeros((T - (hi - lo), blk.shape[1]), dtype=blk.dtype)])
            S[lo:hi] = (blk @ VT)[: hi - lo]
        if b is not None:
            S += b
        return self._topk_dev(S, k, excl)

    def free_bytes(self):
        if self.gpu:
            return int(self.xp.cuda.runtime.memGetInfo()[0])
        return None


# ---------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------
def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def nvidia_present() -> bool:
    """A cheap check for an NVIDIA GPU (no CUDA library import)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.isdir("/proc/driver/nvidia/gpus")


def _cupy_usable() -> bool:
    if not (_has_module("cupy") and nvidia_present()):
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _torch_cuda_usable() -> bool:
    if not (_has_module("torch") and nvidia_present()):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _numba_usable() -> bool:
    from recloop.sim import kernels

    return kernels.HAVE_NUMBA


def available_backends() -> list[str]:
    """Backends that can run here (``torch`` counts when importable, on CPU or CUDA)."""
    out = ["numpy"]
    if _numba_usable():
        out.append("numba")
    if _has_module("torch"):
        out.append("torch")
    if _cupy_usable():
        out.append("cupy")
    return out


def resolve_backend_name(name: str = "auto") -> str:
    if name != "auto":
        return name
    if _cupy_usable():
        return "cupy"
    if _torch_cuda_usable():
        return "torch"
    if _numba_usable():
        return "numba"
    return "numpy"


def make_backend(name: str = "auto") -> Backend:
    """Resolve a backend name (``auto``: cupy/torch-CUDA with a GPU, else numba, else numpy)."""
    name = resolve_backend_name(name)
    try:
        if name == "numpy":
            return Backend("numpy")
        if name == "numba":
            return NumbaBackend()
        if name == "torch":
            return TorchBackend()
        if name == "cupy":
            return CupyBackend()
    except ImportError as exc:
        raise ValueError(f"engine backend {name!r} is not usable here ({exc}); available: "
                         f"{available_backends()}") from None
    raise ValueError(f"unknown backend {name!r}; available: {available_backends()}")


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


def _worker_pool(size: int) -> ThreadPoolExecutor:
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
    pool = _worker_pool(w)
    futs = [pool.submit(fn, int(cuts[i]), int(cuts[i + 1])) for i in range(w)]
    for f in futs:
        f.result()


def blas_single_thread() -> _BlasOneThread:
    """Context manager pinning BLAS to one thread (small products: thread start-up and spinning cost
    more than they save, especially on a loaded machine)."""
    return _BlasOneThread()


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
class ScoringEngine:
    """Chunked users x items scoring with a fused, exclusion-aware top-k.

    With several cores, the chunks of the BLAS fast path run on a pool of worker threads (one per
    core, BLAS pinned to one thread each; the product and the Numba top-k release the GIL), while the
    calling thread runs the ``on_chunk`` callbacks (choice) on finished batches, in user order.
    """

    #: default score-block size on a GPU (bigger blocks keep the device busy)
    GPU_CHUNK_MIB = 256.0

    def __init__(self, backend: str = "auto", chunk_rows: int | None = None, chunk_mib: float = 16.0,
                 workers: int | None = None):
        self.backend = make_backend(backend)
        self.backend_name = self.backend.name
        self.chunk_rows = chunk_rows
        self.chunk_mib = chunk_mib
        self.workers = default_workers() if workers is None else max(1, int(workers))
        self.backend.workers = self.workers
        apply_thread_budget(self.workers)
        #: warm start: each user's previous slate (per kind of call) seeds a lower bound for the next
        #: top-k (exact: the bound is recomputed from the current scores); turned off, results are equal
        self.warm_start = True
        self._prev: dict[tuple, np.ndarray] = {}
        self._bufs: dict[int, np.ndarray] = {}  # per-thread score blocks (see _buffer)

    def _buffer(self, rows: int, n_items: int) -> np.ndarray:
        """This thread's score block, reused from call to call (with headroom for a growing catalog):
        a fresh block per cycle made glibc keep freed blocks around, a step in RSS that never went."""
        need = rows * n_items
        me = threading.get_ident()
        buf = self._bufs.get(me)
        if buf is None or buf.size < need:
            buf = self._bufs[me] = np.empty(need + need // 4, np.float32)
        return buf[:need].reshape(rows, n_items)

    def buffer_bytes(self) -> int:
        """Bytes held in reusable score blocks (one per thread that scored; bounded by the chunk)."""
        return sum(b.nbytes for b in list(self._bufs.values()))

    def rows_per_chunk(self, n_items: int) -> int:
        """Users per score block: ``chunk_rows``, else ``chunk_mib`` of float32, rounded up to whole
        canonical tiles (the chunk size sets memory and scheduling, never results)."""
        T = self.backend.tile_rows
        if self.chunk_rows:
            rows = int(self.chunk_rows)
        else:
            mib = self.chunk_mib
            if self.backend.gpu and mib == 16.0:
                mib = self.GPU_CHUNK_MIB
            rows = max(1, int(mib * 2**20 // (4 * max(n_items, 1))))
        return -(-rows // T) * T

    def chunks(self, n: int, n_items: int) -> Iterator[slice]:
        step = self.rows_per_chunk(n_items)
        for lo in range(0, n, step):
            yield slice(lo, min(lo + step, n))

    def _hints(self, key, users: np.ndarray, kk: int):
        """Per-user previous slates for the chunk (-1 where unknown), or None."""
        prev = self._prev.get(key)
        if prev is None or not self.warm_start:
            return None
        inside = users < len(prev)
        if inside.all():
            return prev[users]
        out = np.full((len(users), kk), -1, np.int32)
        out[inside] = prev[users[inside]]
        return out

    def _remember(self, key, users: np.ndarray, out_i: np.ndarray, kk: int) -> None:
        if not (self.warm_start and self.backend.uses_hints) or len(users) == 0 or kk == 0:
            return
        prev = self._prev.get(key)
        need = int(users.max()) + 1
        if prev is None or len(prev) < need:
            grown = np.full((max(need, 2 * len(prev)) if prev is not None else need, kk), -1, np.int32)
            if prev is not None:
                grown[: len(prev)] = prev
            prev = self._prev[key] = grown
        prev[users] = out_i[:, :kk]

    def _run(self, users, k, n_items, chunk_fn, exclude, on_chunk, pooled: bool = False, key=None):
        """Chunk loop: ``chunk_fn(ids, kk, excl, buf, serial, hint) -> (idx, vals)`` per chunk."""
        users = np.asarray(users, dtype=np.int64)
        n = len(users)
        kk = min(k, n_items)
        # not keyed by n_items: a growing catalog would leave one (users x k) table behind per cycle;
        # hints from a smaller catalog stay valid (the kernel skips ids >= n_items; results are exact)
        key = None if key is None or not self.backend.uses_hints else (*key, kk)
        out_i = np.full((n, k), -1, dtype=np.int64)
        out_s = np.full((n, k), NEG_INF, dtype=np.float32)
        step = self.rows_per_chunk(n_items)
        bounds = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
        state = {"cb_lo": 0}

        def callback(hi):
            """Hand finished users to ``on_chunk`` in canonical batches [j*CALLBACK_ROWS, ...)."""
            if on_chunk is None:
                return
            while state["cb_lo"] < hi and (hi - state["cb_lo"] >= CALLBACK_ROWS or hi == n):
                sl = slice(state["cb_lo"], min(state["cb_lo"] + CALLBACK_ROWS, hi))
                on_chunk(sl, out_i[sl], out_s[sl])
                state["cb_lo"] = sl.stop

        def do_chunk(lo, hi, buf, serial):
            ids = users[lo:hi]
            if kk > 0:
                hint = None if key is None else self._hints(key, ids, kk)
                idx, vals = chunk_fn(ids, kk, exclusion_csr(exclude, ids), buf, serial, hint)
                out_i[lo:hi, :kk] = idx
                out_s[lo:hi, :kk] = vals

        n_workers = min(self.workers, len(bounds))
        if not (pooled and self.backend.poolable and n_workers > 1):
            buf = None if self.backend.gpu else self._buffer(min(step, max(n, 1)), n_items)
            for lo, hi in bounds:
                with _BlasOneThread():  # products on one BLAS thread: results never depend on the core count
                    do_chunk(lo, hi, buf, False)
                callback(hi)
            if key is not None:
                self._remember(key, users, out_i, kk)
            return out_i, out_s

        done = [threading.Event() for _ in bounds]
        errors: list[BaseException] = []
        counter = itertools.count()

        def worker():
            buf = self._buffer(min(step, n), n_items)
            while not errors:
                i = next(counter)  # dynamic scheduling: a slowed worker simply takes fewer chunks
                if i >= len(bounds):
                    return
                try:
                    do_chunk(*bounds[i], buf, True)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                    errors.append(exc)
                finally:
                    done[i].set()

        pool = _worker_pool(n_workers)
        with _BlasOneThread():
            futs = [pool.submit(worker) for _ in range(n_workers)]
            try:
                for i, (_, hi) in enumerate(bounds):
                    done[i].wait()
                    if errors:
                        break
                    callback(hi)
            except BaseException as exc:
                errors.append(exc)
                raise
            finally:
                for f in futs:
                    f.result()
        if errors:
            raise errors[0]
        if key is not None:
            self._remember(key, users, out_i, kk)
        return out_i, out_s

    def topk(
        self,
        users: np.ndarray,
        k: int,
        n_items: int,
        score_chunk: Callable[[np.ndarray], np.ndarray],
        exclude=None,
        on_chunk: Callable[[slice, np.ndarray, np.ndarray], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items for ``users``; ``score_chunk(user_ids) -> (rows, n_items)`` float32 scores.

        ``exclude`` is any object with ``rows_csr(user_ids)`` or ``pairs(user_ids) -> (rows, items)``
        (e.g. :class:`History`). ``on_chunk(sl, items, scores)`` runs after each batch of users (at
        least :data:`CALLBACK_ROWS` at a time, in order) with their final slates: fused choice,
        streaming metrics. Policies' scoring functions run on the calling thread.
        """

        def scores(ids):
            S = np.asarray(score_chunk(ids))
            if S.shape != (len(ids), n_items):
                raise ValueError(f"a policy's score function returned shape {S.shape} for {len(ids)} users "
                                 f"and {n_items} items; expected ({len(ids)}, {n_items})")
            return S

        def chunk_fn(ids, kk, excl, buf, serial, hint):
            S = buf[: len(ids)] if buf is not None else np.empty((len(ids), n_items), np.float32)
            tiled_rows(scores, ids, self.backend.tile_rows, S)  # canonical tiles, whatever the chunk
            return self.backend.topk(S, kk, excl, serial, hint)

        return self._run(users, k, n_items, chunk_fn, exclude, on_chunk, key=("scores",))

    def topk_factors(
        self,
        users: np.ndarray,
        k: int,
        user_factors: np.ndarray,
        item_factors: np.ndarray,
        item_bias: np.ndarray | None = None,
        exclude=None,
        on_chunk=None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of <U_u, V_i> (+ b_i): the BLAS fast path, on the worker pool when there is one."""
        n_items = item_factors.shape[0]
        prep = self.backend.prepare(item_factors, item_bias)

        def chunk_fn(ids, kk, excl, buf, serial, hint):
            U = np.ascontiguousarray(user_factors[ids], dtype=np.float32)
            return self.backend.score_topk(prep, U, kk, excl, buf, serial, hint)

        return self._run(users, k, n_items, chunk_fn, exclude, on_chunk, pooled=True,
                         key=("factors", user_factors.shape[1], item_bias is None))

    def random_topk(self, users: np.ndarray, m: int, n_items: int, key, exclude=None) -> np.ndarray:
        """``m`` random distinct items per user: the top-m of hashed uniform scores
        ``hash_uniform(key, user, item)`` (float32; ties by lower id), skipping excluded items.

        Identical on every backend and chunking; with Numba the scores are never materialised.
        """
        from recloop.sim import kernels
        from recloop.sim.rng import hash_uniform

        users = np.asarray(users, np.int64)
        if not kernels.HAVE_NUMBA:
            items = np.arange(n_items)[None, :]
            return self.topk(users, m, n_items,
                             lambda ids: hash_uniform(key, ids[:, None], items, dtype=np.float32),
                             exclude=exclude)[0]
        n = len(users)
        kk = min(m, n_items)
        out = np.full((n, m), -1, np.int64)
        ov = np.empty((n, kk), np.float32)
        oi = np.empty((n, kk), np.int64)
        step = max(1, min(n, 65536))
        key = np.uint64(key)
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            ids = users[lo:hi]
            excl = exclusion_csr(exclude, ids)
            if excl is None:
                excl = (np.zeros(len(ids) + 1, np.int64), EMPTY_I64)
            ptr, ex = excl

            def rows(a, b, ids=ids, ptr=ptr, ex=ex, lo=lo):
                kernels.hash_topk(key, ids[a:b], n_items, kk, ptr[a:b + 1], ex, oi[lo + a:lo + b],
                                  ov[lo + a:lo + b])

            parallel_rows(len(ids), rows, self.workers)
        out[:, :kk] = oi
        return out
