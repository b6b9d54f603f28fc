"""Sweeps: every cell x policy x seed of a study (:mod:`recloop.sim.study`), resumable, on a local process pool
or a Ray cluster.

```
DIR/sweep.json                       study name, baseline, factors with levels, seeds, policies, cells
                                     ({id, factors, run_dir, status, units: {<policy>__seed<N>: status, ...}}),
                                     fingerprint, status, timings
DIR/study.yaml                       the resolved study (`recloop sweep DIR/study.yaml --out DIR` resumes)
DIR/cells/<cell_id>/                 each cell's run directory (scenario.yaml, manifest.json, metrics.parquet,
                                     checkpoints/): `recloop report`, `recloop plot` and `recloop resume` read it
DIR/metrics/<cell_id>/part-<policy>__seed<N>.parquet
                                     the run-store columns (policy, seed, step, metric, group, value), `cell`,
                                     and one column per factor named by its dotted key (`retrain.every`)
```

``pl.scan_parquet("DIR/metrics/**/*.parquet")`` (or DuckDB's ``read_parquet``) reads the whole study lazily:
every part has the same columns and dtypes (a factor's column is Int64, Float64, Boolean or String in every
cell; blocks and lists as JSON text), and cell folders never contain '=' so no reader takes them for Hive
partitions. A unit's part appears when the unit completes. Running the same command again resumes: finished
units are skipped, interrupted ones continue from their checkpoints; another study in DIR is refused (exit 2)
unless ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from recloop.errors import RecloopInputError
from recloop.sim.runner import _finish, _versions
from recloop.sim.store import RunStore, atomic_write, atomic_write_text, check_keys, run_key
from recloop.sim.study import Cell, Study, cast_value, column_dtype, column_value, load_study
from recloop.sim.sweep_exec import Progress, UnitSpec, execute_units

FORMAT = "recloop-sweep/1"
#: what a sweep writes in DIR (``--overwrite`` removes these and nothing else)
SWEEP_FILES = ("sweep.json", "study.yaml", "cells", "metrics", "report.html", "report.md")
LOCK = ".sweep.lock"


def run_sweep(study: str | Path | Study, out: str | Path, *, executor: str = "process", address: str | None = None,
              workers: int = 1, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every unit of ``study`` into ``out``; returns the sweep manifest (``sweep.json``)."""
    if workers < 1:
        raise RecloopInputError(f"--workers must be at least 1 (got {workers}).", key="--workers")
    if executor not in ("process", "ray"):
        raise RecloopInputError(f"unknown executor '{executor}'; allowed: process, ray.", key="--executor")
    if address and executor != "ray":
        raise RecloopInputError("--address names a Ray cluster; use it with --executor ray.", key="--address")
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        raise RecloopInputError("executor 'ray' needs the ray extra: pip install 'recloop[ray]'.", key="--executor")
    study = study if isinstance(study, Study) else load_study(study)  # every cell validated before anything runs
    root = Path(out).absolute()
    _check_dir(root)
    with _locked(root):
        return _run(root, study, executor=executor, address=address, workers=workers, overwrite=overwrite,
                    progress=progress)


def _run(root: Path, study: Study, *, executor: str, address: str | None, workers: int, overwrite: bool,
         progress: bool) -> dict[str, Any]:
    old = _reuse(root, study, overwrite)
    sweep = _manifest(study, old)
    _write(root, sweep)  # first: a directory with anything of a sweep in it holds its sweep.json
    atomic_write_text(root / "study.yaml", yaml.safe_dump(study.resolved(), sort_keys=False))
    runs = {cell.id: _prepare_cell(root, study, cell) for cell in study.cells}
    _refresh(sweep, runs)
    sweep.update(status="running", executor=executor, workers=workers, command=sys.argv)
    _write(root, sweep)
    t0 = time.perf_counter()
    try:
        _execute(root, study, sweep, runs, executor=executor, address=address, workers=workers, progress=progress)
        _complete(root, study, sweep, runs)
    except KeyboardInterrupt:
        _stop(root, sweep, "interrupted", None, t0)
        raise
    except BaseException as exc:
        _stop(root, sweep, "failed", f"{type(exc).__name__}: {exc}", t0)
        raise
    _stop(root, sweep, "complete", None, t0)
    return sweep


