"""Small multiples of metrics over time: one line per policy (the mean across seeds) and a band across
seeds (min–max), read straight from a run directory's ``metrics.parquet``.

Panels carry a human title and a y-axis label (:data:`METRIC_LABELS`, falling back to the metric id),
and the figure says in a footnote what the line and the band are.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from recloop.errors import did_you_mean
from recloop.sim.store import RunStore

DEFAULT_METRICS = (
    "utility", "ctr", "gini_exposure", "coverage_cum", "arp", "aplt", "homogenization", "rec_similarity",
    "miscalibration", "ild", "drift_mean", "polarization_var", "exposure_dpr", "regret", "novelty",
    "gini_consumption_cum",
)

#: metric id -> (panel title, y-axis label); ids not listed are titled with the id itself
METRIC_LABELS: dict[str, tuple[str, str]] = {
    "utility": ("mean utility", "true utility per active user"),
    "ctr": ("click-through rate", "clicks / slots shown"),
    "no_click_rate": ("no-click rate", "share of active users"),
    "regret": ("regret", "utility lost per sampled user"),
    "active_users": ("active users", "users"),
    "catalog_size": ("catalog size", "items"),
    "gini_exposure": ("exposure Gini", "Gini (0 = equal)"),
    "gini_exposure_cum": ("cumulative exposure Gini", "Gini (0 = equal)"),
    "gini_consumption": ("consumption Gini", "Gini (0 = equal)"),
    "gini_consumption_cum": ("cumulative consumption Gini", "Gini (0 = equal)"),
    "coverage": ("coverage this cycle", "share of catalog shown"),
    "coverage_cum": ("cumulative coverage", "share of current catalog"),
    "exposure_entropy": ("exposure entropy", "entropy (nats)"),
    "arp": ("popularity of recommendations", "mean popularity φ (users)"),
    "aplt": ("long-tail share of slates", "share of slate"),
    "aclt": ("long-tail items per slate", "items"),
    "mean_pop_consumed": ("popularity of consumed items", "mean popularity φ (users)"),
    "novelty": ("novelty", "self-information (bits)"),
    "miscalibration": ("miscalibration", "KL divergence (nats)"),
    "ild": ("intra-list diversity", "cosine distance"),
    "afsr": ("attribute score range", "range"),
    "homogenization": ("homogenization", "Jaccard of histories"),
    "rec_similarity": ("slate similarity", "Jaccard of slates"),
    "homogenization_similar": ("homogenization (similar users)", "Jaccard of histories"),
    "polarization_var": ("polarization", "variance of opinions"),
    "polarization_er": ("Esteban–Ray polarization", "index"),
    "bimodality": ("bimodality coefficient", "BC (> 0.556: two camps)"),
    "preference_dispersion": ("preference dispersion", "trace of covariance"),
    "drift_mean": ("preference drift", "cosine distance from start"),
    "drift_p90": ("preference drift (90th pct.)", "cosine distance from start"),
    "drift_angle": ("drift angle", "radians"),
    "drift_l2": ("drift distance", "L2 distance from start"),
    "bubble_tightness": ("bubble tightness", "cosine distance to consumed"),
    "exposure_dpr": ("exposure parity G1/G0", "ratio (1 = parity)"),
    "exposure_share_gap": ("protected exposure gap", "share minus catalog share"),
}

#: y-axis label of metrics without an entry in METRIC_LABELS
FALLBACK_YLABEL = "value"


def metric_label(metric: str) -> tuple[str, str]:
    """(panel title, y-axis label) of a metric id, falling back to the id itself."""
    return METRIC_LABELS.get(metric, (metric, FALLBACK_YLABEL))


def summarize(df: pl.DataFrame) -> pl.DataFrame:
    """Mean, min, max and sd across seeds per (policy, metric, group, step)."""
    return (
        df.group_by(["policy", "metric", "group", "step"])
        .agg(pl.col("value").mean().alias("mean"), pl.col("value").min().alias("lo"),
             pl.col("value").max().alias("hi"), pl.col("value").std().alias("sd"), pl.len().alias("n_seeds"))
        .sort(["policy", "metric", "group", "step"])
    )


def select_metrics(df: pl.DataFrame, metrics: list[str] | None = None) -> list[str]:
    """The panels to draw: ``metrics`` (each must be an ungrouped metric of the run, else ValueError
    naming the valid ones), or the defaults present in the run topped up to 20."""
    ungrouped = df.filter(pl.col("group") == "")
    available = sorted(set(ungrouped["metric"].unique().to_list()))
    if metrics is not None:
        unknown = [m for m in dict.fromkeys(metrics) if m not in available]
        if unknown:
            raise ValueError(_unknown_message(unknown, available, set(df["metric"].unique().to_list())))
        return list(dict.fromkeys(metrics))
    finite = set(ungrouped.filter(pl.col("value").is_finite())["metric"].unique().to_list())
    names = [m for m in DEFAULT_METRICS if m in finite]
    names += sorted(finite - set(names) - {"active_users", "catalog_size"})[: max(0, 20 - len(names))]
    if not names:
        raise ValueError("no plottable metrics in this run (no ungrouped metric with a finite value).")
    return names


def _unknown_message(unknown: list[str], available: list[str], recorded: set[str]) -> str:
    """One paragraph: which names are not plottable, the closest valid name, and every valid name."""
    parts = []
    for m in unknown:
        why = " is recorded only by group, which the plot does not draw" if m in recorded else ""
        hint = did_you_mean(m, available).strip()
        parts.append(f"'{m}'{why}" + (f" ({hint[0].lower()}{hint[1:]})" if hint else ""))
    noun = "metric" if len(unknown) == 1 else "metrics"
    return (f"unknown {noun} for --metrics: {'; '.join(parts)}. Metrics in this run: "
            f"{', '.join(available) or '(none)'}.")


def band_note(df: pl.DataFrame) -> str:
    """The footnote saying what a line and a band are (the band spans min–max across seeds)."""
    seeds = df.group_by("policy").agg(pl.col("seed").n_unique().alias("n"))["n"].to_list() if df.height else [1]
    lo, hi = min(seeds), max(seeds)
    if hi <= 1:
        return "line: one seed per policy (no band)"
    n = f"{lo}" if lo == hi else f"{lo}–{hi}"
    return f"line: mean across seeds; band: min–max across {n} seeds"


def figure_metrics(df: pl.DataFrame, metrics: list[str] | None = None, title: str = ""):
    """The small multiples as a matplotlib Figure (not saved; :func:`plot_metrics` saves it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = select_metrics(df, metrics)
    df = df.filter(pl.col("value").is_finite())
    summary = summarize(df.filter(pl.col("metric").is_in(names) & (pl.col("group") == "")))
    policies = sorted(summary["policy"].unique().to_list())
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes.flat, names):
        _panel(ax, summary.filter(pl.col("metric") == name), name, policies, colors)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # cycles are whole numbers
        ax.xaxis.set_tick_params(labelbottom=True)  # also above an empty slot of the grid
    handles, labels = axes.flat[0].get_legend_handles_labels()
    inch = 1 / (2.6 * rows)  # one inch of figure height, as a fraction
    fig.supxlabel("cycle", fontsize=8, y=0.22 * inch, va="bottom")  # above the footnote, never on it
    fig.tight_layout(rect=(0, 0.45 * inch, 1, 1 - 0.5 * inch))
    top = 1 - 0.25 / (2.6 * rows)
    fig.legend(handles, labels, loc="center", bbox_to_anchor=(0.5, top), ncol=min(max(len(labels), 1), 6),
               fontsize=8, frameon=False, title=title or None, title_fontsize=9)
    fig.text(0.5, 0.02 * inch, band_note(df), ha="center", va="bottom", fontsize=7, color="0.35")
    return fig


