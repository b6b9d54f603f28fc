"""The reproduction gallery's headline checks: one function per paper study in ``scenarios/papers/``.

Each function takes a sweep's metrics (``DIR/metrics/**/*.parquet``: the run-store columns plus ``cell``)
and returns one :class:`Effect` per claim and policy (and per cell, for studies with several): the mean
over seeds of a per-seed effect, its 95 % Student t interval (and percentile bootstrap interval) across
seeds from :mod:`recloop.analysis.stats`, and whether the t interval lies on the paper's side of the
reference value. Seeds are the unit: every per-seed effect is computed within one seed, and paired
effects compare two policies under the same seed (common random numbers).

* :func:`chaney_2018` — Chaney, Stewart & Engelhardt 2018 (M-HOMOG (ii)): ``homogenization_vs_ideal``
  > 0 and ``utility_vs_ideal`` < 1 for ``mf`` and ``popularity``, each averaged over the last 10 cycles;
* :func:`mansoury_2020` — Mansoury et al. 2020 (M-ARP, M-POPLIFT): ``arp`` over the last 10 cycles
  minus over the first 10 > 0 for ``mf``, ``bpr`` and ``popularity``;
* :func:`echotrace_2026` — Park, Lee & Lee 2026: ``arp`` averaged over all cycles, paired against
  ``no_llm``, > 0 for ``r3_ranker`` and ``all_three``; ``llm_log_share`` (the ``llm_augmented`` share of
  the training log) at the last cycle minus the first > 0 for ``r1_augmenter`` and ``all_three``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl

from recloop.analysis import stats

WINDOW = 10  #: cycles averaged at the start and at the end of a run
AUGMENTER_GROUP = "role=augmenter,phase=feedback_loop"  #: the group of llm_log_share rows


@dataclass(frozen=True)
class Effect:
    """One headline claim for one policy (in one cell): per-seed effect summarised across seeds."""

    paper: str
    claim: str  #: what is measured, e.g. "homogenization_vs_ideal, mean of the last 10 cycles"
    policy: str
    cell: str
    side: str  #: ">" or "<": the paper's direction relative to ``reference``
    reference: float
    n: int  #: seeds
    mean: float
    t_lo: float
    t_hi: float
    boot_lo: float
    boot_hi: float

    @property
    def passed(self) -> bool:
        """The 95 % t interval lies strictly on the paper's side of the reference."""
        if math.isnan(self.t_lo) or math.isnan(self.t_hi):
            return False
        return self.t_lo > self.reference if self.side == ">" else self.t_hi < self.reference

    def row(self) -> dict:
        return {**asdict(self), "passed": self.passed}


# ------------------------------------------------------------------------------------------------ helpers
def _frame(metrics: pl.DataFrame | pl.LazyFrame, metric: str, group: str = "") -> pl.DataFrame:
    lf = metrics.lazy() if isinstance(metrics, pl.DataFrame) else metrics
    if "cell" not in lf.collect_schema().names():
        lf = lf.with_columns(pl.lit("run").alias("cell"))
    return (lf.filter((pl.col("metric") == metric) & (pl.col("group") == group))
            .select("cell", "policy", "seed", "step", "value").collect())


def _window_mean(df: pl.DataFrame, first: bool, window: int = WINDOW) -> pl.DataFrame:
    """Per (cell, policy, seed): the mean over the first or the last ``window`` cycles it recorded."""
    edge = pl.col("step").min() if first else pl.col("step").max()
    cut = (pl.col("step") < edge.over("cell", "policy", "seed") + window) if first else \
        (pl.col("step") > edge.over("cell", "policy", "seed") - window)
    return df.filter(cut).group_by("cell", "policy", "seed").agg(pl.col("value").mean())


def _effects(per_seed: pl.DataFrame, paper: str, claim: str, policies: tuple[str, ...], side: str,
             reference: float) -> list[Effect]:
    """Summarise per-seed values (cell, policy, seed, value) of the named policies across seeds."""
    out = []
    for cell in sorted(per_seed["cell"].unique().to_list()):
        for policy in policies:
            x = per_seed.filter((pl.col("cell") == cell) & (pl.col("policy") == policy)).sort("seed")["value"]
            if len(x) == 0:
                continue
            s = stats.summarize(x.to_numpy())
            out.append(Effect(paper, claim, policy, cell, side, reference, s.n, s.mean, s.t_lo, s.t_hi,
                              s.boot_lo, s.boot_hi))
    return out


def _missing(paper: str, claim: str, policies: tuple[str, ...], side: str, reference: float) -> list[Effect]:
    nan = float("nan")
    return [Effect(paper, claim, p, "-", side, reference, 0, nan, nan, nan, nan, nan) for p in policies]


