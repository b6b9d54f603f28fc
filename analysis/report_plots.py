"""Figures of ``recloop report``, as base64 PNG for a self-contained HTML page (matplotlib, Agg backend).

* over time: one panel per metric (run) or per cell (sweep), a line per policy (mean across seeds) and a
  band that is the 95 % t interval of that mean across seeds at each cycle;
* against a factor: one panel per factor, the final value per level (averaged per seed over the cells with
  that level) with its 95 % t interval as error bars, a line per policy.
"""

from __future__ import annotations

import base64
import io
import math
import textwrap
from dataclasses import dataclass

import polars as pl

from recloop.analysis.plot import metric_label

BAND_NOTE = "line: mean across seeds; band: 95 % t interval of the mean across seeds at each cycle"
BAR_NOTE = ("point: final value (mean of the last 10 % of cycles), averaged per seed over the cells with that "
            "level, mean across seeds; bar: its 95 % t interval")


@dataclass
class Panel:
    """One axes: rows with policy, x, mean, lo, hi (lo/hi null: no interval); ``ticks`` labels x = 0, 1, ...
    for categorical levels."""

    title: str
    ylabel: str
    data: pl.DataFrame
    xlabel: str = "cycle"
    ticks: list[str] | None = None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_base64_png(fig, dpi: int = 80) -> str:
    """The figure as base64 PNG (and closed)."""
    plt = _pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def small_multiples(panels: list[Panel], policies: list[str], note: str, title: str = "", bars: bool = False):
    """Panels in a grid of up to 4 columns, a shared legend on top and ``note`` (what the band is) below.
    Margins are fixed in inches (no tight layout: it measured every tick label twice and was most of the cost)."""
    plt = _pyplot()
    cols = min(4, max(1, len(panels)))
    rows = math.ceil(len(panels) / cols)
    width = 3.6 * cols
    note = textwrap.fill(note, int(width * 15))  # about 15 characters of 7 pt text per inch
    lines = note.count("\n") + 1
    top, bottom, left, right, gap_w, gap_h = 0.75, 0.5 + 0.12 * lines, 0.75, 0.15, 0.8, 0.85  # inches
    height = 2.6 * rows + top + bottom
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    axw = (width - left - right - (cols - 1) * gap_w) / cols
    axh = (height - top - bottom - (rows - 1) * gap_h) / rows
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=gap_w / axw, hspace=gap_h / axh)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, panels):
        _draw(ax, panel, policies, colors, bars)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors[i % len(colors)], lw=1.6, marker="o" if bars else None, label=p)
               for i, p in enumerate(policies)]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.05 / height),
               ncol=min(len(policies), 6), fontsize=8, frameon=False, title=title or None, title_fontsize=9)
    fig.text(0.5, 0.06 / height, note, ha="center", va="bottom", fontsize=7, color="0.35")
    return fig


def _draw(ax, panel: Panel, policies: list[str], colors: list[str], bars: bool) -> None:
    for i, pol in enumerate(policies):
        s = panel.data.filter(pl.col("policy") == pol).sort("x")
        if s.height == 0:
            continue
        c = colors[i % len(colors)]
        x, m = s["x"].to_numpy(), s["mean"].to_numpy()
        lo = s["lo"].fill_null(float("nan")).to_numpy()
        hi = s["hi"].fill_null(float("nan")).to_numpy()
        if bars:
            off = (i - (len(policies) - 1) / 2) * 0.06  # dodge so bars of policies do not hide each other
            ax.errorbar(x + off, m, yerr=[m - lo, hi - m], color=c, marker="o", ms=4, lw=1.2, capsize=3)
        else:
            ax.plot(x, m, color=c, lw=1.4)
            ax.fill_between(x, lo, hi, color=c, alpha=0.2, lw=0)
    if panel.data.height == 0:
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", fontsize=7, transform=ax.transAxes)
    if panel.ticks is None:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # cycles are whole numbers
    else:
        ax.set_xticks(range(len(panel.ticks)), panel.ticks, fontsize=7, rotation=30 if len(panel.ticks) > 4 else 0)
        ax.set_xlim(-0.5, len(panel.ticks) - 0.5)
    ax.set_title(panel.title, fontsize=9 if len(panel.title) < 40 else 7)
    ax.set_ylabel(panel.ylabel, fontsize=7)
    ax.set_xlabel(panel.xlabel, fontsize=7)
    ax.tick_params(labelsize=7)


def time_panels(bands: pl.DataFrame, metrics: list[str], cell: str = "") -> list[Panel]:
    """Panels over time of a run (one per metric) from :func:`report_data.time_bands`."""
    out = []
    for m in metrics:
        title, ylabel = metric_label(m)
        data = bands.filter((pl.col("cell") == cell) & (pl.col("metric") == m)).rename({"step": "x"})
        out.append(Panel(title, ylabel, data))
    return out


def cell_panels(bands: pl.DataFrame, metric: str, cells: list[tuple[str, str]]) -> list[Panel]:
    """Panels over time of one metric of a sweep, one per cell: ``cells`` is [(cell id, its label)]."""
    _, ylabel = metric_label(metric)
    sub = bands.filter(pl.col("metric") == metric).rename({"step": "x"})
    return [Panel(label, ylabel, sub.filter(pl.col("cell") == cid)) for cid, label in cells]


def factor_panels(effects: pl.DataFrame, metric: str, factors: dict[str, list[str]]) -> list[Panel]:
    """Final value of ``metric`` against each factor's levels (categorical positions, labels as ticks)."""
    _, ylabel = metric_label(metric)
    sub = effects.filter((pl.col("metric") == metric) & (pl.col("group") == "") & (pl.col("stat") == "final"))
    out = []
    for f, labels in factors.items():
        d = (sub.filter(pl.col("factor") == f)
             .select("policy", pl.col("level_order").cast(pl.Float64).alias("x"), "mean",
                     pl.col("t_lo").alias("lo"), pl.col("t_hi").alias("hi")))
        out.append(Panel(f, ylabel, d, xlabel=f, ticks=labels))
    return out
