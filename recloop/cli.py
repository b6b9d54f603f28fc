"""The ``recloop`` command line: run, validate, schema, list, plot, report, resume, ope, evaluate (and ``llm`` tools).

Bad input is reported as one paragraph on stderr with exit code 2 and no traceback. Each command imports
what it needs when it runs (not when the module loads), so ``recloop --help`` and ``recloop validate``
start without loading the simulator, plotting or LLM code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from recloop.errors import RecloopInputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Simulate recommender feedback loops from YAML scenarios.")


def _version(value: bool) -> None:
    """``recloop --version``: print ``recloop <version>`` and stop."""
    if value:
        from recloop import __version__

        typer.echo(f"recloop {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="print the version and exit", callback=_version,
                                 is_eager=True),
) -> None:
    """Simulate recommender feedback loops from YAML scenarios."""


def _fail(msg: str, code: int = 2) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {msg}", highlight=False, markup=True)
    raise SystemExit(code)


@app.command()
def run(
    scenario: Path = typer.Argument(..., help="scenario YAML file (or the name of a shipped scenario)"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory to create"),
    seed: Optional[int] = typer.Option(None, help="override the scenario's seed"),
    steps: Optional[int] = typer.Option(None, help="override the number of cycles", min=1),
    overwrite: bool = typer.Option(False, help="replace a previous run in --out"),
    workers: int = typer.Option(1, help="processes running (policy, seed) pairs in parallel", min=1),
    executor: str = typer.Option("process", help="process (local pool) or ray (the ray extra; a cluster)"),
    progress: bool = typer.Option(True, help="show the progress bar"),
    plot: bool = typer.Option(False, help="write DIR/metrics.png at the end"),
) -> None:
    """Run a scenario into a run directory (metrics.parquet, manifest.json, checkpoints)."""
    from recloop.sim.runner import run_scenario

    manifest = run_scenario(scenario, out, seed=seed, steps=steps, overwrite=overwrite, workers=workers,
                            progress=progress, executor=executor)
    t = manifest.get("timings", {})
    typer.echo(f"done: {out} ({len(manifest['runs'])} run(s), {t.get('cycle_s_median', 0):.4f} s/cycle median, "
               f"peak RSS {t.get('peak_rss_mb', 0):.0f} MB)")
    if plot:
        from recloop.analysis.plot import plot_run

        typer.echo(f"plot: {plot_run(out)}")


@app.command()
def resume(
    run_dir: Path = typer.Argument(..., help="run directory of an interrupted run"),
    workers: int = typer.Option(1, min=1),
    executor: str = typer.Option("process", help="process or ray"),
    progress: bool = typer.Option(True),
) -> None:
    """Continue an interrupted run (even one killed with SIGKILL) from its latest checkpoints."""
    from recloop.sim.runner import resume_run

    resume_run(run_dir, workers=workers, progress=progress, executor=executor)
    typer.echo(f"done: {run_dir}")


@app.command()
def validate(scenario: Path = typer.Argument(..., help="scenario YAML file")) -> None:
    """Check a scenario file without running it: every check `run` makes while setting up, short of simulating."""
    from recloop.errors import clip
    from recloop.sim.config import load_scenario
    from recloop.sim.preflight import check_scenario

    sc = load_scenario(scenario)
    check_scenario(sc, file=str(scenario))
    pols = clip(", ".join(sc.policy_configs()), 500)
    typer.echo(f"ok: {scenario} ({sc.name}; {sc.steps} cycles; policies: {pols}; config hash {sc.config_hash()})")


@app.command()
def schema() -> None:
    """Print the JSON Schema of scenario files (for editor completion)."""
    from recloop.sim.config import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command(name="list")
def list_components(kind: Optional[str] = typer.Argument(None, help="only this kind (policy, metric, ...)")) -> None:
    """Show every registered component with its parameters and their documentation."""
    from rich.console import Console
    from rich.table import Table

    from recloop import registry
    from recloop.analysis.collectors import MetricComponent
    from recloop.describe import param_line

    if kind is not None and kind not in registry.KINDS:
        raise RecloopInputError(f"unknown kind '{kind}'. Kinds: {', '.join(registry.KINDS)}.", key="kind")
    console = Console(width=140)
    for k in [kind] if kind else registry.KINDS:
        specs = registry.specs(k)
        if not specs:
            continue
        table = Table(title=f"{k} components", show_lines=True, title_justify="left", expand=True)
        table.add_column("type", style="bold cyan", no_wrap=True)
        table.add_column("description", ratio=2)
        table.add_column("parameters", ratio=1)
        for spec in specs:
            params = [param_line(name, field) for name, field in spec.params.model_fields.items()]
            doc = " ".join(spec.doc.split("\n\n")[0].split())
            if issubclass(spec.cls, MetricComponent):
                doc += "\n" + "\n".join(f"• {m}: {d}" for m, d in spec.cls.METRICS.items())
            table.add_row(spec.name, doc, "\n".join(params) or "—")
        console.print(table)


@app.command()
def plot(
    run_dir: Path = typer.Argument(..., help="run directory"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="image file (default DIR/metrics.png)"),
    metrics: Optional[str] = typer.Option(None, help="comma-separated metric names"),
) -> None:
    """Small multiples of the metrics over time (one line per policy, a band across seeds)."""
    from recloop.analysis.plot import plot_run

    if not run_dir.is_dir():
        raise RecloopInputError("no such run directory.", file=str(run_dir))
    names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    try:
        path = plot_run(run_dir, out, names)
    except ValueError as exc:
        raise RecloopInputError(str(exc), file=str(run_dir)) from None
    typer.echo(f"plot: {path}")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="run directory (recloop run) or sweep directory (recloop sweep)"),
    baseline: Optional[str] = typer.Option(None, help="policy for paired differences (default: the sweep's "
                                           "baseline, or a run's first policy)"),
    metrics: Optional[str] = typer.Option(None, help="comma-separated metric names (default: all; plots: the "
                                          "usual ones)"),
) -> None:
    """Write DIR/report.html (self-contained) and DIR/report.md: final values and time averages with 95% t and
    bootstrap intervals across seeds, paired differences against the baseline, plots over time and, for a
    sweep, against each factor's levels with a table of effects."""
    from recloop.analysis.report import write_report

    names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    html_path, md_path = write_report(run_dir, baseline=baseline, metrics=names)
    typer.echo(f"report: {html_path}\nreport: {md_path}")
    if (run_dir / "sweep.json").is_file():  # a study of the reproduction gallery: its headline effects
        from recloop.analysis.gallery import check_sweep, format_effects

        effects = check_sweep(run_dir)
        if effects:
            typer.echo(format_effects(effects))