# ------------------------------------------------------------------------------------------------ papers
def chaney_2018(metrics, policies: tuple[str, ...] = ("mf", "popularity"), window: int = WINDOW) -> list[Effect]:
    """Chaney et al. 2018: homogenization relative to ideal > 0, utility relative to ideal < 1 (last cycles)."""
    paper, out = "Chaney et al. 2018", []
    for metric, side, ref in (("homogenization_vs_ideal", ">", 0.0), ("utility_vs_ideal", "<", 1.0)):
        claim = f"{metric}, mean of the last {window} cycles"
        df = _frame(metrics, metric)
        out += _effects(_window_mean(df, False, window), paper, claim, policies, side, ref) if len(df) else \
            _missing(paper, claim, policies, side, ref)
    return out


def mansoury_2020(metrics, policies: tuple[str, ...] = ("mf", "bpr", "popularity"),
                  window: int = WINDOW) -> list[Effect]:
    """Mansoury et al. 2020: arp over the last ``window`` cycles minus over the first ``window`` > 0."""
    paper, claim = "Mansoury et al. 2020", f"arp, last {window} cycles minus first {window}"
    df = _frame(metrics, "arp")
    if not len(df):
        return _missing(paper, claim, policies, ">", 0.0)
    first = _window_mean(df, True, window).rename({"value": "first"})
    rise = _window_mean(df, False, window).join(first, on=["cell", "policy", "seed"]).with_columns(
        pl.col("value") - pl.col("first"))
    return _effects(rise, paper, claim, policies, ">", 0.0)


def echotrace_2026(metrics, baseline: str = "no_llm", rankers: tuple[str, ...] = ("r3_ranker", "all_three"),
                   augmenters: tuple[str, ...] = ("r1_augmenter", "all_three")) -> list[Effect]:
    """EchoTrace 2026: arp above no_llm's (paired per seed) for the re-ranking policies; the augmented share
    of the training log grows (last cycle minus first) for the augmenting policies."""
    paper = "Park, Lee & Lee 2026 (EchoTrace)"
    claim = f"arp, mean over all cycles, minus {baseline}'s (paired)"
    df = _frame(metrics, "arp")
    avg = df.group_by("cell", "policy", "seed").agg(pl.col("value").mean())
    diffs = stats.paired_differences(avg, baseline, by=["cell"]).collect() if len(df) else avg
    out = _effects(diffs, paper, claim, rankers, ">", 0.0) if len(diffs) else \
        _missing(paper, claim, rankers, ">", 0.0)
    claim = "llm_log_share (llm_augmented share of the training log), last cycle minus first"
    share = _frame(metrics, "llm_log_share", AUGMENTER_GROUP)
    if not len(share):
        return out + _missing(paper, claim, augmenters, ">", 0.0)
    first = _window_mean(share, True, 1).rename({"value": "first"})
    growth = _window_mean(share, False, 1).join(first, on=["cell", "policy", "seed"]).with_columns(
        pl.col("value") - pl.col("first"))
    return out + _effects(growth, paper, claim, augmenters, ">", 0.0)


#: study name (as in ``scenarios/papers/``) -> its headline check
GALLERY: dict[str, Callable[..., list[Effect]]] = {
    "chaney-2018": chaney_2018,
    "mansoury-2020": mansoury_2020,
    "echotrace-2026": echotrace_2026,
}


def check_sweep(out: str | Path, study: str | None = None) -> list[Effect] | None:
    """The headline effects of a gallery study's sweep directory (None when the study is not in the
    gallery). ``study`` defaults to the name in ``DIR/sweep.json``."""
    import json

    root = Path(out)
    name = study or json.loads((root / "sweep.json").read_text()).get("study")
    fn = GALLERY.get(str(name))
    if fn is None:
        return None
    return fn(pl.scan_parquet(str(root / "metrics" / "**" / "*.parquet"), hive_partitioning=False))


def effects_table(effects: list[Effect]) -> pl.DataFrame:
    """The effects as a frame (one row each, with ``passed``)."""
    return pl.DataFrame([e.row() for e in effects])


def format_effects(effects: list[Effect]) -> str:
    """A plain-text table: claim, policy, mean with its 95 % t interval, pass or fail."""
    lines = []
    for e in effects:
        cell = "" if e.cell in ("base", "run") else f" [{e.cell}]"
        verdict = "PASS" if e.passed else "FAIL"
        lines.append(f"{verdict}  {e.paper}: {e.claim} {e.side} {e.reference:g} - {e.policy}{cell}: "
                     f"{e.mean:.4g} [{e.t_lo:.4g}, {e.t_hi:.4g}] (n = {e.n})")
    return "\n".join(lines)
