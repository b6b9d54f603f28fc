"""Small multiples of metrics over time: one line per policy, a band across seeds (min–max) and
the mean line, read straight from a run directory's ``metrics.parquet``."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

DEFAULT_METRICS = (
    "utility", "ctr", "gini_exposure", "coverage_cum", "arp", "aplt", "homogenization", "rec_similarity",
    "miscalibration", "ild", "drift_mean", "polarization_var", "exposure_dpr", "regret", "novelty",
    "gini_consumption_cum",
)


def summarize(df: pl.DataFrame) -> pl.DataFrame:
    """Mean, min, max and sd across seeds per (policy, metric, group, step)."""
    return (
        df.group_by(["policy", "metric", "group", "step"])
        .agg(pl.col("value").mean().alias("mean"), pl.col("value").min().alias("lo"),
             pl.col("value").max().alias("hi"), pl.col("value").std().alias("sd"), pl.len().alias("n_seeds"))
        .sort(["policy", "metric", "group", "step"])
    )


def plot_metrics(df: pl.DataFrame, out: str | Path, metrics: list[str] | None = None, title: str = "") -> Path:
    """Draw the small multiples to ``out`` (PNG/PDF/SVG by extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = df.filter(pl.col("value").is_finite())
    present = set(df.filter(pl.col("group") == "")["metric"].unique().to_list())
    names = [m for m in (metrics or DEFAULT_METRICS) if m in present]
    if metrics is None:
        names += sorted(present - set(names) - {"active_users", "catalog_size"})[: max(0, 20 - len(names))]
    if not names:
        raise ValueError("no plottable metrics in this run")
    summary = summarize(df.filter(pl.col("metric").is_in(names) & (pl.col("group") == "")))
    policies = sorted(summary["policy"].unique().to_list())
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes.flat, names):
        sub = summary.filter(pl.col("metric") == name)
        for i, pol in enumerate(policies):
            s = sub.filter(pl.col("policy") == pol)
            if s.height == 0:
                continue
            c = colors[i % len(colors)]
            x = s["step"].to_numpy()
            ax.plot(x, s["mean"].to_numpy(), color=c, lw=1.4, label=pol)
            if s["n_seeds"].max() > 1:
                ax.fill_between(x, s["lo"].to_numpy(), s["hi"].to_numpy(), color=c, alpha=0.2, lw=0)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.supxlabel("cycle", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.6 * rows)))
    top = 1 - 0.25 / (2.6 * rows)
    fig.legend(handles, labels, loc="center", bbox_to_anchor=(0.5, top), ncol=min(len(labels), 6), fontsize=8,
               frameon=False, title=title or None, title_fontsize=9)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None, metrics: list[str] | None = None) -> Path:
    from recloop.sim.store import RunStore

    store = RunStore(run_dir)
    df = store.read_metrics()
    name = ""
    try:
        name = store.read_manifest().get("scenario", "")
    except Exception:  # a run dir without manifest still plots
        pass
    return plot_metrics(df, out or Path(run_dir) / "metrics.png", metrics, title=name)
