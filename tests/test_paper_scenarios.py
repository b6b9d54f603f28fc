"""The shipped paper scenarios reproduce their papers' direction of effect (shortened runs)."""

import polars as pl

from recloop.analysis.compare import final_values
from recloop.sim.config import load_scenario
from recloop.sim.runner import run_scenario


def _final(df, metric, group=""):
    fv = final_values(df, last=5).filter((pl.col("metric") == metric) & (pl.col("group") == group))
    return dict(zip(fv["policy"].to_list(), fv["value"].to_list()))


def test_chaney_homogenization_and_utility_loss(tmp_path):
    sc = load_scenario("chaney-homogenization", overrides={
        "steps": 40, "replicates": 1, "world.n_users": 400, "world.n_items": 600,
        "policies": {"ideal": {"type": "ideal"}, "mf": {"type": "als", "factors": 20},
                     "popularity": {"type": "popularity"}}})
    run_scenario(sc, tmp_path / "run", progress=False)
    df = pl.read_parquet(tmp_path / "run" / "metrics.parquet")
    util = _final(df, "utility")
    homog = _final(df, "homogenization_similar")
    assert util["ideal"] > util["mf"] and util["ideal"] > util["popularity"], util
    assert homog["popularity"] > homog["ideal"], homog
    assert homog["mf"] > homog["ideal"], homog


def test_popularity_amplification_on_movielens(tmp_path):
    sc = load_scenario("popularity-amplification", overrides={
        "steps": 10, "replicates": 1, "metrics.user_sample": 400,
        "policies": {"popularity": {"type": "popularity"}, "item_knn": {"type": "item_knn"},
                     "mf": {"type": "als", "factors": 32}, "random": {"type": "random"}}})
    run_scenario(sc, tmp_path / "run", progress=False)
    df = pl.read_parquet(tmp_path / "run" / "metrics.parquet")
    arp = df.filter(pl.col("metric") == "arp")
    first = dict(arp.filter(pl.col("step") < 2).group_by("policy").agg(pl.col("value").mean()).iter_rows())
    last = dict(arp.filter(pl.col("step") >= 8).group_by("policy").agg(pl.col("value").mean()).iter_rows())
    for pol in ("popularity", "item_knn"):
        assert last[pol] > first[pol], (pol, first[pol], last[pol])  # popularity of recommendations rises
    lift = {g: _final(df, "pop_lift", g) for g in ("niche", "blockbuster")}
    for pol in ("popularity", "item_knn", "mf"):
        assert lift["niche"][pol] > lift["blockbuster"][pol], (pol, lift)  # niche users are hit hardest
    assert _final(df, "arp")["random"] < _final(df, "arp")["mf"]