# ---------------------------------------------------------------------------------------- the directory
def _check_dir(root: Path) -> None:
    """``root`` is new, empty or a sweep directory (created if missing); anything else is refused."""
    if root.exists() and not root.is_dir():
        raise RecloopInputError("exists and is a file, not a directory. Choose another --out.", file=str(root))
    if root.is_dir() and any(p.name != LOCK for p in root.iterdir()) and not (root / "sweep.json").is_file():
        what = "a recloop run, not a sweep" if (root / "manifest.json").exists() else "files that are not a sweep"
        raise RecloopInputError(f"the output directory holds {what}, and recloop never deletes them (not even with "
                                "--overwrite). Choose an empty or new directory for --out.", file=str(root))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecloopInputError(f"the output directory cannot be created ({exc.strerror or exc}).",
                                file=str(root)) from None


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold ``DIR/.sweep.lock`` while the sweep writes: a second sweep on the same directory is refused."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    with open(root / LOCK, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RecloopInputError("another `recloop sweep` is writing this directory right now; wait for it to "
                                    "end or choose another --out.", file=str(root)) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _reuse(root: Path, study: Study, overwrite: bool) -> dict | None:
    """The manifest of the same study's sweep in ``root`` (to resume), or None for a fresh start."""
    if not (root / "sweep.json").is_file():
        return None
    if overwrite:
        for name in SWEEP_FILES:
            p = root / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        return None
    try:
        old = json.loads((root / "sweep.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RecloopInputError(f"sweep.json cannot be read ({exc}); pass --overwrite to start afresh.",
                                file=str(root)) from None
    new = study.fingerprint()
    differ = [k for k in new if old.get("fingerprint", {}).get(k) != new[k]]
    if differ:
        raise RecloopInputError(
            f"the output directory holds the sweep of another study ('{old.get('study')}'; it differs in: "
            f"{', '.join(differ)}). Pass --overwrite to replace it, run that study to resume it, or choose another "
            "--out.", file=str(root))
    return old


def _manifest(study: Study, old: dict | None) -> dict[str, Any]:
    now = datetime.now(timezone.utc).isoformat()
    levels = study.levels()
    return {
        "format": FORMAT,
        "study": study.name,
        "description": study.config.description,
        "study_file": study.file,
        "scenario_file": study.scenario_file,
        "fingerprint": study.fingerprint(),
        "design": study.design,
        "baseline": study.baseline,
        "policies": study.policies,
        "seeds": study.seeds,
        "steps": study.base.steps,
        "factors": levels,
        "metrics_glob": "metrics/**/*.parquet",
        "cells": [{"id": c.id, "factors": {k: levels_value(c, k) for k in study.keys}, "set": c.factors,
                   "run_dir": f"cells/{c.id}", "metrics_dir": f"metrics/{c.id}",
                   "config_hash": c.scenario.config_hash(), "steps": c.scenario.steps, "status": "pending",
                   "units": {}} for c in study.cells],
        "versions": _versions(),
        "created": (old or {}).get("created", now),
        "timings": {"wall_s_total": (old or {}).get("timings", {}).get("wall_s_total", 0.0)},
    }


def levels_value(cell: Cell, key: str) -> Any:
    """The cell's value of factor ``key`` as its metric column holds it."""
    return column_value(cell.values[key])


def _prepare_cell(root: Path, study: Study, cell: Cell) -> dict[str, Any]:
    """The cell's run directory and manifest (the existing one when resuming)."""
    d = root / "cells" / cell.id
    store = RunStore(d)
    sc = cell.scenario
    check_keys([(p, s) for p in sc.policy_configs() for s in study.seeds], d)
    if store.manifest_path.is_file():
        manifest = store.read_manifest()
        if manifest.get("config_hash") != sc.config_hash():
            raise RecloopInputError("holds a run of another scenario than this cell's; pass --overwrite to start "
                                    "the sweep afresh.", file=str(d))
        return manifest
    atomic_write_text(d / "scenario.yaml", yaml.safe_dump(sc.resolved(), sort_keys=False))
    manifest = {
        "format": "recloop-run/1", "scenario": sc.name, "scenario_file": str(d / "scenario.yaml"),
        "config_hash": sc.config_hash(), "seed": sc.seed, "seeds": study.seeds,
        "policies": list(sc.policy_configs()), "steps": sc.steps, "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(), "command": sys.argv, "status": "pending", "runs": {},
        "sweep": {"study": study.name, "cell": cell.id, "factors": dict(cell.values), "dir": "../.."},
    }
    store.write_manifest(manifest)
    return manifest


def _units(study: Study, cell: Cell) -> list[tuple[str, int]]:
    return [(p, s) for s in study.seeds for p in cell.scenario.policy_configs()]


def _refresh(sweep: dict, runs: dict[str, dict]) -> None:
    """Unit and cell statuses in ``sweep`` from the cells' run manifests (the record of what finished)."""
    for entry in sweep["cells"]:
        manifest = runs[entry["id"]]
        units = {run_key(p, s): manifest["runs"].get(run_key(p, s), {}).get("status", "pending")
                 for s in manifest["seeds"] for p in manifest["policies"]}  # the order units run in
        walls = {k: manifest["runs"][k].get("wall_s") for k in units if units[k] == "complete"}
        entry["units"] = {k: {"status": v, **({"wall_s": walls[k]} if k in walls else {})} for k, v in units.items()}
        if all(v == "complete" for v in units.values()):
            entry["status"] = "complete" if manifest.get("status") == "complete" else "running"
        elif any(v == "complete" for v in units.values()):
            entry["status"] = "running"
        else:
            entry["status"] = manifest.get("status") if manifest.get("status") == "failed" else "pending"


def _write(root: Path, sweep: dict) -> None:
    atomic_write_text(root / "sweep.json", json.dumps(sweep, indent=2, sort_keys=False, default=str))


# ------------------------------------------------------------------------------------------- executing
def _execute(root: Path, study: Study, sweep: dict, runs: dict[str, dict], *, executor: str,
             address: str | None, workers: int, progress: bool) -> None:
    cells = {c.id: c for c in study.cells}
    dtypes = {k: column_dtype([c.values[k] for c in study.cells]) for k in study.keys}
    specs, starts = [], {}
    for cell in study.cells:
        d = root / "cells" / cell.id
        resolved = cell.scenario.resolved()
        for policy, seed in _units(study, cell):
            key = run_key(policy, seed)
            if runs[cell.id]["runs"].get(key, {}).get("status") == "complete":
                continue
            label = f"{cell.id}/{key}"
            specs.append(UnitSpec(label, resolved, policy, seed, str(d), str(d / "scenario.yaml")))
            ckpts = RunStore(d).checkpoints(key)
            starts[label] = (ckpts[0].step if ckpts else 0, cell.scenario.steps)
    total = sum(len(_units(study, c)) for c in study.cells)
    bar = Progress(progress and bool(specs), f"sweep {study.name}", starts, total - len(specs), total)

    def on_done(spec: UnitSpec, entry: dict) -> None:
        cell_id, key = spec.label.split("/", 1)
        cell = cells[cell_id]
        store = RunStore(spec.root)
        write_metrics_part(root, cell, store, key, dtypes, unit=(spec.policy, spec.seed))
        manifest = runs[cell_id]
        manifest["runs"][key] = entry
        manifest["status"] = "running"
        store.write_manifest(manifest)
        if all(manifest["runs"].get(run_key(p, s), {}).get("status") == "complete" for p, s in _units(study, cell)):
            _finish_cell(root, study, cell, store, manifest, dtypes)
        _refresh(sweep, runs)
        _write(root, sweep)
        bar.unit_done(spec.label)

    mode = "serial" if executor == "process" and workers == 1 else executor
    with bar:
        execute_units(specs, executor=mode, workers=workers, on_done=on_done, on_cycle=bar.cycle, address=address)


def write_metrics_part(root: Path, cell: Cell, store: RunStore, key: str, dtypes: dict,
                       unit: tuple[str, int] | None = None) -> Path | None:
    """``DIR/metrics/<cell>/part-<key>.parquet``: the cell's metric rows of part key ``key`` (a unit's
    ``<policy>__seed<N>``, or rows the runner adds when it merges the cell, such as the cross-run rows) with the
    cell and factor columns. A unit whose parts are gone is read from the cell's merged metrics."""
    parts = [str(p) for p, _ in store.parts(key)]
    if parts:
        frame = pl.read_parquet(parts)
    elif unit is not None and (store.root / "metrics.parquet").exists():
        frame = pl.read_parquet(store.root / "metrics.parquet").filter(
            (pl.col("policy") == unit[0]) & (pl.col("seed") == unit[1]))
    else:
        return None
    frame = frame.with_columns(pl.lit(cell.id, dtype=pl.Utf8).alias("cell"),
                               *[pl.lit(cast_value(cell.values[k], t), dtype=t).alias(k) for k, t in dtypes.items()])
    path = root / "metrics" / cell.id / f"part-{key}.parquet"
    atomic_write(path, frame.write_parquet)
    return path


def _finish_cell(root: Path, study: Study, cell: Cell, store: RunStore, manifest: dict, dtypes: dict) -> None:
    """Merge the cell's run directory (``recloop run``'s last step: metrics.parquet, cross-run rows) and copy
    the rows the merge added into the study's metrics."""
    _finish(store, manifest, cell.scenario)
    _write_extras(root, study, cell, store, dtypes, only_missing=False)


def _write_extras(root: Path, study: Study, cell: Cell, store: RunStore, dtypes: dict, only_missing: bool) -> None:
    units = {run_key(p, s) for p, s in _units(study, cell)}
    for key in sorted({p.name.rsplit("__", 1)[0] for p, _ in store.parts()} - units):
        if not only_missing or not (root / "metrics" / cell.id / f"part-{key}.parquet").exists():
            write_metrics_part(root, cell, store, key, dtypes)


def _complete(root: Path, study: Study, sweep: dict, runs: dict[str, dict]) -> None:
    """Merge cells whose units all finished (also after a crash between a unit and its cell's merge) and
    write any metric part a crash left out."""
    dtypes = {k: column_dtype([c.values[k] for c in study.cells]) for k in study.keys}
    for cell in study.cells:
        store = RunStore(root / "cells" / cell.id)
        manifest = runs[cell.id]
        for policy, seed in _units(study, cell):
            key = run_key(policy, seed)
            if not (root / "metrics" / cell.id / f"part-{key}.parquet").exists():
                write_metrics_part(root, cell, store, key, dtypes, unit=(policy, seed))
        if manifest.get("status") != "complete" or not (store.root / "metrics.parquet").exists():
            _finish_cell(root, study, cell, store, manifest, dtypes)
        else:
            _write_extras(root, study, cell, store, dtypes, only_missing=True)
    _refresh(sweep, runs)


def _stop(root: Path, sweep: dict, status: str, error: str | None, t0: float) -> None:
    wall = time.perf_counter() - t0
    sweep["status"] = status
    if error is not None:
        sweep["error"] = error[:2000]
    else:
        sweep.pop("error", None)
    t = sweep["timings"]
    t["wall_s"] = round(wall, 3)
    t["wall_s_total"] = round(t.get("wall_s_total", 0.0) + wall, 3)
    walls = sorted(u["wall_s"] for c in sweep["cells"] for u in c["units"].values() if u.get("wall_s") is not None)
    if walls:
        t["unit_wall_s_sum"] = round(sum(walls), 3)
        t["unit_wall_s_median"] = walls[len(walls) // 2]
    if status == "complete":
        sweep["finished"] = datetime.now(timezone.utc).isoformat()
    _write(root, sweep)


def read_sweep_metrics(out: str | Path) -> pl.LazyFrame:
    """The whole study's metrics, lazily: the run-store columns, ``cell`` and one column per factor."""
    root = Path(out)
    if not (root / "sweep.json").is_file():
        raise RecloopInputError("no sweep.json: this is not a sweep directory.", file=str(root))
    return pl.scan_parquet(str(root / "metrics" / "**" / "*.parquet"), hive_partitioning=False)
