"""Metrics that compare the runs of one directory with each other (written when every run is complete).

Under common random numbers every policy of a seed starts from the same world, so the ``ideal`` policy's
run is the counterfactual each other policy is compared with (Chaney et al. 2018, M-HOMOG):

* ``homogenization_vs_ideal``: mean Jaccard of the consumption histories (``interactions.parquet``,
  cumulative up to the cycle) of fixed user pairs under the policy, minus the same pairs' mean Jaccard
  under ``ideal``. Both runs are measured on the *same* pairs (the per-run ``homogenization_similar``
  compares each policy's own similar-user pairs with ideal's pairs, which can flip the order of policies).
  The pairs are similar-user pairs as in Chaney et al.: each of ``metrics.pairs`` sampled users with the
  user whose *true initial* preferences are most cosine-similar (the world is rebuilt from the seed; a
  policy's embedding would differ between the runs, so it cannot define common pairs; our choice).
  ``homogenization_vs_ideal_random`` is the same on fixed random pairs (M-HOMOG (i)).
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
    frames = [_homogenization_vs_ideal(inter, ideal, scenario, similar) for similar in (True, False)]
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


def similar_pairs(scenario, seed: int, n_pairs: int, pool: int = 4096) -> np.ndarray:
    """Sampled users, each with the user of most cosine-similar true initial preferences (the world of
    ``seed`` rebuilt from the scenario; the partner is searched in a random pool above ``pool`` users)."""
    from recloop import registry

    world = registry.build("world", scenario.world).build(component_rng(seed, "world"))
    X = np.asarray(world.users.prefs[: world.users.n], np.float64)
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    rng = component_rng(seed, "cross_run.similar_pairs")
    n = len(X)
    q = rng.choice(n, size=min(n, n_pairs), replace=False)
    cand = np.arange(n) if n <= pool else rng.choice(n, size=pool, replace=False)
    sims = X[q] @ X[cand].T
    sims[q[:, None] == cand[None, :]] = -np.inf
    sims += rng.random(sims.shape) * 1e-9  # random tie-breaking
    return np.stack([q, cand[np.argmax(sims, axis=1)]], axis=1).astype(np.int64)


def pair_jaccard_series(rows: pl.DataFrame, pairs: np.ndarray, steps: int) -> np.ndarray:
    """Mean Jaccard of the pairs' cumulative histories after each cycle 0..steps-1 (empty ∪ empty → 0)."""
    users = np.unique(pairs)
    rows = rows.filter(pl.col("user").is_in(users)).sort("step")
    sets: dict[int, set] = {int(u): set() for u in users}
    out = np.zeros(steps)
    by_step = rows.partition_by("step", as_dict=True, maintain_order=True)
    for t in range(steps):
        chunk = by_step.get((t,))
        if chunk is not None:
            for u, i in zip(chunk["user"].to_list(), chunk["item"].to_list()):
                sets[u].add(i)
        inter = np.array([len(sets[a] & sets[b]) for a, b in pairs.tolist()], np.float64)
        union = np.array([len(sets[a] | sets[b]) for a, b in pairs.tolist()], np.float64)
        out[t] = float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 0.0)))
    return out


def _homogenization_vs_ideal(inter: pl.DataFrame, ideal: str, scenario, similar: bool) -> pl.DataFrame | None:
    out = []
    n_pairs, steps = scenario.metrics.pairs, scenario.steps
    name = "homogenization_vs_ideal" if similar else "homogenization_vs_ideal_random"
    for (seed,), runs in inter.partition_by("seed", as_dict=True).items():
        users = np.unique(runs["user"].to_numpy())
        if len(users) < 2:
            continue
        pairs = similar_pairs(scenario, int(seed), n_pairs) if similar else _pairs(int(seed), users, n_pairs)
        base = pair_jaccard_series(runs.filter(pl.col("policy") == ideal), pairs, steps)
        for (policy,), rows in runs.partition_by("policy", as_dict=True).items():
            if policy == ideal:
                continue
            diff = pair_jaccard_series(rows, pairs, steps) - base
            out.append(_frame(policy, int(seed), diff, name))
    return pl.concat(out) if out else None


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


def _frame(policy: str, seed: int, values: np.ndarray, metric: str) -> pl.DataFrame:
    n = len(values)
    return pl.DataFrame({"policy": [policy] * n, "seed": [seed] * n, "step": np.arange(n, dtype=np.int64),
                         "metric": [metric] * n, "group": [""] * n, "value": values.astype(np.float64)})
