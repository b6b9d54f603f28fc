"""Metrics that compare the runs of one directory with each other (written when every run is complete).

Under common random numbers every policy of a seed starts from the same world, so the ``ideal`` policy's
run is the counterfactual each other policy is compared with (Chaney et al. 2018, M-HOMOG):

* ``homogenization_vs_ideal`` (M-HOMOG (ii), as in Chaney et al.'s replication code): in each measured
  cycle the homogenization metric pairs sampled users with their most cosine-similar user under the
  *policy's* current user embedding (kept in ``similar_pairs.parquet``); the value is those pairs' mean
  Jaccard of consumption histories under the policy minus the *same* pairs' under ``ideal`` in that
  cycle. (The per-run ``homogenization_similar`` compares each run's own pairs, which can flip the order
  of policies.) Histories are what users consumed during the loop (``interactions.parquet``); the
  initial log, identical in both runs, is left out. Needs the ``homogenization`` metric.
* ``homogenization_vs_ideal_random``: the same on fixed random user pairs (M-HOMOG (i)), drawn per seed.
* ``utility_vs_ideal``: the policy's cumulative mean realised utility up to the cycle divided by ideal's.

Rows go to ``metrics.parts/_cross__*.parquet`` and so into ``metrics.parquet``, with ``group`` empty.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from recloop.rng import component_rng


def ideal_policy(scenario) -> str | None:
    """The name of the scenario's ideal policy (type ``ideal``), or None."""
    for name, cfg in scenario.policy_configs().items():
        kind = cfg.get("type") if isinstance(cfg, dict) else getattr(cfg, "type", None)
        if kind == "ideal":
            return name
    return None


def cross_run_rows(root: Path, scenario) -> pl.DataFrame | None:
    """The cross-run rows of a complete run directory, or None without an ideal policy or interactions."""
    ideal = ideal_policy(scenario)
    path = Path(root) / "interactions.parquet"
    if ideal is None or not path.exists():
        return None
    inter = pl.read_parquet(path, columns=["policy", "seed", "step", "user", "item"])
    pairs_path = Path(root) / "similar_pairs.parquet"
    similar = pl.read_parquet(pairs_path) if pairs_path.exists() else None
    frames = [_homogenization_vs_ideal(inter, ideal, scenario, similar),
              _homogenization_vs_ideal(inter, ideal, scenario, None)]
    metrics = _read_metric(root, "utility")
    if metrics is not None:
        frames.append(_utility_vs_ideal(metrics, ideal))
    out = pl.concat([f for f in frames if f is not None and len(f)], how="vertical")
    return out if len(out) else None


def _pairs(seed: int, users: np.ndarray, n_pairs: int) -> np.ndarray:
    rng = component_rng(seed, "cross_run.pairs")
    a = rng.integers(0, len(users), n_pairs)
    b = (a + rng.integers(1, max(len(users), 2), n_pairs)) % max(len(users), 1)
    return np.stack([users[a], users[b]], axis=1)


class Histories:
    """Users' cumulative consumption sets of one run, advanced cycle by cycle."""

    def __init__(self, rows: pl.DataFrame):
        self.by_step = rows.partition_by("step", as_dict=True, maintain_order=True)
        self.sets: dict[int, set] = {}
        self.t = -1

    def advance(self, step: int) -> None:
        """Add the consumption of cycles up to and including ``step``."""
        while self.t < step:
            self.t += 1
            chunk = self.by_step.get((self.t,))
            if chunk is not None:
                for u, i in zip(chunk["user"].to_list(), chunk["item"].to_list()):
                    self.sets.setdefault(u, set()).add(i)

    def jaccard(self, pairs: np.ndarray) -> float:
        """Mean Jaccard of the pairs' histories (empty ∪ empty counts 0)."""
        empty: set = set()
        vals = []
        for a, b in pairs.tolist():
            sa, sb = self.sets.get(a, empty), self.sets.get(b, empty)
            union = len(sa | sb)
            vals.append(len(sa & sb) / union if union else 0.0)
        return float(np.mean(vals)) if vals else float("nan")


