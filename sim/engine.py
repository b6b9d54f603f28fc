"""Chunked scoring with a fused top-k: memory is bounded by the chunk, never by users x items.

For a chunk of users the engine computes the score block (a BLAS product of factors, or a policy's
own scoring function) and keeps the k best items per row, skipping each user's excluded items
(history, when repeats are off) given as a per-row exclusion list (CSR): no dense users x items mask
is ever built. Ties break by lower item id, so every backend returns the same slates. Items that
cannot be recommended (excluded, or scored ``-inf``) come back as ``-1`` with score ``-inf``.

The backends (``engine.backend``: numpy, numba, torch, cupy, auto) are in :mod:`recloop.sim.backends`,
the worker pool and thread budget in :mod:`recloop.sim.pool`.

Determinism: every product (and every call of a policy's scoring function) covers exactly one
**canonical tile** of :data:`~recloop.sim.backends.TILE_ROWS` users (``GPU_TILE_ROWS`` on a GPU),
aligned to the start of the user list; the last tile is padded. A user's scores therefore come from the
same BLAS call shape at the same row position whatever the chunk size or worker count, so results are
bit-identical on one machine without relying on BLAS rounding a row the same way for every block shape.
Products run with BLAS on one thread (the engine's own workers give the parallelism), and ``on_chunk``
callbacks get canonical batches of :data:`CALLBACK_ROWS` users. The chunk size (users per score block)
is ``chunk_rows`` when given, else ``chunk_mib`` of float32 scores (L3-friendly), rounded up to a whole
number of tiles; it sets memory and scheduling, never results, and nothing depends on the free memory.

On the factor path the chunks run on a pool of worker threads, one per core (``RECLOOP_ENGINE_WORKERS``
overrides), with BLAS pinned to one thread per worker: on this project's 2-core machines two
single-threaded products beat one 2-thread product, by far under load. Warm start: each user's previous
slate gives the Numba kernel a lower bound for the k-th score (exact; about 2.5x faster top-k).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator

import numpy as np

from recloop.rng import hash_uniform
from recloop.sim import kernels
from recloop.sim.backends import (
    EMPTY_I64,
    NEG_INF,
    exclusion_csr,
    make_backend,
    tile_bounds,
)
from recloop.sim.pool import apply_thread_budget, blas_single_thread, default_workers, parallel_rows, worker_pool

#: callbacks (``on_chunk``) get the users in canonical batches of this many (the last one shorter),
#: whatever the score-chunk size: per-batch computations (choice, re-rankers) see the same shapes
CALLBACK_ROWS = 4096


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


class _CallbackBatches:
    """Hands finished users to ``on_chunk`` in canonical batches [j*CALLBACK_ROWS, ...), in order."""

    def __init__(self, on_chunk, out_i: np.ndarray, out_s: np.ndarray):
        self.on_chunk, self.out_i, self.out_s = on_chunk, out_i, out_s
        self.n = len(out_i)
        self.lo = 0

    def __call__(self, hi: int) -> None:
        if self.on_chunk is None:
            return
        while self.lo < hi and (hi - self.lo >= CALLBACK_ROWS or hi == self.n):
            sl = slice(self.lo, min(self.lo + CALLBACK_ROWS, hi))
            self.on_chunk(sl, self.out_i[sl], self.out_s[sl])
            self.lo = sl.stop


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
        callback = _CallbackBatches(on_chunk, out_i, out_s)

        def do_chunk(lo, hi, buf, serial):
            ids = users[lo:hi]
            if kk > 0:
                hint = None if key is None else self._hints(key, ids, kk)
                idx, vals = chunk_fn(ids, kk, exclusion_csr(exclude, ids), buf, serial, hint)
                out_i[lo:hi, :kk] = idx
                out_s[lo:hi, :kk] = vals

        n_workers = min(self.workers, len(bounds))
        if pooled and self.backend.poolable and n_workers > 1:
            self._run_pooled(bounds, do_chunk, callback, n_workers, min(step, n), n_items)
        else:
            buf = None if self.backend.gpu else self._buffer(min(step, max(n, 1)), n_items)
            with blas_single_thread():  # once per call, as on the pool: results never depend on the core count
                for lo, hi in bounds:
                    do_chunk(lo, hi, buf, False)
                    callback(hi)
        if key is not None:
            self._remember(key, users, out_i, kk)
        return out_i, out_s

    def _run_pooled(self, bounds, do_chunk, callback, n_workers: int, rows: int, n_items: int) -> None:
        """Run ``do_chunk`` over ``bounds`` on the worker pool while this thread hands finished chunks,
        in user order, to ``callback``; the first error of any worker is re-raised here."""
        done = [threading.Event() for _ in bounds]
        errors: list[BaseException] = []
        counter = itertools.count()

        def worker():
            buf = self._buffer(rows, n_items)
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

        pool = worker_pool(n_workers)
        with blas_single_thread():
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
