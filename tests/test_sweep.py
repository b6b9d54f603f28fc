"""Sweeps (`recloop sweep`): a 2 x 2 x 2 study end to end on a local pool and on Ray, common random numbers
across cells, resume after an interruption mid-cell, no state leaking between cells in a reused worker,
invalid cells refused before anything runs, and the lazy scan of the whole study."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import polars as pl
import pytest
import yaml

from recloop.cli import main
from recloop.sim.model import FeedbackLoop
from recloop.sim.runner import run_scenario
from recloop.sim.store import RunStore
from recloop.sim.study import cell_id, load_study
from recloop.sim.sweep import read_sweep_metrics, run_sweep
from recloop.sim.sweep_exec import UnitSpec, execute_units

SCENARIO = """
name: tiny-sweep
seed: 0
steps: 6
k: 5
world: {type: chaney, n_users: 120, n_items: 100, dim: 8, n_creators: 5}
users:
  choice: {type: mnl, temperature: 0.02, no_click_utility: 0.05, position_bias: 0.5}
  dynamics: [{type: drift, rate: 0.05}]
creators: {type: trecs, creation_prob: 0.2}
policies:
  pop: {type: popularity}
  mf: {type: als, factors: 4, iterations: 2}
  ideal: {type: ideal}
retrain: {every: 3}
initial_log: {interactions_per_user: 3}
metrics: {pairs: 40, user_sample: 50, regret_sample: 20}
output: {checkpoint_every: 2, flush_every: 2}
"""
STUDY = """
study: tiny-grid
scenario: tiny.yaml
seeds: [1, 2]
baseline: mf
factors:
  retrain.every: [1, 3]
  users.choice.temperature: [0.02, 0.1]