def pair_jaccard_series(rows: pl.DataFrame, pairs: np.ndarray, steps: int) -> np.ndarray:
    """Mean Jaccard of fixed pairs' cumulative histories after each cycle 0..steps-1."""
    hist = Histories(rows.filter(pl.col("user").is_in(np.unique(pairs))))
    out = np.zeros(steps)
    for t in range(steps):
        hist.advance(t)
        out[t] = hist.jaccard(pairs)
    return out


def _homogenization_vs_ideal(inter: pl.DataFrame, ideal: str, scenario, similar: pl.DataFrame | None
                             ) -> pl.DataFrame | None:
    """Per (policy, seed, cycle): pairs' Jaccard under the policy minus under ideal. ``similar``: the
    policies' per-cycle similar-user pairs (M-HOMOG (ii)); None: fixed random pairs (M-HOMOG (i))."""
    out = []
    name = "homogenization_vs_ideal" if similar is not None else "homogenization_vs_ideal_random"
    for (seed,), runs in inter.partition_by("seed", as_dict=True).items():
        users = np.unique(runs["user"].to_numpy())
        if len(users) < 2:
            continue
        fixed = _pairs(int(seed), users, scenario.metrics.pairs)
        ideal_rows = runs.filter(pl.col("policy") == ideal)
        for (policy,), rows in runs.partition_by("policy", as_dict=True).items():
            if policy == ideal:
                continue
            if similar is None:
                diff = pair_jaccard_series(rows, fixed, scenario.steps) - \
                    pair_jaccard_series(ideal_rows, fixed, scenario.steps)
                out.append(_frame(policy, int(seed), np.arange(scenario.steps), diff, name))
                continue
            mine = similar.filter((pl.col("policy") == policy) & (pl.col("seed") == seed))
            steps, diff = _paired_steps(rows, ideal_rows, mine)
            if len(steps):
                out.append(_frame(policy, int(seed), steps, diff, name))
    return pl.concat(out) if out else None


def _paired_steps(rows, ideal_rows, pairs_by_step: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """For each cycle with recorded pairs: their Jaccard under the policy minus under ideal."""
    own, ref = Histories(rows), Histories(ideal_rows)
    steps, diff = [], []
    for (t,), pairs in sorted(pairs_by_step.partition_by("step", as_dict=True).items()):
        p = pairs.select("user", "partner").to_numpy()
        own.advance(t)
        ref.advance(t)
        steps.append(t)
        diff.append(own.jaccard(p) - ref.jaccard(p))
    return np.asarray(steps, np.int64), np.asarray(diff, np.float64)


def _read_metric(root: Path, metric: str) -> pl.DataFrame | None:
    parts = sorted((Path(root) / "metrics.parts").glob("*.parquet"))
    parts = [p for p in parts if not p.name.startswith("_cross__")]
    if not parts:
        return None
    return pl.scan_parquet(parts).filter((pl.col("metric") == metric) & (pl.col("group") == "")).collect()


def _utility_vs_ideal(metrics: pl.DataFrame, ideal: str) -> pl.DataFrame | None:
    cum = metrics.sort("step").with_columns(
        cum=pl.col("value").cum_sum().over(["policy", "seed"]) / pl.col("value").cum_count().over(["policy", "seed"]))
    base = cum.filter(pl.col("policy") == ideal).select("seed", "step", base=pl.col("cum"))
    rows = cum.filter(pl.col("policy") != ideal).join(base, on=["seed", "step"])
    if not len(rows):
        return None
    return rows.select("policy", "seed", "step", metric=pl.lit("utility_vs_ideal"), group=pl.lit(""),
                       value=pl.col("cum") / pl.col("base"))


def _frame(policy: str, seed: int, steps: np.ndarray, values: np.ndarray, metric: str) -> pl.DataFrame:
    n = len(values)
    return pl.DataFrame({"policy": [policy] * n, "seed": [seed] * n, "step": np.asarray(steps, np.int64),
                         "metric": [metric] * n, "group": [""] * n, "value": values.astype(np.float64)})
