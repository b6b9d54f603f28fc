"""Hostile and absurd scenario files: exit code 2 and one bounded paragraph, never a traceback, hang or crash.

Each case runs the real CLI in a subprocess under a timeout, so a hang, a RecursionError or a
MemoryError fails the test instead of the test run.
"""

import os
import subprocess
import sys

import pytest

from recloop.errors import RecloopInputError, clip, echo
from recloop.limits import MAX_ECHO, MAX_MESSAGE, MAX_SEED, MAX_YAML_DEPTH

WORLD = "world: {type: chaney, n_users: 20, n_items: 8, dim: 4, n_creators: 0}\n"
BASE = WORLD + "policy: {type: popularity}\nk: 3\n"


def cli(*args: str, cwd=None) -> tuple[int, str]:
    """(exit code, stdout + stderr with whitespace collapsed) of ``recloop ARGS`` in a subprocess."""
    env = {**os.environ, "COLUMNS": "100000"}
    r = subprocess.run([sys.executable, "-m", "recloop", *args], capture_output=True, text=True, timeout=60,
                       cwd=cwd, env=env)
    return r.returncode, " ".join((r.stdout + r.stderr).split())


def assert_refused(code: int, out: str, *needles: str) -> None:
    assert code == 2, out[:3000]
    assert "Traceback" not in out, out[:3000]
    assert len(out) <= MAX_MESSAGE + 20, f"message of {len(out)} characters"
    for n in needles:
        assert n in out, f"{n!r} not in {out[:3000]!r}"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def billion_laughs() -> str:
    rows = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    rows += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    return "description:\n" + "".join(f"  {r}\n" for r in rows)


# (case id, file text, dotted key the message must name or None, other needles)
CASES = [
    ("nesting-1000-flow", BASE + f"metrics: {nested(1000)}\n", None, ["nesting", str(MAX_YAML_DEPTH)]),
    ("nesting-1000-block", BASE + "".join(" " * i + "a:\n" for i in range(1000)), None, ["nesting"]),
    ("billion-laughs", BASE + billion_laughs(), None, ["alias"]),
    ("recursive-alias", BASE + "description: &a [*a]\n", None, ["recursive"]),
    ("int-5000-digits", BASE + "steps: " + "9" * 5000 + "\n", None, ["digits"]),
    ("replicates-1e12", BASE + f"replicates: {10**12}\n", "replicates", ["1000"]),
    ("n_users-1e100", BASE.replace("n_users: 20", f"n_users: {10**100}"), "world.n_users", ["100000000"]),
    ("factors-1e30", WORLD + f"policies: {{mf: {{type: als, factors: {10**30}}}}}\n", "policies.mf.factors", []),
    ("negative-seed", BASE + "seed: -1\n", "seed", ["greater than or equal to 0"]),
    ("seed-over-32-bit", BASE + f"seed: {MAX_SEED + 1}\n", "seed", [str(MAX_SEED)]),
    ("seeds-run-past-32-bit", BASE + f"seed: {MAX_SEED}\nreplicates: 2\n", "replicates", [str(MAX_SEED)]),
    ("policy-name-300", WORLD + f"policies: {{{'p' * 300}: {{type: popularity}}}}\n", "policies.ppp",
     ["[A-Za-z0-9_.-]{1,100}"]),
    ("policy-name-slash", WORLD + "policies: {'../x': {type: popularity}}\n", "policies.../x",
     ["[A-Za-z0-9_.-]{1,100}"]),
    ("huge-string-echoed", BASE + "steps: '" + "x" * 300_000 + "'\n", "steps", ["characters cut"]),
    ("huge-key-echoed", BASE + "metrics:\n  ? " + "y" * 300_000 + "\n  : 1\n", "metrics.yyy", ["characters cut"]),
    ("nan", BASE + "users: {choice: {type: mnl, temperature: .nan}}\n", "users.choice.temperature", []),
    ("inf", BASE + "users: {choice: {type: mnl, position_bias: .inf}}\n", "users.choice.position_bias",
     ["finite"]),
    ("too-many-values", BASE + "metrics: {include: [" + ",".join(["a"] * 120_000) + "]}\n", None, ["values"]),
    ("file-over-1-MiB", BASE + "#" + "x" * (1 << 20) + "\n", None, ["1048576 bytes"]),
    ("extends-dev-zero", "extends: /dev/zero\n" + BASE, "extends", ["/dev/zero", "not a regular file"]),
    ("extends-directory", "extends: /\n" + BASE, "extends", ["directory"]),
    ("extends-long-name", "extends: " + "n" * 5000 + "\n" + BASE, "extends", ["does not exist"]),
    ("extends-nul-byte", 'extends: "a\\0b"\n' + BASE, "extends", ["does not exist"]),
]


