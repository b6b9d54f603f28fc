"""What ``recloop report`` reads and computes: a run or a sweep directory as one lazy frame, per-seed final
values and time averages, and their intervals (plain, paired against the baseline, per factor level).

* A **run** directory has ``manifest.json`` and ``metrics.parquet`` (or, unfinished, ``metrics.parts/``).
* A **sweep** directory has ``sweep.json`` (``study``, ``baseline``, ``factors: {dotted key: [levels]}``,
  ``seeds``, ``policies``, ``cells: [{id, factors, run_dir}]``) and ``metrics/<cell_id>/part-*.parquet``
  (the run-store columns plus one column per factor). Factor levels are taken from ``sweep.json``.

Per (cell, policy, seed, metric, group), over its finite values: **final** is the mean over the last 10 %
of its cycles (at least one cycle), **time_avg** the mean over all of them. Intervals are across seeds
(:mod:`recloop.analysis.stats`); paired differences are per seed within a cell (common random numbers).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from recloop.analysis import stats
from recloop.analysis.plot import DEFAULT_METRICS, select_metrics
from recloop.errors import RecloopInputError, did_you_mean
from recloop.sim.store import SCHEMA, RunStore

KEYS = ["cell", "policy", "seed", "metric", "group"]
STATS = ("final", "time_avg")
FINAL_SHARE = 0.10


@dataclass
class Study:
    """A run or a sweep, with every metric row in ``lf`` (run-store columns plus ``cell``)."""

    kind: str  # "run" or "sweep"
    root: Path
    name: str
    policies: list[str]
    baseline: str
    lf: pl.LazyFrame
    factors: dict[str, list[Any]] = field(default_factory=dict)
    cells: list[dict[str, Any]] = field(default_factory=list)  # [{id, factors}], those with metrics
    notes: list[str] = field(default_factory=list)


def level_label(v: Any) -> str:
    """A factor level as text (JSON for lists and mappings, so every level has one label)."""
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def _scan(paths: list[Path], cell: str) -> pl.LazyFrame:
    """The run-store columns of ``paths`` (cast to the store's schema) with a ``cell`` column."""
    lf = pl.scan_parquet([str(p) for p in paths])
    return lf.select([pl.col(c).cast(t) for c, t in SCHEMA.items()]).with_columns(pl.lit(cell).alias("cell"))


def _run_paths(store: RunStore) -> tuple[list[Path], bool]:
    """The metric files of a run directory and whether the run is finished (``metrics.parquet``)."""
    final = store.root / "metrics.parquet"
    if final.is_file():
        return [final], True
    return [p for p, _ in store.parts()], False


def load_study(root: str | Path, baseline: str | None = None) -> Study:
    """A run or sweep directory as a :class:`Study`; RecloopInputError (exit 2) for anything else."""
    root = Path(root)
    if not root.exists():
        raise RecloopInputError("no such directory. `recloop report DIR` takes a run directory (from `recloop "
                                "run`) or a sweep directory (from `recloop sweep`).", file=str(root))
    if not root.is_dir():
        raise RecloopInputError("is a file, not a directory. `recloop report DIR` takes a run directory or a "
                                "sweep directory.", file=str(root))
    if (root / "sweep.json").is_file():
        study = _load_sweep(root)
    elif (root / "manifest.json").is_file():
        study = _load_run(root)
    else:
        raise RecloopInputError("is neither a run directory (no manifest.json) nor a sweep directory (no "
                                "sweep.json), so there is nothing to report. Pass the --out directory of "
                                "`recloop run` or `recloop sweep`.", file=str(root))
    study.baseline = _check_baseline(study, baseline if baseline is not None else study.baseline,
                                     "--baseline" if baseline is not None else "baseline")
    return study


def _load_run(root: Path) -> Study:
    store = RunStore(root)
    manifest = store.read_manifest()
    paths, finished = _run_paths(store)
    if not paths:
        raise RecloopInputError("holds no metrics (no metrics.parquet and no metrics.parts/). Run `recloop run` "
                                "first, or `recloop resume DIR` to finish it.", file=str(root))
    lf = _scan(paths, "")
    policies = _policies(manifest.get("policies"), lf, root)
    notes = [] if finished else ["unfinished run: the report covers the metric parts written so far."]
    return Study("run", root, str(manifest.get("scenario", "") or root.name), policies, policies[0], lf,
                 cells=[{"id": "", "factors": {}}], notes=notes)


def _load_sweep(root: Path) -> Study:
    try:
        spec = json.loads((root / "sweep.json").read_text())
    except json.JSONDecodeError as exc:
        raise RecloopInputError(f"sweep.json is not valid JSON ({exc.msg}).", file=str(root)) from None
    if not isinstance(spec, dict) or not isinstance(spec.get("cells"), list):
        raise RecloopInputError("sweep.json has no list of cells, so this is not a sweep directory written by "
                                "`recloop sweep`.", file=str(root))
    factors = {k: list(v) for k, v in (spec.get("factors") or {}).items()}
    frames, cells, missing = [], [], []
    for cell in spec["cells"]:
        paths = _cell_paths(root, cell)
        if not paths:
            missing.append(str(cell["id"]))
            continue
        frames.append(_scan(paths, str(cell["id"])))
        cells.append({"id": str(cell["id"]), "factors": dict(cell.get("factors") or {})})
    if not frames:
        raise RecloopInputError("no cell of this sweep has metrics yet (metrics/<cell_id>/*.parquet). Run "
                                "`recloop sweep` first.", file=str(root))
    lf = pl.concat(frames, how="vertical")
    notes = [f"cells without metrics (not run yet): {', '.join(missing)}."] if missing else []
    policies = _policies(spec.get("policies"), lf, root)
    baseline = spec.get("baseline") or policies[0]
    return Study("sweep", root, str(spec.get("study") or root.name), policies, baseline, lf, factors, cells, notes)


def _cell_paths(root: Path, cell: dict[str, Any]) -> list[Path]:
    """A cell's metric parts (``metrics/<id>/*.parquet``), else its run directory's metrics."""
    parts = sorted((root / "metrics" / str(cell["id"])).glob("*.parquet"))
    if parts:
        return parts
    run_dir = cell.get("run_dir")
    if run_dir:
        paths, _ = _run_paths(RunStore(root / run_dir if not Path(run_dir).is_absolute() else Path(run_dir)))
        return paths
    return []


def _policies(declared: Any, lf: pl.LazyFrame, root: Path) -> list[str]:
    """The policies in their declared order (a list or the keys of a mapping), those only in the data last."""
    names = list(declared.keys()) if isinstance(declared, dict) else list(declared or [])
    present = lf.select(pl.col("policy").unique()).collect()["policy"].to_list()
    ordered = [p for p in names if p in present] + sorted(set(present) - set(names))
    if not ordered:
        raise RecloopInputError("holds no metric rows.", file=str(root))
    return ordered


def _check_baseline(study: Study, baseline: str, key: str) -> str:
    if baseline not in study.policies:
        hint = did_you_mean(str(baseline), study.policies)
        where = str(study.root / "sweep.json") if key == "baseline" else str(study.root)
        raise RecloopInputError(f"baseline '{baseline}' is not a policy of this {study.kind}.{hint} Policies: "
                                f"{', '.join(study.policies)}.", file=where, key=key)
    return baseline


# ----------------------------------------------------------------------------------------- metric choice
def available(study: Study) -> pl.DataFrame:
    """One row per (metric, group): value 1.0 if it has a finite value, else NaN (for select_metrics)."""
    return (study.lf.group_by("metric", "group")
            .agg(pl.when(pl.col("value").is_finite().any()).then(1.0).otherwise(float("nan")).alias("value"))
            .sort("metric", "group").collect())


def choose_metrics(study: Study, metrics: list[str] | None, plot_cap: int) -> tuple[list[str], list[str]]:
    """(metrics for the tables, metrics for the plots). With ``metrics`` both are those names (each must be
    an ungrouped metric of the study, else exit 2); otherwise every ungrouped metric with a finite value
    (the usual ones first) and the plot defaults of ``recloop plot``, at most ``plot_cap`` of them."""
    avail = available(study)
    try:
        plotted = select_metrics(avail, metrics)
    except ValueError as exc:
        raise RecloopInputError(str(exc), file=str(study.root), key="--metrics") from None
    if metrics is not None:
        return plotted, plotted
    finite = avail.filter((pl.col("group") == "") & pl.col("value").is_finite())["metric"].to_list()
    tables = [m for m in DEFAULT_METRICS if m in finite] + sorted(set(finite) - set(DEFAULT_METRICS))
    return tables, plotted[:plot_cap]


# ------------------------------------------------------------------------------------------ per seed
def per_seed(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Per (cell, policy, seed, metric, group): ``final`` (mean of the last 10 % of its cycles, at least one)
    and ``time_avg`` (mean of all), over finite values; then long: a ``stat`` column and ``value``."""
    span = (pl.col("step").max() - pl.col("step").min() + 1).over(KEYS)
    window = (span.cast(pl.Float64) * FINAL_SHARE).ceil().clip(lower_bound=1)
    last = pl.col("step").max().over(KEYS)
    wide = (lf.filter(pl.col("value").is_finite())
            .with_columns((pl.col("step") > last - window).alias("_in_final"))
            .group_by(KEYS)
            .agg(pl.col("value").filter(pl.col("_in_final")).mean().alias("final"),
                 pl.col("value").mean().alias("time_avg"), pl.col("step").max().alias("last_step")))
    return wide.unpivot(index=[*KEYS, "last_step"], on=list(STATS), variable_name="stat", value_name="value")


def final_window(lf: pl.LazyFrame) -> tuple[int, int]:
    """(cycles recorded, cycles in the final window) of the longest run, for the report's wording."""
    steps = lf.select(pl.col("step").min().alias("a"), pl.col("step").max().alias("b")).collect().row(0)
    span = 0 if steps[0] is None else steps[1] - steps[0] + 1
    return span, max(1, math.ceil(span * FINAL_SHARE)) if span else 0


def summary_tables(seeded: pl.DataFrame, baseline: str) -> pl.DataFrame:
    """Per (cell, stat, metric, group, policy): the interval stats, plus ``d_*`` columns of the paired
    differences against the baseline (null on the baseline's own rows)."""
    by = ["cell", "stat", "metric", "group"]
    plain = stats.interval_table(seeded, [*by, "policy"])
    paired = stats.paired_table(seeded, baseline, by).rename({c: f"d_{c}" for c in stats.STAT_COLS})
    return plain.join(paired, on=[*by, "policy"], how="left")


def factor_effects(seeded: pl.DataFrame, study: Study, baseline: str) -> pl.DataFrame:
    """Per factor, level, stat, metric, group and policy: the final value and the paired difference against
    the baseline, each first averaged per seed over the cells with that level, with intervals across seeds."""
    rows = [{"cell": c["id"], "factor": f, "level": level_label(c["factors"].get(f)),
             "level_order": _level_index(study.factors[f], c["factors"].get(f))}
            for c in study.cells for f in study.factors if f in c["factors"]]
    if not rows:
        return pl.DataFrame()
    cells = pl.DataFrame(rows)
    by = ["factor", "level_order", "level", "stat", "metric", "group"]
    means = (seeded.join(cells, on="cell").group_by([*by, "policy", "seed"]).agg(pl.col("value").mean()))
    plain = stats.interval_table(means, [*by, "policy"])
    diffs = stats.paired_differences(seeded, baseline, ["cell", "stat", "metric", "group"]).collect()
    dmeans = diffs.join(cells, on="cell").group_by([*by, "policy", "seed"]).agg(pl.col("value").mean())
    paired = stats.interval_table(dmeans, [*by, "policy"]).rename({c: f"d_{c}" for c in stats.STAT_COLS})
    return plain.join(paired, on=[*by, "policy"], how="left").sort(["factor", "level_order", "metric", "policy"])


def _level_index(levels: list[Any], value: Any) -> int:
    labels = [level_label(v) for v in levels]
    lab = level_label(value)
    return labels.index(lab) if lab in labels else len(labels)


def time_bands(lf: pl.LazyFrame, metrics: list[str]) -> pl.DataFrame:
    """Per (cell, policy, metric, step) of ungrouped ``metrics``: mean across seeds and its 95 % t interval."""
    sub = lf.filter(pl.col("metric").is_in(metrics) & (pl.col("group") == "") & pl.col("value").is_finite())
    return stats.band(sub, ["cell", "policy", "metric", "step"])


def seeds_per_policy(seeded: pl.DataFrame) -> tuple[int, int]:
    """(fewest, most) seeds of any policy and cell."""
    n = seeded.group_by("cell", "policy").agg(pl.col("seed").n_unique().alias("n"))["n"]
    return (int(n.min()), int(n.max())) if n.len() else (0, 0)
