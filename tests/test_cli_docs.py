"""What the command line tells a reader: ``--version``, readable parameter types in ``recloop list``,
the cumulative-coverage label, and ``recloop plot`` (unknown metrics, panel titles, y labels, band note)."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest

from recloop import __version__, registry
from recloop.analysis.plot import band_note, figure_metrics, metric_label
from recloop.cli import main
from recloop.describe import param_line, type_label

RAW = ("Annotated", "typing.", "FieldInfo", "<class", "Literal[", "Optional[", "NoneType")


def _main(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_version(capsys):
    assert _main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"recloop {__version__}"


def test_list_shows_readable_types(capsys):
    assert _main(["list"]) == 0
    out = capsys.readouterr().out
    assert not [r for r in RAW if r in out], [line for line in out.splitlines() if any(r in line for r in RAW)]
    specs = [s for k in registry.KINDS for s in registry.specs(k)]
    lines = [param_line(n, f) for s in specs for n, f in s.params.model_fields.items()]
    assert lines and not [ln for ln in lines if any(r in ln for r in RAW)]
    fields = registry.get("policy", "als").params.model_fields
    als = {n: param_line(n, f) for n, f in fields.items()}
    assert als["solver"].startswith("solver: one of: cg, cholesky, numpy = 'cg'")
    assert als["factors"].startswith("factors: int in [1, 4096] = 32")
    csv = registry.get("world", "interactions_csv").params.model_fields
    assert type_label(csv["n_items"].annotation, csv["n_items"].metadata) == "int in (0, 10,000,000], or null"
    assert type_label(list[str]) == "list of str" and type_label(dict[str, int]) == "mapping"


def test_list_labels_cumulative_coverage(capsys):
    assert _main(["list", "metric"]) == 0
    assert "cumulative coverage (share of current catalog)" in capsys.readouterr().out
    title, ylabel = metric_label("coverage_cum")
    assert "cumulative coverage" in title and ylabel == "share of current catalog"


def _metrics_df(seeds=(1, 2)) -> pl.DataFrame:
    rows = []
    for pol in ("mf", "pop"):
        for seed in seeds:
            for step in range(5):
                for metric, group in (("utility", ""), ("coverage_cum", ""), ("my_metric", ""), ("pop_lift", "all")):
                    rows.append((pol, seed, step, metric, group, float(step * seed + (pol == "pop"))))
    return pl.DataFrame(rows, schema=["policy", "seed", "step", "metric", "group", "value"], orient="row")


def _write_run(tmp_path, df: pl.DataFrame):
    run = tmp_path / "run"
    run.mkdir()
    df.write_parquet(run / "metrics.parquet")
    return run


def test_plot_unknown_metric_exits_2_listing_valid_names(tmp_path, capsys):
    run = _write_run(tmp_path, _metrics_df())
    assert _main(["plot", str(run), "--metrics", "utilty,coverage_cum"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'utilty' (did you mean 'utility'?)" in err
    assert "Metrics in this run: coverage_cum, my_metric, utility." in err
    assert "Traceback" not in err
    assert _main(["plot", str(run), "--metrics", "pop_lift"]) == 2
    assert "recorded only by group" in " ".join(capsys.readouterr().err.split())
    assert _main(["plot", str(run), "--metrics", "utility,coverage_cum", "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 5_000


def test_plot_panels_have_titles_ylabels_and_band_note():
    import matplotlib.pyplot as plt

    fig = figure_metrics(_metrics_df(), ["utility", "coverage_cum", "my_metric"])
    try:
        axes = [ax for ax in fig.axes if ax.axison]
        assert [ax.get_title() for ax in axes] == ["mean utility", "cumulative coverage", "my_metric"]
        assert all(ax.get_ylabel() for ax in axes)
        assert axes[1].get_ylabel() == "share of current catalog"
        notes = [t.get_text() for t in fig.texts]
        assert "line: mean across seeds; band: min–max across 2 seeds" in notes
        # the band drawn is the min–max across seeds: for policy mf at step 4, values 4 and 8
        band = axes[0].collections[0].get_paths()[0].vertices
        at4 = band[np.isclose(band[:, 0], 4.0), 1]
        assert at4.min() == pytest.approx(4.0) and at4.max() == pytest.approx(8.0)
    finally:
        plt.close(fig)


def test_plot_single_seed_says_no_band():
    df = _metrics_df(seeds=(1,))
    assert band_note(df) == "line: one seed per policy (no band)"
    import matplotlib.pyplot as plt

    fig = figure_metrics(df)
    try:
        assert not any(ax.collections for ax in fig.axes)
        assert all(re.search(r"\S", ax.get_ylabel()) for ax in fig.axes if ax.axison)
    finally:
        plt.close(fig)


def test_did_you_mean_offers_a_longer_id_that_starts_with_the_word():
    from recloop.errors import did_you_mean

    assert "gini_" in did_you_mean("gini", ["gini_exposure", "gini_consumption", "utility"])
    assert did_you_mean("utilty", ["utility"]) == " Did you mean 'utility'?"
    assert did_you_mean("zzz", ["utility"]) == ""
