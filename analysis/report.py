"""``recloop report DIR``: a self-contained ``DIR/report.html`` (figures inline as base64 PNG, no external
JS or CSS) and ``DIR/report.md`` (the same tables) for a run or a sweep directory.

Per ungrouped metric: the final value (mean of the last 10 % of cycles) and the time average, each with
95 % intervals across seeds (Student t and percentile bootstrap, 2,000 resamples) and the paired difference
against the baseline (per seed, common random numbers). Grouped metrics get a compact table of final values.
Plots over time carry a band that is the 95 % t interval across seeds; a sweep adds plots of final values
against each factor's levels and a table of effects per factor level. See :mod:`report_data` for the data.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from recloop.analysis import report_data as rd
from recloop.analysis import report_plots as rp
from recloop.analysis import stats
from recloop.analysis.plot import metric_label
from recloop.analysis.report_render import Figure, Report, Table, to_html, to_markdown
from recloop.errors import RecloopInputError, clip
from recloop.sim.store import atomic_write_text

RUN_PLOT_CAP = 20  # metrics plotted over time without --metrics (run)
SWEEP_PLOT_CAP = 8  # metrics plotted per cell and per factor without --metrics (sweep)
CELL_PANEL_CAP = 24  # cells drawn in a metric's figure over time
STAT_TITLES = {"final": "Final value", "time_avg": "Time average"}


# --------------------------------------------------------------------------------------------- formatting
def num(v) -> str:
    """A number with 4 significant digits ('—' for missing or NaN)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.4g}"


def interval(lo, hi, note: str = "") -> str:
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return f"— ({note})" if note else "—"
    return f"[{num(lo)}, {num(hi)}]"


def _excludes_zero(lo, hi) -> bool:
    return lo is not None and hi is not None and not math.isnan(lo) and (lo > 0 or hi < 0)


def _stat_cells(r: dict, prefix: str = "") -> list[str]:
    p = prefix
    return [str(r[f"{p}n"]), num(r[f"{p}mean"]), interval(r[f"{p}t_lo"], r[f"{p}t_hi"], r[f"{p}note"]),
            interval(r[f"{p}boot_lo"], r[f"{p}boot_hi"], r[f"{p}note"])]


def _diff_cells(r: dict, baseline: str) -> list[str]:
    if r["policy"] == baseline:
        return ["(baseline)", "", ""]
    if r["d_n"] is None:
        return ["— (no common seeds)", "", ""]
    mark = " *" if _excludes_zero(r["d_t_lo"], r["d_t_hi"]) else ""
    _, mean, t, boot = _stat_cells(r, "d_")
    return [mean + mark, t, boot]


# ------------------------------------------------------------------------------------------------ tables
def _ordered(df: pl.DataFrame, study: rd.Study, metrics: list[str]) -> pl.DataFrame:
    """Rows in the order metric (as listed), cell (as in sweep.json), policy (declared)."""
    cells = [c["id"] for c in study.cells]
    return (df.with_columns(pl.col("metric").replace_strict(metrics, range(len(metrics)), default=len(metrics))
                            .alias("_m"),
                            pl.col("cell").replace_strict(cells, range(len(cells)), default=len(cells)).alias("_c"),
                            pl.col("policy").replace_strict(study.policies, range(len(study.policies)),
                                                            default=len(study.policies)).alias("_p"))
            .sort("_m", "group", "_c", "_p").drop("_m", "_c", "_p"))


def _factor_cols(study: rd.Study) -> tuple[list[str], dict[str, list[str]]]:
    """Factor names and, per cell id, its level labels (empty for a run)."""
    names = list(study.factors)
    return names, {c["id"]: [rd.level_label(c["factors"].get(f, "")) for f in names] for c in study.cells}


def stat_table(summary: pl.DataFrame, study: rd.Study, stat: str, metrics: list[str]) -> Table:
    """Ungrouped metrics: value, both intervals, and the paired difference against the baseline."""
    names, levels = _factor_cols(study)
    sub = _ordered(summary.filter((pl.col("stat") == stat) & (pl.col("group") == "")
                                  & pl.col("metric").is_in(metrics)), study, metrics)
    header = ["metric", *names, "policy", "n", "mean", "95% t", "95% bootstrap",
              f"Δ vs {study.baseline}", "Δ 95% t", "Δ 95% bootstrap"]
    rows = [[r["metric"], *levels.get(r["cell"], []), r["policy"], *_stat_cells(r), *_diff_cells(r, study.baseline)]
            for r in sub.iter_rows(named=True)]
    what = ("mean over the last 10 % of cycles" if stat == "final" else "mean over all cycles")
    intro = (f"{STAT_TITLES[stat]} ({what}) per seed, then the mean across seeds with 95 % intervals; Δ is the "
             f"paired difference policy − {study.baseline} per seed (common random numbers), * where its t "
             "interval excludes 0.")
    return Table(STAT_TITLES[stat], intro, header, rows)