@pytest.mark.parametrize("text,key,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_file_is_refused_in_one_bounded_paragraph(tmp_path, text, key, needles):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    code, out = cli("validate", str(path))
    assert_refused(code, out, str(path), *needles, *([f"key '{key}"] if key else []))


def test_extends_a_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "pipe")  # reading it would block forever without a writer
    path = tmp_path / "s.yaml"
    path.write_text("extends: pipe\n" + BASE)
    assert_refused(*cli("validate", str(path)), str(path), "key 'extends'", "not a regular file")


def test_scenario_that_is_a_device_is_refused():
    assert_refused(*cli("validate", "/dev/zero"), "/dev/zero", "not a regular file")


def test_run_refuses_hostile_file_and_writes_nothing(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(BASE + f"replicates: {10**12}\n")
    out_dir = tmp_path / "run"
    assert_refused(*cli("run", str(path), "--out", str(out_dir), "--no-progress"), str(path), "key 'replicates'")
    assert not out_dir.exists()


def test_bounds_are_in_the_json_schema():
    import json

    from recloop.sim.config import json_schema

    schema = json_schema()
    props = schema["properties"]
    assert props["replicates"]["maximum"] == 1000 and props["seed"]["maximum"] == MAX_SEED
    assert props["seed"]["minimum"] == 0
    assert "^[A-Za-z0-9_.-]{1,100}$" in json.dumps(props["policies"])
    chaney = schema["$defs"]["world_chaney"]["properties"]
    assert chaney["n_users"]["maximum"] == 100_000_000 and chaney["dim"]["maximum"] == 4096


# -- in-process units (fast) -----------------------------------------------------------------------


def test_clip_and_echo_bound_what_they_show():
    s = "z" * 100_000
    assert len(clip(s)) <= MAX_ECHO + 40 and "characters cut" in clip(s)
    assert clip("short") == "short"
    assert len(echo(list(range(100_000)))) <= MAX_ECHO + 40


def test_error_message_is_bounded():
    exc = RecloopInputError("m" * 1_000_000, file="f" * 10_000, key="k" * 10_000)
    assert len(str(exc)) <= MAX_MESSAGE


def test_numbers_beyond_int64_are_refused_even_without_a_bound():
    from recloop.sim.config import check_numbers

    check_numbers({"a": {"b": [1, 2.5, 2**63 - 1, -(2**63)]}})
    with pytest.raises(RecloopInputError, match=r"key 'a\.b\.1': the number"):
        check_numbers({"a": {"b": [1, 2**63]}}, file="x.yaml")


def test_alias_graph_is_measured_without_expanding_it():
    import time

    from recloop.sim.config import parse_yaml

    t0 = time.perf_counter()
    with pytest.raises(RecloopInputError, match="alias"):
        parse_yaml(billion_laughs(), "x.yaml")
    assert time.perf_counter() - t0 < 5
    ok = parse_yaml("a: &x [1, 2]\nb: *x\nc: *x\n", "x.yaml")  # a few aliases are fine
    assert ok == {"a": [1, 2], "b": [1, 2], "c": [1, 2]}


def test_long_extends_chain_is_refused(tmp_path):
    from recloop.limits import MAX_EXTENDS
    from recloop.sim.config import load_raw

    for i in range(MAX_EXTENDS + 2):
        (tmp_path / f"s{i}.yaml").write_text(f"extends: s{i + 1}.yaml\n" if i <= MAX_EXTENDS else BASE)
    with pytest.raises(RecloopInputError, match=r"key 'extends': the 'extends' chain is longer than"):
        load_raw(tmp_path / "s0.yaml")
    assert load_raw(tmp_path / "s3.yaml")["k"] == 3  # a shorter chain is fine
