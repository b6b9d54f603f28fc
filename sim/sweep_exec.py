"""Executing a sweep's (cell, policy, seed) units: in this process, on a local process pool kept for the whole
sweep, or as Ray tasks (a local instance or a cluster), with one progress display and an ETA.

A unit is one ``run_one`` of the runner (checkpoints, resume): each call builds its model from the unit's
resolved scenario and the run seed alone, so a worker that ran other cells before gives the same numbers as
a fresh one. Units report finished runs to ``on_done`` in the calling process, which alone writes manifests.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from recloop.errors import RecloopInputError
from recloop.sim.config import validate_mapping
from recloop.sim.runner import run_one

#: the progress queue of a pool worker (set by the pool's initializer; None elsewhere)
_QUEUE: Any = None
_REPORT_EVERY_S = 0.2


@dataclass(frozen=True)
class UnitSpec:
    """Everything a worker needs to run one unit (picklable; the scenario as its resolved mapping)."""

    label: str  #: ``<cell_id>/<policy>__seed<N>``
    resolved: dict
    policy: str
    seed: int
    root: str  #: the cell's run directory (absolute)
    scenario_file: str


def run_unit(spec: UnitSpec, report: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Run (or resume from its checkpoints) one unit; its manifest entry, with the worker that ran it."""
    if report is None and _QUEUE is not None:
        report = _queue_reporter()
    progress = (lambda key, done, total, live: report(spec.label, done)) if report is not None else None
    scenario = validate_mapping(spec.resolved, file=spec.scenario_file)
    entry = run_one(scenario, spec.policy, spec.seed, spec.root, resume=True, progress=progress,
                    scenario_file=spec.scenario_file)
    entry["worker"] = {"host": socket.gethostname(), "pid": os.getpid()}
    return entry


def _queue_reporter() -> Callable[[str, int], None]:
    last = {"t": 0.0}

    def report(label: str, done: int) -> None:
        now = time.monotonic()
        if now - last["t"] >= _REPORT_EVERY_S:
            last["t"] = now
            _QUEUE.put((label, done))

    return report


def _init_worker(queue, threads: int) -> None:
    """A pool worker: where it reports progress, and its share of the cores (results never depend on it)."""
    global _QUEUE
    _QUEUE = queue
    if "RECLOOP_ENGINE_WORKERS" not in os.environ:
        os.environ["RECLOOP_ENGINE_WORKERS"] = str(threads)
        from recloop.sim.pool import apply_thread_budget

        apply_thread_budget(threads)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------ executors
OnDone = Callable[[UnitSpec, dict], None]
OnCycle = Callable[[str, int], None]


def execute_units(specs: list[UnitSpec], *, executor: str, workers: int, on_done: OnDone, on_cycle: OnCycle,
                  address: str | None = None) -> None:
    """Run ``specs``: ``serial`` in this process, ``process`` on a pool of ``workers`` processes kept for all
    units, ``ray`` as Ray tasks. Units that finish are reported even when another fails; then the first
    failure is raised."""
    if executor == "ray":
        _run_ray(specs, workers, address, on_done)
    elif executor == "serial":
        for spec in specs:
            on_done(spec, run_unit(spec, on_cycle))
    elif executor == "process":
        _run_pool(specs, workers, on_done, on_cycle)
    else:
        raise RecloopInputError(f"unknown executor '{executor}'; allowed: process, ray.", key="--executor")


def _run_pool(specs: list[UnitSpec], workers: int, on_done: OnDone, on_cycle: OnCycle) -> None:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no state inherited from this process
    queue = ctx.Queue()
    threads = max(1, _cores() // workers)
    error: BaseException | None = None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(queue, threads))
    try:
        futs = {pool.submit(run_unit, spec): spec for spec in specs}
        pending = set(futs)
        while pending:
            done, pending = wait(pending, timeout=_REPORT_EVERY_S, return_when=FIRST_COMPLETED)
            _drain(queue, on_cycle)
            for fut in done:
                if fut.cancelled():
                    continue
                exc = fut.exception()
                if exc is None:
                    on_done(futs[fut], fut.result())
                elif error is None:
                    error = exc
                    for other in pending:  # stop what has not started; let running units finish
                        other.cancel()
        _drain(queue, on_cycle)
    except BaseException:  # an interrupt: do not wait for running units (their files are written atomically)
        pool.shutdown(wait=False, cancel_futures=True)
        queue.close()
        raise
    pool.shutdown(wait=True)
    queue.close()
    if error is not None:
        raise error


def _drain(queue, on_cycle: OnCycle) -> None:
    while True:
        try:
            label, done = queue.get_nowait()
        except Exception:  # queue.Empty (or a queue closed under us)
            return
        on_cycle(label, done)


def _run_ray(specs: list[UnitSpec], workers: int, address: str | None, on_done: OnDone) -> None:
    """Units as Ray tasks on ``ray.init(address=...)`` or a local instance of ``workers`` CPUs. On a cluster,
    the sweep directory must be on a file system every node shares (units write their run directories)."""
    try:
        import ray
    except ImportError:
        raise RecloopInputError("executor 'ray' needs the ray extra: pip install 'recloop[ray]'.",
                                key="--executor") from None
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
    error: BaseException | None = None
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(_ray_unit)
        refs = {task.remote(spec): spec for spec in specs}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                entry = ray.get(done[0])
            except Exception as exc:  # a RayTaskError: raise what the task raised
                cause = getattr(exc, "cause", None)
                error = error or (cause if isinstance(cause, BaseException) else exc)
                for ref in pending:
                    ray.cancel(ref)
                continue
            on_done(refs[done[0]], entry)
    finally:
        if started:
            ray.shutdown()
    if error is not None:
        raise error


def _ray_unit(spec: UnitSpec) -> dict[str, Any]:
    os.environ.setdefault("RECLOOP_ENGINE_WORKERS", "1")  # a task holds one CPU
    return run_unit(spec)


# ------------------------------------------------------------------------------------------- progress
class Progress:
    """One progress bar over every cycle the sweep still has to run, with units done and an ETA."""

    def __init__(self, enabled: bool, title: str, starts: dict[str, tuple[int, int]], units_done: int,
                 units_total: int):
        self.last = {label: start for label, (start, _) in starts.items()}
        self.steps = {label: steps for label, (_, steps) in starts.items()}
        self.done, self.total_units = units_done, units_total
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("cycles  {task.fields[units]}"), TimeRemainingColumn(),
                           refresh_per_second=4, console=_console())
            total = sum(s - b for b, s in starts.values())
            self.task = self.bar.add_task(title, total=max(total, 1), units=self._units())

    def _units(self) -> str:
        return f"{self.done}/{self.total_units} runs"

    def cycle(self, label: str, done: int) -> None:
        step = done - self.last.get(label, 0)
        self.last[label] = done
        if self.bar is not None and step > 0:
            self.bar.advance(self.task, step)

    def unit_done(self, label: str) -> None:
        self.cycle(label, self.steps.get(label, 0))
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task, units=self._units())

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.stop()
        return False


def _console():
    from rich.console import Console

    return Console(file=sys.stderr)
