"""95 % intervals across seeds: Student t, percentile bootstrap, and paired differences against a baseline.

Seeds are the unit of replication. For one sample ``x`` of per-seed values:

* **t**: ``mean ± t(0.975, n − 1) · sd / √n`` (``scipy.stats.t.interval``);
* **bootstrap**: the 2.5 % and 97.5 % quantiles (linear interpolation) of the means of 2,000 resamples of
  ``x`` with replacement, the resample indices drawn as ``np.random.default_rng(seed).integers(0, n,
  (2000, n))`` — exactly what ``scipy.stats.bootstrap(method="percentile", rng=default_rng(seed))`` draws,
  so the two agree to rounding. Every sample of the same size reuses the same indices (deterministic and
  independent of which other groups are present);
* **paired**: under common random numbers a policy and the baseline share each seed, so the unit is the
  per-seed difference ``policy − baseline``; its t and bootstrap intervals are those of that sample.

With ``n = 1`` there is no interval (NaN, and the note says ``n = 1``); data constant across seeds give the
degenerate interval ``[c, c]`` (note ``constant``), where scipy's t interval would be NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import stats as sps

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0
_BLOCK = 4096  # groups per bootstrap matrix product
STAT_COLS = ("n", "mean", "sd", "t_lo", "t_hi", "boot_lo", "boot_hi", "note")


@dataclass(frozen=True)
class Interval:
    """Mean of a sample of per-seed values with its 95 % t and percentile-bootstrap intervals."""

    n: int
    mean: float
    sd: float
    t_lo: float
    t_hi: float
    boot_lo: float
    boot_hi: float
    note: str = ""


def t_crit(n: np.ndarray | int, level: float = LEVEL) -> np.ndarray:
    """The two-sided t quantile for samples of size ``n`` (NaN where n < 2)."""
    n = np.asarray(n, dtype=float)
    out = np.full(n.shape, np.nan)
    ok = n >= 2
    out[ok] = sps.t.ppf(0.5 + level / 2, n[ok] - 1)
    return out


def t_interval(x, level: float = LEVEL) -> tuple[float, float]:
    """Student t interval of the mean of ``x`` (NaN for n < 2; [c, c] for constant data)."""
    x = np.asarray(x, dtype=float)
    if x.size < 2:
        return (np.nan, np.nan)
    half = float(t_crit(x.size, level)) * x.std(ddof=1) / np.sqrt(x.size)
    m = float(x.mean())
    return (m - half, m + half)


def resample_weights(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(n, resamples) matrix W with ``x @ W`` = the means of the bootstrap resamples of ``x``: column b
    holds how often each observation is drawn in resample b, divided by n (scipy's draws, see module doc)."""
    idx = np.random.default_rng(seed).integers(0, n, (resamples, n))
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.repeat(np.arange(resamples), n), idx.ravel()), 1.0)
    return counts.T / n