def grouped_table(summary: pl.DataFrame, study: rd.Study) -> Table | None:
    """Metrics recorded by group, compactly: final value and its t interval."""
    sub = summary.filter((pl.col("stat") == "final") & (pl.col("group") != ""))
    if sub.height == 0:
        return None
    metrics = sorted(sub["metric"].unique().to_list())
    names, levels = _factor_cols(study)
    rows = [[r["metric"], r["group"], *levels.get(r["cell"], []), r["policy"], str(r["n"]), num(r["mean"]),
             interval(r["t_lo"], r["t_hi"], r["note"])] for r in _ordered(sub, study, metrics).iter_rows(named=True)]
    return Table("Metrics by group", "Final values of metrics recorded per group (95 % t interval across seeds).",
                 ["metric", "group", *names, "policy", "n", "final", "95% t"], rows)


def effects_table(effects: pl.DataFrame, study: rd.Study, metrics: list[str]) -> Table:
    """Per factor level and policy: the final value and the paired difference, with intervals."""
    sub = effects.filter((pl.col("stat") == "final") & (pl.col("group") == "") & pl.col("metric").is_in(metrics))
    order = {m: i for i, m in enumerate(metrics)}
    pol = {p: i for i, p in enumerate(study.policies)}
    recs = sorted(sub.iter_rows(named=True), key=lambda r: (list(study.factors).index(r["factor"]), order[r["metric"]],
                                                             r["level_order"], pol.get(r["policy"], len(pol))))
    rows = [[r["factor"], r["level"], r["metric"], r["policy"], *_stat_cells(r), *_diff_cells(r, study.baseline)]
            for r in recs]
    header = ["factor", "level", "metric", "policy", "n", "final", "95% t", "95% bootstrap",
              f"Δ vs {study.baseline}", "Δ 95% t", "Δ 95% bootstrap"]
    intro = ("Final value at each level of each factor: per seed, the mean over the cells with that level (the "
             "other factors' levels averaged), then the mean across seeds with 95 % intervals. Δ is the paired "
             f"difference policy − {study.baseline} (per seed and cell, then averaged the same way), * where its "
             "t interval excludes 0.")
    return Table("Effects by factor level", intro, header, rows)


# ----------------------------------------------------------------------------------------------- figures
def _cell_label(study: rd.Study, cell: dict) -> str:
    return ", ".join(f"{f}={rd.level_label(v)}" for f, v in cell["factors"].items()) or str(cell["id"])


def time_figures(study: rd.Study, bands: pl.DataFrame, metrics: list[str]) -> list[Figure]:
    if study.kind == "run":
        fig = rp.small_multiples(rp.time_panels(bands, metrics), study.policies, rp.BAND_NOTE)
        return [Figure("Metrics over time", rp.BAND_NOTE, rp.to_base64_png(fig))]
    cells = [(c["id"], _cell_label(study, c)) for c in study.cells[:CELL_PANEL_CAP]]
    more = len(study.cells) - len(cells)
    caption = rp.BAND_NOTE + (f"; the first {len(cells)} cells of {len(study.cells)}" if more > 0 else "")
    out = []
    for m in metrics:
        fig = rp.small_multiples(rp.cell_panels(bands, m, cells), study.policies, rp.BAND_NOTE,
                                 title=metric_label(m)[0])
        out.append(Figure(f"{m} over time, per cell", caption, rp.to_base64_png(fig)))
    return out


def factor_figures(study: rd.Study, effects: pl.DataFrame, metrics: list[str]) -> list[Figure]:
    levels = {f: [rd.level_label(v) for v in vs] for f, vs in study.factors.items()}
    out = []
    for m in metrics:
        fig = rp.small_multiples(rp.factor_panels(effects, m, levels), study.policies, rp.BAR_NOTE,
                                 title=metric_label(m)[0], bars=True)
        out.append(Figure(f"{m} against the factors' levels", rp.BAR_NOTE, rp.to_base64_png(fig)))
    return out


