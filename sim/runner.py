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

import psutil
import yaml

from recloop import __version__
from recloop.errors import RecloopInputError
from recloop.sim.config import load_scenario, validate_mapping
from recloop.sim.store import RunStore, run_key

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
    from recloop.sim.model import FeedbackLoop

    store = RunStore(root)
    key = run_key(policy_name, seed)
    cfg = scenario.policy_configs()[policy_name]
    ck = store.latest_checkpoint(key) if resume else None
    t_start = time.perf_counter()
    if ck is not None:
        model = FeedbackLoop(scenario, policy_name, cfg, seed, restore=ck[1], scenario_file=scenario_file,
                             run_dir=root)
        store.drop_parts_after(key, model.t - 1)
    else:
        store.drop_parts_after(key, -1)
        model = FeedbackLoop(scenario, policy_name, cfg, seed, scenario_file=scenario_file, run_dir=root)
    setup_s = time.perf_counter() - t_start
    out = scenario.output
    buf: dict[str, list] = {c: [] for c in ("policy", "seed", "step", "metric", "group", "value")}
    first = model.t

    rss_samples: list[list[float]] = []
    proc = psutil.Process()

    def flush(last: int) -> None:
        nonlocal first
        rss_samples.append([last, round(proc.memory_info().rss / 2**20, 1)])
        if buf["step"]:
            store.write_part(key, first, last, buf)
            for v in buf.values():
                v.clear()
        first = last + 1

    while model.t < scenario.steps:
        model.step()
        t = model.t - 1
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
            store.save_checkpoint(key, done, model.state(), keep=out.keep_checkpoints)
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
    # components may report extra facts for the manifest (e.g. LLM accounting: {"llm": {...}})
    comps, seen = [model.policy], set()
    while comps:  # the policy and its stages, recursively (wrappers expose their base as a stage)
        comp = comps.pop(0)
        if id(comp) in seen:
            continue
        seen.add(id(comp))
        report = getattr(comp, "run_report", None)
        if callable(report):
            entry.update(report())
        comps.extend(getattr(comp, "stages", None) or [])
    svc = getattr(model, "llm_service", None)
    if svc is not None:
        entry["llm"] = svc.accounting
    elif scenario.llm is not None:  # an LLM scenario: runs without an LLM stage report zeros
        from recloop.recommenders.llm.service import empty_accounting

        entry.setdefault("llm", empty_accounting())
    return entry


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
    store = RunStore(root)
    manifest = manifest or store.read_manifest()
    jobs = [(p, s) for p in scenario.policy_configs() for s in scenario.seeds()]
    todo = [(p, s) for p, s in jobs if manifest["runs"].get(run_key(p, s), {}).get("status") != "complete"]
    manifest["status"] = "running"
    store.write_manifest(manifest)
    prog, update = _progress_ui(progress and workers <= 1)
    def on_done(p, s, entry):
        manifest["runs"][run_key(p, s)] = entry
        store.write_manifest(manifest)
        if progress and (workers > 1 or executor == "ray"):
            print(f"finished {run_key(p, s)}", file=sys.stderr)

    try:
        if executor == "ray":
            _execute_ray(scenario.resolved(), todo, root, resume, workers, scenario_file, on_done)
        elif workers <= 1:
            ctx = prog if prog is not None else _Null()
            with ctx:
                for p, s in todo:
                    entry = run_one(scenario, p, s, str(root), resume=resume, progress=update,
                                    scenario_file=scenario_file)
                    manifest["runs"][run_key(p, s)] = entry
                    store.write_manifest(manifest)
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                resolved = scenario.resolved()  # the dynamic pydantic model is rebuilt in each worker
                futs = {pool.submit(_run_one_resolved, resolved, p, s, str(root), resume, scenario_file): (p, s)
                        for p, s in todo}
                for fut in as_completed(futs):
                    on_done(*futs[fut], fut.result())
    except KeyboardInterrupt:
        manifest["status"] = "interrupted"
        store.write_manifest(manifest)
        raise
    except BaseException as exc:
        manifest["status"] = "failed"
        manifest["error"] = f"{type(exc).__name__}: {exc}"
        store.write_manifest(manifest)
        raise
    store.finalize_metrics()
    manifest["status"] = "complete"
    manifest["finished"] = datetime.now(timezone.utc).isoformat()
    manifest["timings"] = _aggregate(manifest["runs"])
    llm_runs = [r["llm"] for r in manifest["runs"].values() if isinstance(r.get("llm"), dict)]
    if llm_runs:
        from recloop.recommenders.llm.service import sum_accounting

        manifest["llm"] = sum_accounting(llm_runs)
    store.write_manifest(manifest)
    return manifest


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
    existed = root.exists()
    store.prepare(overwrite=overwrite)
    from recloop.sim.store import atomic_write_text

    atomic_write_text(root / "scenario.yaml", yaml.safe_dump(scenario.resolved(), sort_keys=False))
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
    store.write_manifest(manifest)
    try:
        return execute(scenario, root, resume=False, workers=workers, progress=progress, scenario_file=scenario_file,
                       manifest=manifest, executor=executor)
    except RecloopInputError:
        # bad input found while building the world (a data set, k > catalog, ...): nothing was simulated,
        # so leave no half-made run directory behind
        if not any(store.parts_dir.glob("*.parquet")) and not (root / "checkpoints").exists():
            store.remove_run_files()
            if not existed and root.is_dir() and not any(root.iterdir()):
                root.rmdir()
        raise


def resume_run(out, *, workers: int = 1, progress: bool = True, executor: str = "process") -> dict[str, Any]:
    """Continue an interrupted run from its latest checkpoints; ends identical to an uninterrupted run."""
    root = Path(out)
    store = RunStore(root)
    if not root.is_dir():
        raise RecloopInputError("no such run directory.", file=str(root))
    manifest = store.read_manifest()
    if manifest.get("status") == "complete" and (root / "metrics.parquet").exists():
        return manifest
    scen_path = root / "scenario.yaml"
    scenario = load_scenario(scen_path)
    if scenario.config_hash() != manifest.get("config_hash"):
        raise RecloopInputError("scenario.yaml no longer matches the run's config hash; it was edited after the "
                                "run started. Restore it or start a new run.", file=str(scen_path))
    return execute(scenario, root, resume=True, workers=workers, progress=progress, scenario_file=str(scen_path),
                   manifest=manifest, executor=executor)
