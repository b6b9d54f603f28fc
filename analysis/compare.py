"""Comparisons between policies of one run (e.g. utility relative to the ideal policy, M-UTIL/M-HOMOG)."""

from __future__ import annotations

import polars as pl


def relative_to(df: pl.DataFrame, reference: str = "ideal", mode: str = "ratio") -> pl.DataFrame:
    """Each policy's metric value relative to ``reference`` at the same (seed, step, metric, group).

    ``mode="ratio"`` gives value / reference (Chaney's utility ratio to ideal), ``"diff"`` gives
    value − reference (the M-HOMOG similar-pairs convention).
    """
    ref = df.filter(pl.col("policy") == reference).select(
        "seed", "step", "metric", "group", pl.col("value").alias("reference"))
    if ref.height == 0:
        raise ValueError(f"no policy named {reference!r} in this run")
    joined = df.join(ref, on=["seed", "step", "metric", "group"], how="inner")
    expr = pl.col("value") / pl.col("reference") if mode == "ratio" else pl.col("value") - pl.col("reference")
    return joined.with_columns(expr.alias("relative")).drop("reference")


def final_values(df: pl.DataFrame, last: int = 10) -> pl.DataFrame:
    """Mean of each policy's metrics over its last ``last`` cycles (and across seeds)."""
    top = df.group_by(["policy", "seed"]).agg(pl.col("step").max().alias("smax"))
    return (
        df.join(top, on=["policy", "seed"])
        .filter(pl.col("step") > pl.col("smax") - last)
        .group_by(["policy", "metric", "group"])
        .agg(pl.col("value").mean())
        .sort(["metric", "group", "policy"])
    )