"""
SORT = ["cell", "policy", "seed", "step", "metric", "group"]
N_UNITS = 4 * 3 * 2  # cells x policies x seeds


def _write(folder, text: str, name: str):
    p = folder / name
    p.write_text(textwrap.dedent(text))
    return p


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    _write(d, SCENARIO, "tiny.yaml")
    _write(d, STUDY, "study.yaml")
    return d


@pytest.fixture(scope="module")
def reference(study_dir, tmp_path_factory):
    """The uninterrupted sweep, run in this process (workers=1)."""
    out = tmp_path_factory.mktemp("ref") / "sweep"
    run_sweep(study_dir / "study.yaml", out, progress=False)
    return out


def _metrics(out) -> pl.DataFrame:
    return read_sweep_metrics(out).collect().sort(SORT)


def test_grid_sweep_end_to_end_on_a_local_pool(study_dir, reference, tmp_path):
    out = tmp_path / "pool"
    main(["sweep", str(study_dir / "study.yaml"), "--out", str(out), "--workers", "2", "--no-progress"])
    sw = json.loads((out / "sweep.json").read_text())
    assert sw["status"] == "complete" and sw["study"] == "tiny-grid" and sw["baseline"] == "mf"
    assert sw["policies"] == ["pop", "mf", "ideal"] and sw["seeds"] == [1, 2] and sw["design"] == "grid"
    assert sw["factors"] == {"retrain.every": [1, 3], "users.choice.temperature": [0.02, 0.1]}
    assert len(sw["cells"]) == 4 and len({c["id"] for c in sw["cells"]}) == 4
    pids = set()
    for cell in sw["cells"]:
        assert cell["status"] == "complete" and len(cell["units"]) == 6
        assert all(u["status"] == "complete" and u["wall_s"] > 0 for u in cell["units"].values())
        run = out / cell["run_dir"]
        man = json.loads((run / "manifest.json").read_text())
        assert man["status"] == "complete" and man["sweep"]["factors"] == cell["factors"]
        pids |= {r["worker"]["pid"] for r in man["runs"].values()}
        resolved = yaml.safe_load((run / "scenario.yaml").read_text())
        assert resolved["retrain"]["every"] == cell["factors"]["retrain.every"]
        assert resolved["users"]["choice"]["temperature"] == cell["factors"]["users.choice.temperature"]
        parts = sorted(p.name for p in (out / cell["metrics_dir"]).iterdir())
        units = [f"part-{p}__seed{s}.parquet" for p in ("pop", "mf", "ideal") for s in (1, 2)]
        assert set(units) <= set(parts) and len(parts) <= len(units) + 1  # + the runner's cross-run rows
        # the study's parts hold exactly the cell run's metrics, plus the cell and factor columns
        cell_df = pl.read_parquet(run / "metrics.parquet").sort(SORT[1:])
        parts_df = pl.read_parquet(out / cell["metrics_dir"]).sort(SORT[1:])
        assert parts_df.drop(["cell", "retrain.every", "users.choice.temperature"]).equals(cell_df)
    assert len(pids) == 2  # two worker processes, each reused across cells
    assert (out / "study.yaml").is_file() and yaml.safe_load((out / "study.yaml").read_text())["baseline"] == "mf"
    pool, serial = _metrics(out), _metrics(reference)
    assert pool.equals(serial)  # bit-identical to the same sweep in one process
    # a cell's run equals `recloop run` of its scenario.yaml: the sweep adds nothing to a run
    first = sw["cells"][0]
    run_scenario(out / first["run_dir"] / "scenario.yaml", tmp_path / "alone", progress=False)
    alone = pl.read_parquet(tmp_path / "alone" / "metrics.parquet").filter(pl.col("seed").is_in([1, 2]))
    assert alone.sort(SORT[1:]).equals(pl.read_parquet(out / first["run_dir"] / "metrics.parquet").sort(SORT[1:]))


def test_lazy_scan_reads_the_whole_study_with_factor_columns(reference):
    lf = pl.scan_parquet(str(reference / "metrics" / "**" / "*.parquet"))
    schema = lf.collect_schema()
    assert schema["retrain.every"] == pl.Int64 and schema["users.choice.temperature"] == pl.Float64
    assert schema["cell"] == pl.Utf8 and schema["value"] == pl.Float64 and schema["seed"] == pl.Int64
    levels = lf.select("retrain.every", "users.choice.temperature").unique().collect()
    assert levels.height == 4
    per = lf.group_by("cell").agg(pl.col("retrain.every").n_unique().alias("n"), pl.len().alias("rows")).collect()
    assert per.height == 4 and per["n"].to_list() == [1] * 4 and per["rows"].min() > 0
    assert lf.select(pl.len()).collect().item() == _metrics(reference).height
    # the folder form (where readers may infer Hive partitions) gives the same columns
    assert pl.scan_parquet(str(reference / "metrics")).collect_schema() == schema


def test_duckdb_reads_the_whole_study(reference):
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    got = con.execute(f"""SELECT count(*), count(DISTINCT "retrain.every") FROM
                          read_parquet('{reference}/metrics/**/*.parquet')""").fetchone()
    assert got == (_metrics(reference).height, 2)


def test_cells_sharing_a_seed_start_from_the_identical_world(study_dir, reference):
    study = load_study(study_dir / "study.yaml", preflight=False)
    by = {(c.values["retrain.every"], c.values["users.choice.temperature"]): c for c in study.cells}
    a, b = by[(1, 0.02)].scenario, by[(3, 0.02)].scenario
    ma = FeedbackLoop(a, "mf", a.policy_configs()["mf"], 2)
    mb = FeedbackLoop(b, "mf", b.policy_configs()["mf"], 2)
    assert np.array_equal(ma.world.users.prefs, mb.world.users.prefs)
    assert np.array_equal(ma.world.items.attrs, mb.world.items.attrs)
    assert all(np.array_equal(x, y) for x, y in zip(ma.history.to_coo(), mb.history.to_coo()))
    other = FeedbackLoop(a, "mf", a.policy_configs()["mf"], 1)
    assert not np.array_equal(ma.world.users.prefs, other.world.users.prefs)
    # in the sweep's output: cycle 0 (before any retrain differs) is identical across retrain.every
    df = _metrics(reference).filter((pl.col("step") == 0) & (pl.col("users.choice.temperature") == 0.02))
    one = df.filter(pl.col("retrain.every") == 1).drop("cell", "retrain.every")
    three = df.filter(pl.col("retrain.every") == 3).drop("cell", "retrain.every")
    assert one.height > 0 and one.equals(three)
    later = _metrics(reference).filter(pl.col("metric") == "utility", pl.col("group") == "", pl.col("step") == 5)
    assert later.filter(pl.col("retrain.every") == 1)["value"].to_list() != \
        later.filter(pl.col("retrain.every") == 3)["value"].to_list()  # the factor matters later on


def test_ray_sweep_equals_the_local_pool(study_dir, reference, tmp_path):
    ray = pytest.importorskip("ray", reason="the ray extra is installed by scripts/setup.sh")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "ray"
        run_sweep(study_dir / "study.yaml", out, executor="ray", progress=False)
    finally:
        ray.shutdown()
    assert json.loads((out / "sweep.json").read_text())["status"] == "complete"
    assert _metrics(out).equals(_metrics(reference))


def test_resume_after_an_interruption_mid_cell_is_bit_identical(study_dir, reference, tmp_path, monkeypatch):
    out = tmp_path / "cut"
    calls = {"n": 0}
    step = FeedbackLoop.step

    def interrupting(self):
        calls["n"] += 1
        if calls["n"] == 6 * 3 + 4:  # the fourth unit, after its checkpoint at cycle 2
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(FeedbackLoop, "step", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(study_dir / "study.yaml", out, progress=False)
    sw = json.loads((out / "sweep.json").read_text())
    assert sw["status"] == "interrupted"
    first = sw["cells"][0]
    assert [u["status"] for u in first["units"].values()] == ["complete"] * 3 + ["pending"] * 3
    assert len(list((out / "metrics").rglob("*.parquet"))) == 3
    cut_key = list(first["units"])[3]
    assert [c.step for c in RunStore(out / first["run_dir"]).checkpoints(cut_key)] == [2]

    calls["n"] = -10**9  # resume without interruptions, counting the cycles it runs
    run_sweep(study_dir / "study.yaml", out, progress=False)
    assert calls["n"] + 10**9 == N_UNITS * 6 - 3 * 6 - 2  # finished units skipped, the cut one resumed at 2
    assert json.loads((out / "sweep.json").read_text())["status"] == "complete"
    assert _metrics(out).equals(_metrics(reference))
    for cell in sw["cells"]:
        a = pl.read_parquet(out / cell["run_dir"] / "metrics.parquet")
        assert a.equals(pl.read_parquet(reference / cell["run_dir"] / "metrics.parquet"))
    # the same study on a finished sweep runs nothing (also from the resolved copy the sweep keeps)
    calls["n"] = 0
    run_sweep(out / "study.yaml", out, progress=False)
    assert calls["n"] == 0


def test_no_state_leaks_between_cells_in_a_reused_worker(study_dir, reference, tmp_path):
    study = load_study(study_dir / "study.yaml", preflight=False)
    a, b = study.cells[0], study.cells[-1]

    def spec(cell, root, policy="mf"):
        return UnitSpec(f"{cell.id}/{policy}__seed1", cell.scenario.resolved(), policy, 1, str(root),
                        str(root / "scenario.yaml"))

    done: dict[str, dict] = {}
    on_done = lambda s, entry: done.__setitem__(s.root, entry)  # noqa: E731
    after = [spec(a, tmp_path / "a"), spec(a, tmp_path / "a", "pop"), spec(b, tmp_path / "b")]
    execute_units(after, executor="process", workers=1, on_done=on_done, on_cycle=lambda *x: None)
    assert done[str(tmp_path / "a")]["worker"]["pid"] == done[str(tmp_path / "b")]["worker"]["pid"]
    execute_units([spec(b, tmp_path / "alone")], executor="process", workers=1, on_done=on_done,
                  on_cycle=lambda *x: None)
    assert done[str(tmp_path / "alone")]["worker"]["pid"] != done[str(tmp_path / "b")]["worker"]["pid"]
    read = lambda d: pl.read_parquet([str(p) for p, _ in RunStore(d).parts()]).sort(SORT[1:])  # noqa: E731
    assert read(tmp_path / "b").equals(read(tmp_path / "alone"))
    ref = pl.read_parquet(reference / "metrics" / b.id / "part-mf__seed1.parquet").select(SORT[1:] + ["value"])
    assert read(tmp_path / "b").equals(ref.sort(SORT[1:]))


def _exit(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("factors, expect", [
    ("retrain.every: [1, 0]", ["cell 'every-0_", "retrain.every=0", "key 'factors.retrain.every'",
                               "greater than 0"]),
    ("retrain.evry: [1, 2]", ["factor key 'retrain.evry' is not a key", "Closest keys: retrain.every"]),
    ("users.choice.temprature: [0.1]", ["Closest keys: users.choice.temperature"]),
    ("k: [5, 500]", ["cell 'k-500_", "k=500 is larger than the catalog (100 items)"]),  # found by the preflight
    ("seed: [1, 2]", ["'seed' cannot be a factor"]),
])
def test_invalid_cell_exits_2_before_anything_runs(study_dir, tmp_path, capsys, factors, expect):
    bad = _write(study_dir, f"study: bad\nscenario: tiny.yaml\nseeds: [1]\nfactors:\n  {factors}\n", "bad.yaml")
    code, err = _exit(["sweep", str(bad), "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    assert code == 2 and str(bad) in err
    for text in expect:
        assert text in err, err
    assert not (tmp_path / "out").exists()


def test_study_file_errors_exit_2(study_dir, tmp_path, capsys):
    for text, expect in [
        ("study: s\nscenario: tiny.yaml\nseeds: [1]\nfactor: {k: [1]}\n", "key 'factor' is not allowed in a study. "
                                                                            "Did you mean 'factors'?"),
        ("study: s\nscenario: nope.yaml\nseeds: [1]\n", "key 'scenario': the scenario 'nope.yaml' does not exist"),
        ("study: s\nscenario: tiny.yaml\nseeds: [1, 1]\n", "lists a seed twice"),
        ("study: s\nscenario: tiny.yaml\nseeds: [1]\nbaseline: idael\n", "Did you mean 'ideal'?"),
        ("study: s\nscenario: tiny.yaml\nseeds: [1]\nfactors: {k: [1]}\npoints: [{k: 2}]\n", "not both"),
    ]:
        bad = _write(study_dir, text, "s.yaml")
        code, err = _exit(["sweep", str(bad), "--out", str(tmp_path / "o"), "--no-progress"], capsys)
        assert code == 2 and expect in err, err


def test_another_study_in_the_directory_exits_2_and_overwrite_starts_afresh(study_dir, tmp_path, capsys):
    one = _write(study_dir, "study: one\nscenario: tiny.yaml\nseeds: [4]\nsteps: 2\npoints: [{k: 3}]\n", "one.yaml")
    out = tmp_path / "sw"
    run_sweep(one, out, progress=False)
    two = _write(study_dir, "study: one\nscenario: tiny.yaml\nseeds: [5]\nsteps: 2\npoints: [{k: 3}]\n", "two.yaml")
    code, err = _exit(["sweep", str(two), "--out", str(out), "--no-progress"], capsys)
    assert code == 2 and "holds the sweep of another study" in err and "seeds" in err
    (out / "notes.txt").write_text("mine")
    main(["sweep", str(two), "--out", str(out), "--overwrite", "--no-progress"])
    sw = json.loads((out / "sweep.json").read_text())
    assert sw["seeds"] == [5] and sw["status"] == "complete" and (out / "notes.txt").read_text() == "mine"
    names = {p.name for p in (out / "metrics").rglob("*.parquet")}
    assert {"part-mf__seed5.parquet", "part-pop__seed5.parquet", "part-ideal__seed5.parquet"} <= names
    assert not any("seed4" in n for n in names)
    import fcntl

    with open(out / ".sweep.lock", "a") as fh:  # a sweep is writing the directory
        fcntl.flock(fh, fcntl.LOCK_EX)
        code, err = _exit(["sweep", str(two), "--out", str(out), "--no-progress"], capsys)
    assert code == 2 and "another `recloop sweep` is writing this directory" in err
    run = tmp_path / "run"
    run_scenario(study_dir / "tiny.yaml", run, steps=1, progress=False)
    code, err = _exit(["sweep", str(one), "--out", str(run), "--overwrite", "--no-progress"], capsys)
    assert code == 2 and "holds a recloop run, not a sweep" in err


def test_points_design_column_types_and_cell_ids(study_dir):
    p = _write(study_dir, """
        study: pts
        scenario: tiny.yaml
        seeds: [3, 9]
        points:
          - {retrain.every: 2, users.choice: {type: mnl, temperature: 0.1}}
          - {retrain.every: 2.5e0, policies.mf.factors: 3}
          - {}
        """, "pts.yaml")
    with pytest.raises(Exception, match="retrain.every"):  # 2.5 is not a whole number of cycles
        load_study(p)
    p.write_text(p.read_text().replace("2.5e0", "4"))
    study = load_study(p)
    assert study.design == "points" and study.baseline == "pop" and study.seeds == [3, 9]
    assert study.keys == ["retrain.every", "users.choice", "policies.mf.factors"]
    ids = [c.id for c in study.cells]
    assert ids[2] == "base" and ids[0].startswith("every-2_choice-mnl_") and ids[1].startswith("every-4_factors-3_")
    assert all("=" not in i and "/" not in i for i in ids)
    assert cell_id({"retrain.every": 2}) == cell_id({"retrain.every": 2})
    assert cell_id({"retrain.every": 2}) != cell_id({"retrain.every": 3})
    # a point that leaves a key out has the base scenario's value in that key's column
    assert [c.values["retrain.every"] for c in study.cells] == [2, 4, 3]
    assert [c.values["policies.mf.factors"] for c in study.cells] == [4, 3, 4]
    choice = [c.values["users.choice"] for c in study.cells]
    assert choice[0]["temperature"] == 0.1 and choice[2]["temperature"] == 0.02
    # seeds 3 and 9 are not consecutive: one scenario (seed 3), run under each seed
    assert all(c.scenario.seed == 3 and c.scenario.replicates == 1 for c in study.cells)
    lv = study.levels()
    assert lv["retrain.every"] == [2, 4, 3] and isinstance(lv["users.choice"][0], str)


def test_the_shipped_example_study_loads_by_name():
    study = load_study("retrain-frequency", preflight=False)
    assert study.name == "retrain-frequency" and study.baseline == "ideal" and study.seeds == [1, 2, 3, 4, 5]
    assert study.levels() == {"retrain.every": [1, 5, 20], "users.choice.temperature": [0.02, 0.1]}
    assert study.policies == ["mf", "popularity", "ideal"] and len(study.cells) == 6