def bootstrap_means(values: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Bootstrap distribution of the mean for each row of ``values`` (G, n) -> (G, resamples)."""
    values = np.atleast_2d(np.asarray(values, dtype=float))
    return values @ resample_weights(values.shape[1], resamples, seed)


def bootstrap_interval(x, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``x`` (NaN for n < 2)."""
    x = np.asarray(x, dtype=float)
    if x.size < 2:
        return (np.nan, np.nan)
    lo, hi = _boot_bounds(x[None, :], resamples, seed, level)
    return (float(lo[0]), float(hi[0]))


def _boot_bounds(values: np.ndarray, resamples: int, seed: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bounds per row of ``values`` (G, n), in blocks of rows (the weights are drawn once)."""
    w = resample_weights(values.shape[1], resamples, seed)
    a = (1 - level) / 2
    lo, hi = np.empty(len(values)), np.empty(len(values))
    for s in range(0, len(values), _BLOCK):
        q = np.quantile(values[s:s + _BLOCK] @ w, [a, 1 - a], axis=1)
        lo[s:s + _BLOCK], hi[s:s + _BLOCK] = q[0], q[1]
    return lo, hi


def summarize(x, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Interval:
    """Mean and both intervals of one sample of per-seed values."""
    x = np.asarray(x, dtype=float)
    row = _summarize_block(x[None, :], resamples, seed, level)
    return Interval(*(row[c][0] for c in STAT_COLS))


def _summarize_block(values: np.ndarray, resamples: int, seed: int, level: float) -> dict[str, list]:
    """Stats of each row of ``values`` (G, n): all rows have the same n."""
    g, n = values.shape
    mean = values.mean(axis=1) if n else np.full(g, np.nan)
    sd = values.std(axis=1, ddof=1) if n >= 2 else np.full(g, np.nan)
    const = (values.max(axis=1) == values.min(axis=1)) if n >= 2 else np.zeros(g, bool)
    if n >= 2:
        half = t_crit(n, level) * sd / np.sqrt(n)
        b_lo, b_hi = _boot_bounds(values, resamples, seed, level)
        b_lo, b_hi = np.where(const, mean, b_lo), np.where(const, mean, b_hi)  # exact, free of rounding
    else:
        half = b_lo = b_hi = np.full(g, np.nan)
    note = ["n = 1: no interval" if n == 1 else ("constant" if c else "") for c in const] if n else ["n = 0"] * g
    return {"n": [n] * g, "mean": list(mean), "sd": list(sd), "t_lo": list(mean - half), "t_hi": list(mean + half),
            "boot_lo": list(b_lo), "boot_hi": list(b_hi), "note": note}


_STAT_SCHEMA = {"n": pl.Int64, "mean": pl.Float64, "sd": pl.Float64, "t_lo": pl.Float64, "t_hi": pl.Float64,
                "boot_lo": pl.Float64, "boot_hi": pl.Float64, "note": pl.Utf8}


def interval_table(df: pl.DataFrame | pl.LazyFrame, by: list[str], value: str = "value",
                   resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> pl.DataFrame:
    """Per group of ``by``: n, mean, sd and the t and bootstrap intervals of ``value`` across its rows
    (one row per seed). Groups are sorted by ``by``; vectorised over groups of equal size."""
    lf = df.lazy() if isinstance(df, pl.DataFrame) else df
    groups = lf.group_by(by).agg(pl.col(value).alias("_x")).sort(by).collect()
    keys = groups.drop("_x")
    lens = groups["_x"].list.len().to_numpy()
    out = {c: [None] * groups.height for c in STAT_COLS}
    for n in np.unique(lens):
        rows = np.flatnonzero(lens == n)
        vals = np.array(groups["_x"].gather(rows).to_list(), dtype=float).reshape(len(rows), int(n))
        block = _summarize_block(vals, resamples, seed, level)
        for c in STAT_COLS:
            for r, v in zip(rows, block[c]):
                out[c][r] = v
    return keys.hstack(pl.DataFrame(out, schema=_STAT_SCHEMA))


def paired_differences(df: pl.DataFrame | pl.LazyFrame, baseline: str, by: list[str], policy: str = "policy",
                       unit: str = "seed", value: str = "value") -> pl.LazyFrame:
    """Per seed (``unit``) and group ``by``: ``value`` of each policy minus the baseline's at the same seed
    (common random numbers). Seeds the baseline lacks are dropped; the baseline's own rows are left out."""
    lf = df.lazy() if isinstance(df, pl.DataFrame) else df
    base = lf.filter(pl.col(policy) == baseline).select(*by, unit, pl.col(value).alias("_base"))
    return (lf.filter(pl.col(policy) != baseline).join(base, on=[*by, unit], how="inner")
            .with_columns((pl.col(value) - pl.col("_base")).alias(value)).drop("_base"))


def paired_table(df: pl.DataFrame | pl.LazyFrame, baseline: str, by: list[str], policy: str = "policy",
                 unit: str = "seed", value: str = "value", **kw) -> pl.DataFrame:
    """:func:`interval_table` of the paired differences (policy − baseline) per ``policy`` and ``by``."""
    diffs = paired_differences(df, baseline, by, policy, unit, value)
    return interval_table(diffs, [*by, policy], value, **kw)


def band(lf: pl.LazyFrame, by: list[str], value: str = "value", level: float = LEVEL) -> pl.DataFrame:
    """Per group ``by`` (e.g. policy, metric, step): mean across rows and its t interval (``lo``, ``hi``;
    null for one row), aggregated lazily (the t quantile joined per distinct n)."""
    agg = (lf.group_by(by).agg(pl.col(value).mean().alias("mean"), pl.col(value).std().alias("sd"),
                               pl.len().alias("n")).sort(by).collect())
    ns = np.unique(agg["n"].to_numpy()) if agg.height else np.array([], dtype=np.int64)
    crit = pl.DataFrame({"n": ns.astype(np.uint32), "_t": t_crit(ns, level)}).with_columns(
        pl.col("n").cast(agg.schema["n"]))
    half = pl.col("_t") * pl.col("sd") / pl.col("n").cast(pl.Float64).sqrt()
    return (agg.join(crit, on="n", how="left")
            .with_columns((pl.col("mean") - half).alias("lo"), (pl.col("mean") + half).alias("hi"))
            .with_columns(pl.when(pl.col("n") >= 2).then(pl.col(c)).otherwise(None).alias(c) for c in ("lo", "hi"))
            .drop("_t").sort(by))
