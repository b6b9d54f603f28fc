"""Cross-run metrics: each policy against the ideal policy of the same seed, on the same user pairs."""

from __future__ import annotations

import numpy as np
import polars as pl

from recloop.sim.cross_run import Histories, pair_jaccard_series
from recloop.sim.runner import run_scenario


def _rows(policy, seed, triples):
    s, u, i = zip(*triples)
    return pl.DataFrame({"policy": policy, "seed": seed, "step": list(s), "user": list(u), "item": list(i)})


def test_pair_jaccard_sanity_and_cumulative():
    rows = _rows("p", 0, [(0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 1, 2), (0, 1, 3), (0, 1, 4), (1, 1, 1)])
    series = pair_jaccard_series(rows, np.array([[0, 1]]), 3)  # M-HOMOG sanity
    np.testing.assert_allclose(series, [0.5, 0.75, 0.75])  # {1,2,3} vs {2,3,4}; then {1,2,3,4}
    assert pair_jaccard_series(rows, np.array([[2, 3]]), 2).tolist() == [0.0, 0.0]  # empty ∪ empty → 0


def test_run_with_ideal_writes_cross_rows(tiny_yaml, tmp_path):
    run_scenario(tiny_yaml, tmp_path / "run", progress=False)
    m = pl.read_parquet(tmp_path / "run" / "metrics.parquet")
    inter = pl.read_parquet(tmp_path / "run" / "interactions.parquet")
    for name in ("homogenization_vs_ideal", "homogenization_vs_ideal_random", "utility_vs_ideal"):
        rows = m.filter(pl.col("metric") == name)
        assert set(rows["policy"].unique()) == {"pop", "mf"}, name
        assert rows["step"].n_unique() == 12
    # the value is the difference of the two runs' Jaccard on the *policy's* similar pairs of each cycle
    pairs = pl.read_parquet(tmp_path / "run" / "similar_pairs.parquet")
    assert set(pairs["policy"].unique()) == {"pop", "ideal", "mf"} and pairs["step"].n_unique() == 12
    got = m.filter((pl.col("metric") == "homogenization_vs_ideal") & (pl.col("policy") == "mf")).sort("step")
    own = Histories(inter.filter(pl.col("policy") == "mf"))
    ref = Histories(inter.filter(pl.col("policy") == "ideal"))
    want = []
    for t in range(12):
        p = pairs.filter((pl.col("policy") == "mf") & (pl.col("step") == t)).select("user", "partner").to_numpy()
        own.advance(t)
        ref.advance(t)
        want.append(own.jaccard(p) - ref.jaccard(p))
    np.testing.assert_allclose(got["value"].to_numpy(), want)
    assert len(np.unique(want)) > 1
    util = m.filter(pl.col("metric") == "utility").sort("step")
    u_pop = util.filter(pl.col("policy") == "pop")["value"].to_numpy()
    u_ideal = util.filter(pl.col("policy") == "ideal")["value"].to_numpy()
    ratio = m.filter((pl.col("metric") == "utility_vs_ideal") & (pl.col("policy") == "pop")).sort("step")
    np.testing.assert_allclose(ratio["value"].to_numpy()[-1], u_pop.mean() / u_ideal.mean())
