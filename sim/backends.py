"""Compute backends of the scoring engine: the product and the exclusion-aware top-k of one chunk.

Every backend returns the same slates: ties break by lower item id, and items that cannot be
recommended (excluded, or scored ``-inf``) come back as ``-1`` with score ``-inf``. Exclusions arrive
as a per-row list (CSR, :func:`exclusion_csr`): no dense users x items mask is ever built.

Backends (``engine.backend``):

* ``numpy``: BLAS product, then ``argpartition`` with an exact tie fix (the reference);
* ``numba``: BLAS product, then a fused one-pass top-k kernel (:mod:`recloop.sim.kernels`): per row a
  small insertion buffer, a vectorised block test against the current k-th value, and a merge-walk
  over the sorted exclusion list instead of scattering ``-inf``;
* ``torch``: ``matmul`` + ``topk`` on CPU tensors, or on CUDA when a GPU is present;
* ``cupy``: product and top-k on the GPU (imported lazily; never required);
* ``auto``: cupy / torch-CUDA when a GPU is present, else numba, else numpy.

Every product covers exactly one canonical tile of :data:`TILE_ROWS` users (:data:`GPU_TILE_ROWS` on
a GPU), padded at the end: why that makes results bit-identical is explained in
:mod:`recloop.sim.engine`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from recloop.sim import kernels
from recloop.sim.pool import parallel_rows

NEG_INF = np.float32(-np.inf)
#: users per canonical score tile on CPU backends (a BLAS call always has exactly this many rows)
TILE_ROWS = 128
#: users per canonical score tile on GPU backends (bigger products keep the device busy)
GPU_TILE_ROWS = 4096


def tile_bounds(n: int, tile: int) -> list[tuple[int, int]]:
    """Canonical tiles ``[(lo, hi), ...]`` of ``n`` rows (aligned to 0; the last may be short)."""
    return [(lo, min(lo + tile, n)) for lo in range(0, n, tile)]



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