@app.command(name="ope")
def ope_command(
    log: str = typer.Argument(..., help="obd:random or obd:bts (the Open Bandit Dataset sample in the obp wheel, "
                              "campaign all; obd:BEHAVIOR:CAMPAIGN for men/women), or a CSV/Parquet file with "
                              "columns action (int), position (int, 0-based), reward (in [0, 1]), pscore (in (0, 1])"),
    policy: Path = typer.Option(..., "--policy", "-p", help="YAML file whose policies: are the targets: type random "
                                "(uniform slates) or bernoulli_ts (alpha, beta per item; default obp's ZOZOTOWN "
                                "prior; campaign, samples, seed); other recloop policy types are skipped"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for ope.parquet (created if missing)"),
    estimators: str = typer.Option("ipw,snipw,dm,dr", help="comma-separated: ipw, snipw, dm, dr"),
    resamples: int = typer.Option(2000, min=0, max=100_000, help="bootstrap resamples (0: no intervals)"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="seed of the bootstrap"),
) -> None:
    """Off-policy evaluation: estimate target policies' reward per impression from a logged bandit log.

    Targets are context-free (a log has no users or items to act on); estimators IPW, SNIPW, DM, DR.

    Writes DIR/ope.parquet (policy, estimator, value, lo, hi: 95% bootstrap percentile intervals) and prints it.

    Its first row, policy '(logging)' with estimator 'on_policy', is the log's own mean reward.
    """
    from rich.console import Console
    from rich.table import Table

    from recloop.analysis.ope import evaluate_log
    from recloop.sim.store import atomic_write

    names = [e.strip() for e in estimators.split(",") if e.strip()]
    if out.exists() and not out.is_dir():
        raise RecloopInputError("exists and is not a folder.", file=str(out), key="--out")
    df, skipped = evaluate_log(log, policy, names, resamples=resamples, seed=seed)
    atomic_write(out / "ope.parquet", df.write_parquet)
    table = Table(title=f"off-policy evaluation on {log}", title_justify="left")
    for col in df.columns:
        table.add_column(col, justify="right" if col in ("value", "lo", "hi") else "left")
    for row in df.iter_rows():
        table.add_row(*row[:2], *(f"{v:.6g}" for v in row[2:]))
    Console(soft_wrap=True).print(table)
    if skipped:
        typer.echo("skipped (they need users and items): " + ", ".join(f"{n} ({t})" for n, t in skipped.items()))
    typer.echo(f"wrote: {out / 'ope.parquet'}")


@app.command()
def evaluate(
    scenario: Path = typer.Argument(..., help="scenario YAML file (or the name of a shipped scenario) with a "
                                    "data-set world that has timestamps (movielens, interactions_csv)"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for evaluation.parquet (created if missing)"),
    seeds: Optional[int] = typer.Option(None, min=1, max=1000, help="seeds: the scenario seed + 0..N-1 "
                                        "(default: the scenario's replicates)"),
    trials: int = typer.Option(3, min=1, max=20, help="candidate configurations tuned per policy on the "
                               "validation item (the same budget for every policy)"),
) -> None:
    """Offline next-item evaluation of the scenario's policies (all but ideal) on the world's logged positives.

    Per user the last positive by (timestamp, item id) is the test item and the one before the validation item
    (tuning); the full catalog is ranked with the user's other items excluded. Writes DIR/evaluation.parquet
    (policy, seed, metric, value: hr@10, ndcg@10, mrr@10, coverage@10, train_s, tune_s, val_ndcg@10),
    DIR/ranks.parquet (each user's test rank) and DIR/evaluation.json (split and tuning record).
    """
    from rich.console import Console

    from recloop.analysis.evaluate import evaluate_scenario, summary_table, write_evaluation

    if out.exists() and not out.is_dir():
        raise RecloopInputError("exists and is not a folder.", file=str(out), key="--out")
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    ev = evaluate_scenario(scenario, seeds=seeds, trials=trials, log=err.print)
    for name, why in ev.skipped.items():
        err.print(f"skipped {name}: {why}")
    path = write_evaluation(ev, out)
    con = Console(soft_wrap=True)
    (con if con.is_terminal else Console(width=170)).print(summary_table(ev.frame()))
    typer.echo(f"wrote: {path}")


@app.command()
def sweep(
    study: Path = typer.Argument(..., help="study YAML file (or the name of a shipped study)"),
    out: Path = typer.Option(..., "--out", "-o", help="sweep directory (the same command again resumes it)"),
    executor: str = typer.Option("process", help="process (a local pool) or ray (a Ray cluster; the ray extra)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: a local Ray instance)"),
    workers: int = typer.Option(1, min=1, help="processes (or local Ray CPUs) running (cell, policy, seed) units"),
    overwrite: bool = typer.Option(False, help="replace a previous sweep in --out"),
    progress: bool = typer.Option(True, help="show the progress bar"),
) -> None:
    """Run a study: every cell of its factors x the scenario's policies x its seeds (resumable)."""
    from recloop.sim.sweep import run_sweep

    try:
        sw = run_sweep(study, out, executor=executor, address=address, workers=workers, overwrite=overwrite,
                       progress=progress)
    except KeyboardInterrupt:
        _fail("interrupted; run the same `recloop sweep` command again to resume the sweep.", 130)
    n = sum(len(c["units"]) for c in sw["cells"])
    typer.echo(f"done: {out} ({len(sw['cells'])} cell(s) x {len(sw['policies'])} policies x {len(sw['seeds'])} "
               f"seed(s) = {n} runs, {sw['timings']['wall_s']:.1f} s); metrics: {out}/metrics/**/*.parquet")


def _mount_optional() -> None:
    try:
        from recloop.llm.cli import llm_app
    except ImportError:
        return
    app.add_typer(llm_app, name="llm")


def main(argv: list[str] | None = None) -> None:
    _mount_optional()
    try:
        app(args=argv, standalone_mode=False, prog_name="recloop")
    except RecloopInputError as exc:
        _fail(str(exc))
    except typer.Abort:
        _fail("aborted.", 130)
    except typer.Exit as exc:
        raise SystemExit(getattr(exc, "exit_code", 0)) from None
    except Exception as exc:  # usage errors from typer's (vendored) click: show them, exit 2
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            raise SystemExit(exc.exit_code) from None
        from recloop.sim.store import DiskFullError

        if isinstance(exc, DiskFullError):  # one line, exit 1: what was written stays, `recloop resume` goes on
            _fail(str(exc), exc.exit_code)
        raise
    except KeyboardInterrupt:
        _fail("interrupted; `recloop resume DIR` continues the run from its last checkpoint.", 130)
    except BrokenPipeError:
        sys.exit(0)