# ------------------------------------------------------------------------------------------------ build
def build_report(root: str | Path, baseline: str | None = None, metrics: list[str] | None = None) -> Report:
    """Read the directory, compute every table and figure."""
    study = rd.load_study(root, baseline)
    cap = RUN_PLOT_CAP if study.kind == "run" else SWEEP_PLOT_CAP
    tables, plotted = rd.choose_metrics(study, metrics, cap)
    keep = pl.col("metric").is_in(tables) | (pl.col("group") != "")
    seeded = rd.per_seed(study.lf.filter(keep)).collect()
    summary = rd.summary_tables(seeded, study.baseline)
    report = Report(f"recloop report: {study.name}", _facts(study, seeded), _method(study), list(study.notes))
    report.notes += _unplotted_note(tables, plotted)
    body: list[Table | Figure] = [stat_table(summary, study, s, tables) for s in rd.STATS]
    grouped = grouped_table(summary, study)
    report.sections.append(("Summary", body + ([grouped] if grouped else [])))
    report.sections.append(("Over time", time_figures(study, rd.time_bands(study.lf, plotted), plotted)))
    effects = (rd.factor_effects(seeded.filter(pl.col("metric").is_in(tables)), study, study.baseline)
               if study.kind == "sweep" and study.factors else pl.DataFrame())
    if effects.height:
        report.sections.append(("Factors", [*factor_figures(study, effects, plotted),
                                            effects_table(effects, study, tables)]))
    check = gallery_table(study)
    if check is not None:
        report.sections.insert(0, ("Reproduction check", [check]))
    return report


def gallery_table(study: rd.Study) -> Table | None:
    """For a study of the reproduction gallery (``scenarios/papers/``): its headline effects, pass or fail."""
    from recloop.analysis import gallery

    fn = gallery.GALLERY.get(study.name) if study.kind == "sweep" else None
    if fn is None:
        return None
    rows = [[e.claim, e.policy, e.cell, str(e.n), num(e.mean), interval(e.t_lo, e.t_hi),
             interval(e.boot_lo, e.boot_hi), f"{e.side} {e.reference:g}", "pass" if e.passed else "FAIL"]
            for e in fn(study.lf)]
    intro = ("The paper's headline effects (recloop.analysis.gallery): per seed, then the mean across seeds with "
             "95 % intervals; pass where the t interval lies on the paper's side of the reference value.")
    return Table("Reproduction check", intro, ["effect", "policy", "cell", "n", "mean", "95% t", "95% bootstrap",
                                               "paper", "result"], rows)


def _facts(study: rd.Study, seeded: pl.DataFrame) -> list[tuple[str, str]]:
    lo, hi = rd.seeds_per_policy(seeded)
    span, window = rd.final_window(study.lf)
    facts = [("directory", str(study.root)), ("kind", study.kind), ("policies", ", ".join(study.policies)),
             ("baseline", study.baseline), ("seeds per policy", str(lo) if lo == hi else f"{lo}–{hi}"),
             ("cycles", f"{span} (final value: the last {window})")]
    if study.kind == "sweep":
        facts += [("factors", "; ".join(f"{f}: {', '.join(rd.level_label(v) for v in vs)}"
                                        for f, vs in study.factors.items()) or "(none)"),
                  ("cells with metrics", str(len(study.cells)))]
    facts.append(("written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")))
    return facts


def _method(study: rd.Study) -> str:
    return ("Seeds are the unit: each interval is a 95 % interval of the mean across seeds, as a Student t "
            f"interval and as a percentile bootstrap interval ({stats.RESAMPLES:,} resamples, seed {stats.SEED}). "
            "Paired differences take policy − baseline per seed"
            + (" within each cell" if study.kind == "sweep" else "")
            + ", as both ran on the same seed (common random numbers), and give the intervals of their mean. "
            "n = 1 gives no interval; values constant across seeds give [c, c]. Non-finite values (a metric "
            "undefined in a cycle) are left out.")


def _unplotted_note(tables: list[str], plotted: list[str]) -> list[str]:
    rest = [m for m in tables if m not in plotted]
    return [f"not plotted (pass --metrics to choose): {', '.join(rest)}."] if rest else []


# ------------------------------------------------------------------------------------------------ write
def write_report(root: str | Path, baseline: str | None = None,
                 metrics: list[str] | None = None) -> tuple[Path, Path]:
    """Write ``DIR/report.html`` and ``DIR/report.md``; returns their paths."""
    try:
        report = build_report(root, baseline, metrics)
    except (pl.exceptions.ComputeError, pl.exceptions.SchemaError, pl.exceptions.ColumnNotFoundError,
            OSError) as exc:  # unreadable or foreign metric files: one paragraph, exit 2
        raise RecloopInputError(f"its metric files cannot be read as run-store Parquet ({type(exc).__name__}: "
                                f"{clip(str(exc), 300)}).", file=str(root)) from None
    root = Path(root)
    atomic_write_text(root / "report.html", to_html(report))
    atomic_write_text(root / "report.md", to_markdown(report))
    return root / "report.html", root / "report.md"
