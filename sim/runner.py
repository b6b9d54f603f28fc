"""Run scenarios into a run directory: every (policy, seed) pair, with progress, checkpoints, resume.

All policies of a comparison start from the identical world (the world seed does not depend on the
policy) and share common random numbers (user choices are keyed by (seed, step, user, position)), so
differences between them are due to the policy alone.
"""

from __future__ import annotations

import multiprocessing
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import psutil
import yaml

from recloop import __version__
from recloop.contracts import PROVENANCE_NAMES
from recloop.errors import RecloopInputError
from recloop.sim.checkpoint import CheckpointError
from recloop.sim.config import load_scenario, validate_mapping
from recloop.sim.cross_run import cross_run_rows
from recloop.sim.llm_accounting import empty_accounting, sum_accounting
from recloop.sim.memory import release_freed_memory
from recloop.sim.model import FeedbackLoop
from recloop.sim.preflight import check_scenario
from recloop.sim.store import DiskFullError, RunStore, atomic_write_text, check_keys, is_disk_full, run_key

LIVE_METRICS = ("utility", "gini_exposure", "coverage_cum")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "recloop": __version__}
    for pkg in ("numpy", "scipy", "polars", "pydantic", "mesa", "implicit", "numba", "torch", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def summarize_timings(timings: dict[str, list[float]]) -> dict[str, float]:
    def med(name):
        xs = timings.get(name) or []
        return round(statistics.median(xs), 6) if xs else 0.0

    return {
        "cycle_s_median": med("cycle"),
        "scoring_s_median": med("scoring"),
        "metrics_s_median": med("metrics"),
        "update_s_median": med("update"),
        "retrain_s_total": round(sum(timings.get("retrain") or []), 6),
        "retrain_count": len(timings.get("retrain") or []),
        "cycles_timed": len(timings.get("cycle") or []),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def run_one(scenario, policy_name: str, seed: int, root: str, resume: bool = False, progress=None,
            scenario_file: str | None = None) -> dict[str, Any]:
    """Run (or continue) one policy under one seed; returns its manifest entry."""

    store = RunStore(root)
    key = run_key(policy_name, seed)
    cfg = scenario.policy_configs()[policy_name]
    ident = {"config_hash": scenario.config_hash(), "seed": int(seed), "policy": policy_name, "key": key}
    t_start = time.perf_counter()
    model = _restore(scenario, policy_name, seed, store, ident, scenario_file=scenario_file) if resume else None
    if model is not None:
        store.drop_parts_after(key, model.t - 1)
    else:
        store.drop_parts_after(key, -1)
        model = FeedbackLoop(scenario, policy_name, cfg, seed, scenario_file=scenario_file, run_dir=root)
    setup_s = time.perf_counter() - t_start
    out = scenario.output
    buf: dict[str, list] = {c: [] for c in ("policy", "seed", "step", "metric", "group", "value")}
    inter = InteractionBuffer(policy_name, seed, out, store.interaction_rows(key) if model.t else 0)
    tables = TableBuffer(policy_name, seed)
    first = model.t

    rss_samples: list[list[float]] = []
    proc = psutil.Process()

    def flush(last: int) -> None:
        nonlocal first
        release_freed_memory()  # RSS tracks what the run holds, not what glibc kept after frees
        rss_samples.append([last, round(proc.memory_info().rss / 2**20, 1)])
        if buf["step"]:
            store.write_part(key, first, last, buf)
            for v in buf.values():
                v.clear()
        frame = inter.take()
        if frame is not None:
            store.write_interactions_part(key, first, last, frame)
        for name, table in tables.take().items():
            store.write_table_part(name, key, first, last, table)
        first = last + 1

    while model.t < scenario.steps:
        model.step()
        t = model.t - 1
        inter.add(t, model.cycle_interactions())
        tables.add(t, model.cycle_tables())
        for m, g, v in model.last_rows:
            buf["policy"].append(policy_name)
            buf["seed"].append(seed)
            buf["step"].append(t)
            buf["metric"].append(m)
            buf["group"].append(g)
            buf["value"].append(v)
        done = model.t
        ckpt_due = out.checkpoint_every and done % out.checkpoint_every == 0 and done < scenario.steps
        if done % out.flush_every == 0 or ckpt_due or done == scenario.steps:
            flush(t)
        if ckpt_due or done == scenario.steps:
            store.save_checkpoint(key, done, model.state(), ident, keep=out.keep_checkpoints)
        if progress is not None:
            live = {m: v for m, g, v in model.last_rows if m in LIVE_METRICS and g == ""}
            progress(key, done, scenario.steps, live)
    entry = {
        "policy": policy_name,
        "seed": seed,
        "status": "complete",
        "steps_done": model.t,
        "setup_s": round(setup_s, 4),
        "timings": summarize_timings(model.timings),
        "wall_s": round(time.perf_counter() - t_start, 3),
        "rss_mb_samples": rss_samples[:: max(1, len(rss_samples) // 50)],
    }
    if inter.truncated_from is not None:
        entry["interactions_truncated_from_step"] = inter.truncated_from
    entry.update(model.run_report())  # components' and services' facts (e.g. the LLM accounting)
    if "llm" not in entry and scenario.llm is not None:  # an LLM scenario: runs without an LLM stage report zeros
        entry.setdefault("llm", empty_accounting())
    return entry


class InteractionBuffer:
    """The cycles' consumed pairs of one run until the next flush, up to ``output.interactions_max_rows``
    rows per run (the cycle that would pass the cap and all later ones are left out, and said so). Arrays
    are kept per cycle and made into one frame per flush (a frame per cycle costs ~1 ms at S)."""

    NAMES = np.array([PROVENANCE_NAMES[c] for c in sorted(PROVENANCE_NAMES)])

    def __init__(self, policy: str, seed: int, out, written: int):
        self.policy, self.seed = policy, int(seed)
        self.enabled = bool(out.interactions)
        self.room = int(out.interactions_max_rows) - written
        self.truncated_from: int | None = None
        self.parts: list[tuple[int, dict[str, np.ndarray]]] = []

    def add(self, step: int, rows: dict[str, np.ndarray]) -> None:
        n = len(rows["user"])
        if not self.enabled or self.truncated_from is not None or n == 0:
            return
        if n > self.room:
            self.truncated_from = step
            return
        self.room -= n
        self.parts.append((step, rows))

    def take(self) -> pl.DataFrame | None:
        """The buffered rows as one frame (and an empty buffer), or None when there are none."""
        if not self.parts:
            return None
        steps = np.concatenate([np.full(len(r["user"]), t, np.int64) for t, r in self.parts])

        def col(name):
            return np.concatenate([r[name] for _, r in self.parts])

        frame = pl.DataFrame({"seed": np.full(len(steps), self.seed, np.int64), "step": steps,
                              "user": col("user"), "item": col("item"), "position": col("position"),
                              "provenance": self.NAMES[col("provenance")]}).with_columns(policy=pl.lit(self.policy))
        self.parts = []
        return frame


class TableBuffer:
    """The metric components' per-cycle tables (e.g. ``similar_pairs``) of one run until the next flush."""

    def __init__(self, policy: str, seed: int):
        self.policy, self.seed = policy, int(seed)
        self.frames: dict[str, list[pl.DataFrame]] = {}

    def add(self, step: int, tables: dict[str, dict[str, np.ndarray]]) -> None:
        for name, cols in tables.items():
            n = len(next(iter(cols.values()))) if cols else 0
            if n:
                frame = pl.DataFrame({"seed": np.full(n, self.seed, np.int64), "step": np.full(n, step, np.int64),
                                      **cols}).with_columns(policy=pl.lit(self.policy))
                self.frames.setdefault(name, []).append(frame)

    def take(self) -> dict[str, pl.DataFrame]:
        out = {name: pl.concat(fs) for name, fs in self.frames.items() if fs}
        self.frames = {}
        return out


def _restore(scenario, policy_name: str, seed: int, store: RunStore, ident: dict[str, Any],
             scenario_file: str | None):
    """The model at the newest checkpoint of this run that verifies (sha256, format, config hash, seed,
    policy) and loads; older ones are tried in turn. None when the run has no complete checkpoint (it
    starts from scratch); RecloopInputError when it has some and none of them is usable."""

    problems: list[str] = []
    for ck in store.checkpoints(ident["key"]):
        try:
            state = store.load_checkpoint(ck, ident)
            # a fresh model per attempt: a failed load_state may have half-restored the previous one
            model = FeedbackLoop(scenario, policy_name, scenario.policy_configs()[policy_name], seed,
                                 restore=state, scenario_file=scenario_file, run_dir=str(store.root))
            if model.t != ck.step:
                raise CheckpointError(f"it holds cycle {model.t}, not {ck.step}")
        except (RecloopInputError, MemoryError):
            raise
        except Exception as exc:  # any failure to restore means this checkpoint does not fit this run
            if isinstance(exc, OSError) and is_disk_full(exc):
                raise
            why = str(exc) if isinstance(exc, CheckpointError) else \
                f"it does not fit this run ({type(exc).__name__}: {exc})"
            problems.append(f"{ck.json.name}: {why}")
            continue
        if problems:
            print(f"warning: {ident['key']}: skipped unusable checkpoints ({'; '.join(problems)}); resuming from "
                  f"{ck.json.name}", file=sys.stderr)
        return model
    if problems:
        raise RecloopInputError(
            f"no usable checkpoint for run {ident['key']}: {'; '.join(problems)}. Nothing was loaded. Delete that "
            "directory to rerun this run from its start with `recloop resume`, or start the whole run again "
            "with `recloop run ... --overwrite`.", file=str(store.checkpoint_dir(ident["key"])))
    return None


def _run_one_resolved(resolved: dict, policy_name: str, seed: int, root: str, resume: bool,
                      scenario_file: str | None) -> dict[str, Any]:
    return run_one(validate_mapping(resolved), policy_name, seed, root, resume=resume, scenario_file=scenario_file)


def _aggregate(runs: dict[str, dict]) -> dict[str, float]:
    ts = [r["timings"] for r in runs.values() if r.get("timings")]
    if not ts:
        return {}
    out = {}
    for name in ts[0]:
        vals = [t[name] for t in ts]
        out[name] = round(sum(vals), 6) if name in ("retrain_s_total", "retrain_count", "cycles_timed") else \
            round(statistics.median(vals), 6)
    out["peak_rss_mb"] = round(max(max(t["peak_rss_mb"] for t in ts), peak_rss_mb()), 1)
    return out


def _progress_ui(enabled: bool):
    if not enabled:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("cycles"), TimeRemainingColumn(), TextColumn("{task.fields[live]}"),
                    transient=False, refresh_per_second=4)
    tasks: dict[str, Any] = {}

    def update(key, done, total, live):
        if key not in tasks:
            tasks[key] = prog.add_task(key, total=total, live="")
        txt = "  ".join(f"{k}={v:.3g}" for k, v in live.items())
        prog.update(tasks[key], completed=done, live=txt)

    return prog, update


def _execute_ray(resolved: dict, todo, root: Path, resume: bool, workers: int, scenario_file, on_done) -> None:
    """Run (policy, seed) pairs as Ray tasks (the ``ray`` extra); results equal the serial run's."""
    try:
        import ray
    except ImportError:
        raise RecloopInputError("executor 'ray' needs the ray extra: pip install 'recloop[ray]'.",
                                key="--executor") from None
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    try:
        task = ray.remote(num_cpus=1)(_run_one_resolved)
        refs = {task.remote(resolved, p, s, str(root), resume, scenario_file): (p, s) for p, s in todo}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            on_done(*refs[done[0]], ray.get(done[0]))
    finally:
        if started:
            ray.shutdown()


def execute(scenario, root: Path, *, resume: bool, workers: int = 1, progress: bool = True,
            scenario_file: str | None = None, manifest: dict | None = None,
            executor: str = "process") -> dict[str, Any]:
    """Run every unfinished (policy, seed) pair, then merge the metrics; a full disk becomes DiskFullError."""
    store = RunStore(root)
    manifest = manifest or store.read_manifest()
    jobs = [(p, s) for p in scenario.policy_configs() for s in scenario.seeds()]
    check_keys(jobs, root)
    todo = [(p, s) for p, s in jobs if manifest["runs"].get(run_key(p, s), {}).get("status") != "complete"]
    try:
        manifest["status"] = "running"
        store.write_manifest(manifest)
        _execute_todo(scenario, store, manifest, todo, resume=resume, workers=workers, progress=progress,
                      scenario_file=scenario_file, executor=executor)
        _finish(store, manifest, scenario)
    except KeyboardInterrupt:
        _mark(store, manifest, "interrupted")
        raise
    except BaseException as exc:
        if is_disk_full(exc):
            _mark(store, manifest, "interrupted", "disk full")
            raise DiskFullError(root) from None
        _mark(store, manifest, "failed", f"{type(exc).__name__}: {exc}")
        raise
    return manifest


def _execute_todo(scenario, store: RunStore, manifest: dict, todo: list[tuple[str, int]], *, resume: bool,
                  workers: int, progress: bool, scenario_file: str | None, executor: str) -> None:
    """Run the pairs serially, in a process pool or on Ray, recording each finished run in the manifest."""
    root = store.root
    prog, update = _progress_ui(progress and workers <= 1)

    def on_done(p, s, entry):
        manifest["runs"][run_key(p, s)] = entry
        store.write_manifest(manifest)
        if progress and (workers > 1 or executor == "ray"):
            print(f"finished {run_key(p, s)}", file=sys.stderr)

    if executor == "ray":
        _execute_ray(scenario.resolved(), todo, root, resume, workers, scenario_file, on_done)
    elif workers <= 1:
        with prog if prog is not None else _Null():
            for p, s in todo:
                entry = run_one(scenario, p, s, str(root), resume=resume, progress=update, scenario_file=scenario_file)
                on_done(p, s, entry)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            resolved = scenario.resolved()  # the dynamic pydantic model is rebuilt in each worker
            futs = {pool.submit(_run_one_resolved, resolved, p, s, str(root), resume, scenario_file): (p, s)
                    for p, s in todo}
            for fut in as_completed(futs):
                on_done(*futs[fut], fut.result())


def _finish(store: RunStore, manifest: dict, scenario=None) -> None:
    """Merge the parts into metrics.parquet (and interactions.parquet), add the cross-run rows, and mark
    the run complete."""
    store.finalize_interactions()
    if scenario is None:
        scenario = load_scenario(store.root / "scenario.yaml")
    cross = cross_run_rows(store.root, scenario)
    if cross is not None:
        store.write_part("_cross", 0, 0, cross.to_dict(as_series=False))
    store.finalize_metrics()
    manifest["status"] = "complete"
    manifest.pop("error", None)
    manifest["finished"] = datetime.now(timezone.utc).isoformat()
    manifest["timings"] = _aggregate(manifest["runs"])
    llm_runs = [r["llm"] for r in manifest["runs"].values() if isinstance(r.get("llm"), dict)]
    if llm_runs:
        manifest["llm"] = sum_accounting(llm_runs)
    store.write_manifest(manifest)


def _mark(store: RunStore, manifest: dict, status: str, error: str | None = None) -> None:
    """Record how the run stopped; on a full disk the manifest may not be writable (the old one stays)."""
    manifest["status"] = status
    if error is not None:
        manifest["error"] = error
    try:
        store.write_manifest(manifest)
    except OSError as exc:
        if not is_disk_full(exc):
            raise


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def run_scenario(scenario, out, *, seed: int | None = None, steps: int | None = None, overwrite: bool = False,
                 workers: int = 1, progress: bool = True, executor: str = "process") -> dict[str, Any]:
    """Run ``scenario`` (a path or a loaded Scenario) into the run directory ``out``."""
    scenario_file = None
    if isinstance(scenario, (str, Path)):
        scenario_file = str(scenario)
        overrides = {}
        if seed is not None:
            overrides["seed"] = seed
        if steps is not None:
            overrides["steps"] = steps
        scenario = load_scenario(scenario, overrides=overrides)
    else:
        upd = {k: v for k, v in (("seed", seed), ("steps", steps)) if v is not None}
        if upd:
            scenario = validate_mapping({**scenario.resolved(), **upd})
    if workers < 1:
        raise RecloopInputError(f"--workers must be at least 1 (got {workers}).", key="--workers")
    if executor not in ("process", "ray"):
        raise RecloopInputError(f"unknown executor '{executor}'; allowed: process, ray.", key="--executor")
    root = Path(out)
    store = RunStore(root)
    check_keys([(p, s) for p in scenario.policy_configs() for s in scenario.seeds()], root)
    check_scenario(scenario, file=scenario_file)  # every check of `recloop validate`, before anything is written
    existed = root.exists()
    store.prepare(overwrite=overwrite)
    manifest = {
        "format": "recloop-run/1",
        "scenario": scenario.name,
        "scenario_file": scenario_file,
        "config_hash": scenario.config_hash(),
        "seed": scenario.seed,
        "seeds": scenario.seeds(),
        "policies": list(scenario.policy_configs()),
        "steps": scenario.steps,
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(),
        "command": sys.argv,
        "status": "running",
        "runs": {},
    }
    try:
        atomic_write_text(root / "scenario.yaml", yaml.safe_dump(scenario.resolved(), sort_keys=False))
        store.write_manifest(manifest)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        _remove_unstarted(store, existed)  # nothing ran: leave no half-made run directory
        raise DiskFullError(root) from None
    try:
        return execute(scenario, root, resume=False, workers=workers, progress=progress, scenario_file=scenario_file,
                       manifest=manifest, executor=executor)
    except RecloopInputError:
        # bad input found while building the world (a data set, k > catalog, ...): nothing was simulated,
        # so leave no half-made run directory behind
        if not store.parts() and not (root / "checkpoints").exists():
            _remove_unstarted(store, existed)
        raise


def _remove_unstarted(store: RunStore, existed: bool) -> None:
    """Remove the files of a run that never simulated anything (and its directory, if this run made it)."""
    store.remove_run_files()
    root = store.root
    if not existed and root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def resume_run(out, *, workers: int = 1, progress: bool = True, executor: str = "process") -> dict[str, Any]:
    """Continue an interrupted run from its latest checkpoints; ends identical to an uninterrupted run."""
    root = Path(out)
    store = RunStore(root)
    if not root.is_dir():
        raise RecloopInputError("no such run directory.", file=str(root))
    manifest = store.read_manifest()
    if manifest.get("status") == "complete" and (root / "metrics.parquet").exists():
        return manifest
    legacy = store.legacy_checkpoints()
    if legacy:
        raise RecloopInputError(
            f"holds {len(legacy)} checkpoint(s) in the old pickle format ({legacy[0].relative_to(root)}, ...). "
            "recloop no longer loads pickle files, because unpickling a file can run arbitrary code, so this run "
            "cannot be resumed. Start it again with `recloop run SCENARIO --out DIR --overwrite`.", file=str(root))
    scen_path = root / "scenario.yaml"
    scenario = load_scenario(scen_path)
    if scenario.config_hash() != manifest.get("config_hash"):
        raise RecloopInputError("scenario.yaml no longer matches the run's config hash; it was edited after the "
                                "run started. Restore it or start a new run.", file=str(scen_path))
    return execute(scenario, root, resume=True, workers=workers, progress=progress, scenario_file=str(scen_path),
                   manifest=manifest, executor=executor)
