"""`recloop evaluate`: metric definitions, the leave-last-two-out split, exclusion of the user's other
items, the command end to end on a small MovieLens-100K subset, and worlds without timestamps."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import polars as pl
import pytest

from recloop.analysis.evaluate import (
    OfflineState,
    Setting,
    fit_policy,
    leave_last_two,
    top_k,
    world_timeline,
)
from recloop.analysis.offline_metrics import paired_bootstrap_ratio, ranking_metrics, target_ranks
from recloop.cli import main
from recloop.registry import names
from recloop.rng import component_rng
from recloop.sim.config import load_scenario
from recloop.sim.engine import ScoringEngine

SEQUENTIAL = {"sasrec", "cosrec"} <= set(names("policy"))


def test_metrics_on_a_hand_made_example():
    slates = np.array([[5, 3, 9, 11], [1, 2, 4, 6], [7, 8, -1, -1], [0, 10, 12, 13]])
    targets = np.array([5, 6, 8, -1])  # hit at 0; at position 3 (outside k=3); hit at 1; -1 never matches
    assert target_ranks(slates[:, :3], targets).tolist() == [0, -1, 1, -1]
    m = ranking_metrics(slates, targets, n_items=20, k=3)
    assert m["hr@3"] == pytest.approx(2 / 4)
    assert m["ndcg@3"] == pytest.approx((1.0 + 1.0 / math.log2(3)) / 4)
    assert m["mrr@3"] == pytest.approx((1.0 + 0.5) / 4)
    # distinct items in the top 3 lists: 5 3 9 1 2 4 7 8 0 10 12 -> 11 of 20
    assert m["coverage@3"] == pytest.approx(11 / 20)


def test_paired_bootstrap_ratio_is_paired():
    rng = np.random.default_rng(0)
    b = rng.random(500)
    ratio, lo, hi = paired_bootstrap_ratio(2.0 * b, b, resamples=200)
    assert ratio == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    ratio, lo, hi = paired_bootstrap_ratio(b + rng.normal(0, 0.3, 500), b, resamples=300)
    assert lo < ratio < hi


def test_split_last_by_timestamp_then_item_and_validation_before():
    #          user 0: items 7,3 tie at t=5 -> order 9(1) 4(2) 3(5) 7(5); user 1: two positives (dropped);
    #          user 2: three ties at t=10 -> order 0 1 2; user 3: none
    users = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    items = np.array([7, 3, 9, 4, 5, 6, 1, 2, 0])
    ts = np.array([5, 5, 1, 2, 3, 4, 10, 10, 10], float)
    s = leave_last_two(users, items, ts, n_users=4)
    assert s.users.tolist() == [0, 2]
    assert s.test.tolist() == [7, 2] and s.valid.tolist() == [3, 1]
    assert s.n_dropped == 1
    # training rows in time order (timestamp, user, item); the dropped user's positives stay
    assert list(zip(s.train_users.tolist(), s.train_items.tolist())) == [(0, 9), (0, 4), (1, 5), (1, 6), (2, 0)]
    u, i = s.with_valid()
    assert list(zip(u.tolist(), i.tolist())) == [(0, 9), (0, 4), (1, 5), (1, 6), (0, 3), (2, 0), (2, 1)]


@pytest.fixture
def csv_scenario(tmp_path):
    """A small interactions_csv world with timestamps: 40 users, 30 items (popularity skewed)."""
    rng = np.random.default_rng(5)
    rows = []
    weights = 1.0 / np.arange(1, 31)
    for u in range(40):
        for j, it in enumerate(rng.choice(30, size=8, replace=False, p=weights / weights.sum())):
            rows.append((f"u{u}", f"i{it:02d}", 5, int(rng.integers(0, 4)) + 10 * j))
    pl.DataFrame(rows, schema=["user_id", "item_id", "rating", "ts"], orient="row").write_csv(tmp_path / "log.csv")
    path = tmp_path / "csv.yaml"
    path.write_text(textwrap.dedent(f"""
        name: csv
        world: {{type: interactions_csv, path: {tmp_path / 'log.csv'}, rating_col: rating, timestamp_col: ts,
                 dim: 4}}
        policies:
          popularity: {{type: popularity}}
    """))
    return path


def test_other_items_excluded_and_sequences_in_time_order(csv_scenario):
    sc = load_scenario(csv_scenario)
    gen, (u, i, t) = world_timeline(sc)
    world = gen.build(component_rng(0, "world"))
    split = leave_last_two(u, i, t, world.users.n)
    assert len(split.users) == 40
    s = Setting(sc, gen, world, ScoringEngine(), 0)
    cfg = {"type": "popularity"}
    for state, held in ((OfflineState(world, split.train_users, split.train_items), None),
                        (OfflineState(world, *split.with_valid()), split.valid)):
        policy, view, _ = fit_policy(s, "popularity", cfg, state)
        slates = top_k(policy, view, split.users, s.engine)
        data = state.log.training_data(world.users.n, world.items.n)
        pop = np.bincount(data.items, minlength=world.items.n)
        for r, user in enumerate(split.users):
            own = set(data.items[data.users == user].tolist())
            assert not own & set(slates[r].tolist()), user  # the user's other items never come back
            if held is not None:
                assert held[r] in own
            # popularity ranks the rest by count, ties by lower id: the first slot is the best unseen item
            rest = [j for j in np.lexsort((np.arange(world.items.n), -pop)).tolist() if j not in own]
            assert slates[r].tolist() == rest[:10]
        # the policy's view gives each user's items in time order (timestamp, then item id)
        last = view.sequences(split.users, 3)[:, -1]
        expect = split.valid if held is not None else np.array(
            [split.train_items[split.train_users == user][-1] for user in split.users])
        assert last.tolist() == expect.tolist()


def _popularity_by_hand(sc) -> dict[str, float]:
    """NDCG@10 and HR@10 of popularity under the protocol, computed independently with plain NumPy."""
    from recloop import registry

    gen = registry.build("world", sc.world)
    u, i, t = gen.timeline("positives")
    n_items = gen.build(component_rng(0, "world")).items.n
    by_user: dict[int, list[tuple[float, int]]] = {}
    for uu, ii, tt in zip(u.tolist(), i.tolist(), t.tolist()):
        by_user.setdefault(uu, []).append((tt, ii))
    test = {uu: sorted(v)[-1][1] for uu, v in by_user.items() if len(v) >= 3}
    train_pairs = {(uu, ii) for uu, v in by_user.items() for _, ii in v if test.get(uu) != ii}
    pop = np.zeros(n_items)
    for _, ii in train_pairs:
        pop[ii] += 1
    order = sorted(range(len(pop)), key=lambda j: (-pop[j], j))
    hits, ndcg = 0, 0.0
    for uu, target in test.items():
        own = {ii for _, ii in by_user[uu]} - {target}
        top = [j for j in order if j not in own][:10]
        if target in top:
            hits += 1
            ndcg += 1.0 / math.log2(top.index(target) + 2)
    return {"hr@10": hits / len(test), "ndcg@10": ndcg / len(test)}


def test_evaluate_end_to_end_on_a_movielens_subset(tmp_path, capsys):
    seq = ""
    if SEQUENTIAL:
        seq = ("  sasrec: {type: sasrec, dim: 8, max_len: 10, blocks: 1, initial_epochs: 2, epochs: 1, "
               "max_sequences: 256}\n")
    path = tmp_path / "ml.yaml"
    path.write_text(textwrap.dedent("""
        name: ml-small
        seed: 4
        world: {type: movielens, dim: 8, n_users: 120, n_items: 300}
        policies:
          popularity: {type: popularity}
          als: {type: als, factors: 8, iterations: 5}
          ideal: {type: ideal}
    """) + seq)
    out = tmp_path / "eval"
    main(["evaluate", str(path), "--out", str(out), "--seeds", "2", "--trials", "2"])
    captured = capsys.readouterr()
    assert "dropped" in captured.err and "skipped ideal" in captured.err
    assert "ndcg@10" in captured.out
    df = pl.read_parquet(out / "evaluation.parquet")
    assert df.columns == ["policy", "seed", "metric", "value"]
    pols = {"popularity", "als"} | ({"sasrec"} if SEQUENTIAL else set())
    assert set(df["policy"].unique()) == pols  # ideal sees the answer: skipped
    assert set(df["seed"].unique()) == {4, 5}
    assert {"hr@10", "ndcg@10", "mrr@10", "coverage@10", "train_s"} <= set(df["metric"].unique())
    wide = {(p, s, m): v for p, s, m, v in df.iter_rows()}
    for p in pols:
        for s in (4, 5):
            hr, nd, mrr = wide[(p, s, "hr@10")], wide[(p, s, "ndcg@10")], wide[(p, s, "mrr@10")]
            assert 0.0 <= mrr <= nd <= hr <= 1.0
            assert 0.0 < wide[(p, s, "coverage@10")] <= 1.0 and wide[(p, s, "train_s")] >= 0.0
    hand = _popularity_by_hand(load_scenario(path))
    assert wide[("popularity", 4, "hr@10")] == pytest.approx(hand["hr@10"])
    assert wide[("popularity", 4, "ndcg@10")] == pytest.approx(hand["ndcg@10"])
    assert wide[("als", 4, "ndcg@10")] > wide[("popularity", 4, "ndcg@10")] * 0.5  # learned, not broken
    ranks = pl.read_parquet(out / "ranks.parquet")
    assert ranks.columns == ["policy", "seed", "user", "rank"]


def test_world_without_timestamps_exits_2(tiny_yaml, write_yaml, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(tiny_yaml), "--out", str(tmp_path / "o")])
    err = " ".join(capsys.readouterr().err.split())
    assert exc.value.code == 2 and "Traceback" not in err
    assert "world.type" in err and "timestamps" in err and "chaney" in err
    (tmp_path / "log.csv").write_text("user_id,item_id\na,x\na,y\nb,x\nb,z\nc,y\nc,z\n")
    p = write_yaml(f"world: {{type: interactions_csv, path: {tmp_path / 'log.csv'}, dim: 1}}\n"
                   "policy: {type: popularity}\n", "csv.yaml")
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(p), "--out", str(tmp_path / "o")])
    err = " ".join(capsys.readouterr().err.split())
    assert exc.value.code == 2 and "timestamp_col" in err


@pytest.mark.skipif(not SEQUENTIAL, reason="the sasrec and cosrec policies are not registered yet")
def test_sequential_scenario_validates_and_runs_reduced(tmp_path, capsys):
    from recloop.sim.runner import run_scenario

    main(["validate", "sequential"])
    assert "ok:" in capsys.readouterr().out
    small = {"dim": 8, "max_len": 10, "blocks": 1, "heads": 1, "initial_epochs": 1, "epochs": 1,
             "max_sequences": 256}
    sc = load_scenario("sequential", overrides={
        "steps": 3, "world.n_users": 150, "world.n_items": 300, "retrain.every": 2, "metrics.user_sample": 100,
        "policies.sasrec": {"type": "sasrec", **small}, "policies.cosrec": {"type": "cosrec", **small}})
    run_scenario(sc, tmp_path / "run", progress=False)
    df = pl.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert set(df["policy"].unique()) == {"popularity", "als", "bpr", "sasrec", "cosrec"}
    assert {"arp", "utility"} <= set(df["metric"].unique())


def test_only_ground_truth_policies_exit_2(write_yaml, tmp_path, capsys):
    p = write_yaml("world: {type: movielens, dim: 4, n_users: 30, n_items: 60}\npolicy: {type: ideal}\n", "o.yaml")
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(p), "--out", str(tmp_path / "o")])
    err = " ".join(capsys.readouterr().err.split())
    assert exc.value.code == 2 and "nothing to evaluate" in err and "Traceback" not in err