def _panel(ax, sub: pl.DataFrame, name: str, policies: list[str], colors: list[str]) -> None:
    """One metric: a mean line per policy and, with several seeds, its min–max band."""
    for i, pol in enumerate(policies):
        s = sub.filter(pl.col("policy") == pol)
        if s.height == 0:
            continue
        c = colors[i % len(colors)]
        x = s["step"].to_numpy()
        ax.plot(x, s["mean"].to_numpy(), color=c, lw=1.4, label=pol)
        if s["n_seeds"].max() > 1:
            ax.fill_between(x, s["lo"].to_numpy(), s["hi"].to_numpy(), color=c, alpha=0.2, lw=0)
    if sub.height == 0:
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", fontsize=7, transform=ax.transAxes)
    title, ylabel = metric_label(name)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.tick_params(labelsize=7)


def plot_metrics(df: pl.DataFrame, out: str | Path, metrics: list[str] | None = None, title: str = "") -> Path:
    """Draw the small multiples to ``out`` (PNG/PDF/SVG by extension)."""
    import matplotlib.pyplot as plt

    fig = figure_metrics(df, metrics, title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return out


def read_run(run_dir: str | Path) -> tuple[pl.DataFrame, str]:
    """A run directory's metrics and its scenario name ('' without a manifest)."""

    store = RunStore(run_dir)
    df = store.read_metrics()
    name = ""
    try:
        name = store.read_manifest().get("scenario", "")
    except Exception:  # a run dir without manifest still plots
        pass
    return df, name


def plot_run(run_dir: str | Path, out: str | Path | None = None, metrics: list[str] | None = None) -> Path:
    """Plot a run directory to ``out`` (default ``DIR/metrics.png``)."""
    df, name = read_run(run_dir)
    return plot_metrics(df, out or Path(run_dir) / "metrics.png", metrics, title=name)
