"""Checkpoints without pickle (npz + JSON), verified resume with fallback, and the run store's safety:
file modes under the umask, honest advice for a non-run --out, injective run keys, and a full disk."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import shutil
import stat
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from recloop.cli import main
from recloop.errors import RecloopInputError
from recloop.sim import checkpoint as ckpt
from recloop.sim import store as store_mod
from recloop.sim.runner import run_scenario
from recloop.sim.store import RunStore, check_keys, run_key

SCENARIO = """
name: ckpt
seed: 3
steps: 12
k: 5
world: {type: chaney, n_users: 120, n_items: 100, dim: 6, n_creators: 5}
users:
  choice: {type: mnl, temperature: 0.02, no_click_utility: 0.05, position_bias: 0.5}
  dynamics: [{type: drift, rate: 0.05}]
  population: {type: dynamic, arrivals: 2, churn: 0.01}
creators: {type: trecs, creation_prob: 0.2}
policies:
  mf: {type: als, factors: 6, iterations: 3}
retrain: {every: 3}
initial_log: {interactions_per_user: 3}
metrics: {pairs: 30, user_sample: 40, regret_sample: 20}
output: {checkpoint_every: 4, flush_every: 2, keep_checkpoints: 5}
"""
KEY = "mf__seed3"


class Plant:
    """Unpickling this creates ``path``: the marker that code from the run directory was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    """An uninterrupted run (checkpoints after cycles 4, 8 and 12, all kept)."""
    d = tmp_path_factory.mktemp("ckpt")
    (d / "s.yaml").write_text(textwrap.dedent(SCENARIO))
    run_scenario(d / "s.yaml", d / "full", progress=False)
    return d / "full"


def interrupted(full: Path, dest: Path, after: int) -> Path:
    """A copy of ``full`` that looks killed after the checkpoint of cycle ``after`` (later ones never written)."""
    shutil.copytree(full, dest)
    (dest / "metrics.parquet").unlink()
    for p in (dest / "checkpoints" / KEY).iterdir():
        if int(p.stem.split("_")[1]) > after:
            p.unlink()
    man = json.loads((dest / "manifest.json").read_text())
    man["status"] = "running"
    man["runs"][KEY]["status"] = "running"
    (dest / "manifest.json").write_text(json.dumps(man))
    return dest


def metrics(d: Path) -> pl.DataFrame:
    return pl.read_parquet(d / "metrics.parquet")


def resume(d: Path, capsys) -> tuple[int, str]:
    """Run `recloop resume d`; returns (exit code, stderr)."""
    capsys.readouterr()
    try:
        main(["resume", str(d), "--no-progress"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------ flatten/unflatten
def _same(a, b) -> bool:
    """Exact equality: same types, dtypes, shapes and bits (NaN equals NaN, -0.0 differs from 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (np.ndarray, np.generic)):
        return a.dtype == b.dtype and np.shape(a) == np.shape(b) and np.asarray(a).tobytes() == np.asarray(b).tobytes()
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


DTYPES = st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(),
                   hnp.complex_number_dtypes(), hnp.boolean_dtypes(), hnp.unicode_string_dtypes(max_len=4),
                   hnp.byte_string_dtypes(max_len=4))
ARRAYS = DTYPES.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
SCALARS = ARRAYS.map(lambda a: a.reshape(-1)[0] if a.size else np.float32(-0.0))
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=8), ARRAYS, SCALARS)
STATES = st.recursive(LEAVES, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.lists(kids, max_size=4).map(tuple),
    st.dictionaries(st.text(max_size=6), kids, max_size=4)), max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STATES)
def test_flatten_roundtrip_is_exact(state):
    skeleton, arrays = ckpt.flatten(state)
    json.dumps(skeleton, allow_nan=False)  # strict JSON
    assert all(type(a) is np.ndarray and not a.dtype.hasobject for a in arrays.values())
    assert _same(ckpt.roundtrip(state), state)


def test_flatten_keeps_what_json_would_blur():
    state = {"t": (1, 1.0, True, None), "f": [-0.0, float("inf"), float("-inf"), float("nan")], "big": 2**80,
             "s": np.array(["a", "bé", ""]), "c": np.zeros((2, 0, 3), np.complex64), "x": np.int16(-3),
             "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "$dict": {"$array": "a0"}}
    assert _same(ckpt.roundtrip(state), state)
    assert ckpt.unpack_strings(ckpt.pack_strings(["", "Toy Story (1995)", "\udc80 x\x00"])) == \
        ["", "Toy Story (1995)", "\udc80 x\x00"]


@pytest.mark.parametrize(("state", "path"), [
    ({"a": {"b": [1, {2, 3}]}}, "state.a.b[1]"),
    ({"a": np.array([object()], dtype=object)}, "state.a"),
    ({"m": (1, Plant("x"))}, "state.m[1]"),
    ({"d": {0: "zero"}}, "state.d"),
    ({"sub": np.ma.masked_array([1, 2])}, "state.sub"),
])
def test_flatten_names_the_unsupported_path(state, path):
    with pytest.raises(TypeError, match=r"cannot checkpoint " + path.replace("[", r"\[").replace("]", r"\]")):
        ckpt.flatten(state)


def test_unflatten_refuses_a_skeleton_that_does_not_fit():
    skeleton, arrays = ckpt.flatten({"a": np.arange(3)})
    with pytest.raises(ckpt.CheckpointError, match="lacks array"):
        ckpt.unflatten(skeleton, {})
    with pytest.raises(ckpt.CheckpointError, match="does not use"):
        ckpt.unflatten(skeleton, {**arrays, "zz": np.zeros(1)})
    with pytest.raises(ckpt.CheckpointError, match="malformed"):
        ckpt.unflatten({"$eval": "os.system('x')"}, {})


# ------------------------------------------------------------------------------------------ the format
def test_checkpoint_files_json_last_rotation_and_no_pickle(full):
    d = full / "checkpoints" / KEY
    assert sorted(p.name for p in d.iterdir()) == [f"step_{s:07d}.{e}" for s in (4, 8, 12) for e in ("json", "npz")]
    meta = json.loads((d / "step_0000008.json").read_text())
    man = json.loads((full / "manifest.json").read_text())
    assert meta["format"] == ckpt.FORMAT and meta["step"] == 8 and meta["seed"] == 3 and meta["policy"] == "mf"
    assert meta["config_hash"] == man["config_hash"] and meta["key"] == KEY
    assert meta["npz_sha256"] == ckpt.sha256_file(d / "step_0000008.npz")
    with np.load(d / "step_0000008.npz", allow_pickle=False) as npz:  # plain arrays only
        assert all(not npz[n].dtype.hasobject for n in npz.files)
    # rotation keeps the newest `keep` complete checkpoints and drops npz files without a json
    store = RunStore(full.parent / "rot")
    (store.checkpoint_dir("k")).mkdir(parents=True)
    (store.checkpoint_dir("k") / "step_0000099.npz").write_bytes(b"orphan of a failed write")
    for step in (1, 2, 3):
        store.save_checkpoint("k", step, {"t": step, "a": np.arange(step)}, {"seed": 1}, keep=2)
    assert sorted(p.name for p in store.checkpoint_dir("k").iterdir()) == [
        "step_0000002.json", "step_0000002.npz", "step_0000003.json", "step_0000003.npz"]
    assert [c.step for c in store.checkpoints("k")] == [3, 2]


# ------------------------------------------------------------------------------ resume: verify, fall back
def test_planted_pickle_checkpoints_are_never_loaded(full, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    cut = interrupted(full, tmp_path / "cut", after=8)
    for p in (cut / "checkpoints" / KEY).iterdir():
        p.unlink()  # only old-style pickles remain
    (cut / "checkpoints" / KEY / "step_0000010.pkl").write_bytes(pickle.dumps(Plant(str(marker))))
    code, err = resume(cut, capsys)
    assert code == 2 and "pickle" in err and "step_0000010.pkl" in err and "Traceback" not in err
    assert not marker.exists()


def test_an_npz_holding_a_pickled_object_array_is_never_unpickled(full, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    cut = interrupted(full, tmp_path / "cut", after=8)
    d = cut / "checkpoints" / KEY
    evil = np.empty(1, dtype=object)
    evil[0] = Plant(str(marker))
    with open(d / "step_0000008.npz", "wb") as fh:
        np.savez(fh, a0=evil)  # numpy pickles object arrays
    meta = json.loads((d / "step_0000008.json").read_text())  # a json that vouches for it (sha256 and all)
    meta.update(npz_sha256=ckpt.sha256_file(d / "step_0000008.npz"), skeleton={"$array": "a0"})
    (d / "step_0000008.json").write_text(json.dumps(meta))
    (d / "step_0000004.npz").write_bytes(pickle.dumps(Plant(str(marker))))  # a bare pickle named .npz
    meta4 = json.loads((d / "step_0000004.json").read_text())
    meta4["npz_sha256"] = ckpt.sha256_file(d / "step_0000004.npz")
    (d / "step_0000004.json").write_text(json.dumps(meta4))
    code, err = resume(cut, capsys)
    assert not marker.exists()
    assert code == 2 and "no usable checkpoint" in err and "without pickle" in err and "Traceback" not in err
    # the same object array next to a good older checkpoint: skipped, and the run still ends identical
    cut2 = interrupted(full, tmp_path / "cut2", after=8)
    shutil.copy(d / "step_0000008.npz", cut2 / "checkpoints" / KEY / "step_0000008.npz")
    shutil.copy(d / "step_0000008.json", cut2 / "checkpoints" / KEY / "step_0000008.json")
    code, err = resume(cut2, capsys)
    assert code == 0 and "skipped unusable checkpoints" in err and not marker.exists()
    assert metrics(cut2).equals(metrics(full))


def test_flipped_bit_falls_back_to_the_previous_checkpoint(full, tmp_path, capsys):
    cut = interrupted(full, tmp_path / "cut", after=8)
    npz = cut / "checkpoints" / KEY / "step_0000008.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0x10
    npz.write_bytes(bytes(data))
    code, err = resume(cut, capsys)
    assert code == 0 and "step_0000008.json" in err and "sha256" in err
    assert metrics(cut).equals(metrics(full))  # parts written after cycle 4 were dropped and redone
    assert json.loads((cut / "manifest.json").read_text())["status"] == "complete"


def test_flipped_bit_without_an_older_checkpoint_refuses(full, tmp_path, capsys):
    cut = interrupted(full, tmp_path / "cut", after=8)
    (cut / "checkpoints" / KEY / "step_0000004.npz").unlink()
    (cut / "checkpoints" / KEY / "step_0000004.json").unlink()
    npz = cut / "checkpoints" / KEY / "step_0000008.npz"
    data = bytearray(npz.read_bytes())
    data[-100] ^= 0x01
    npz.write_bytes(bytes(data))
    code, err = resume(cut, capsys)
    assert code == 2 and "Traceback" not in err
    assert "no usable checkpoint" in err and "step_0000008.json" in err and "sha256" in err
    assert not (cut / "metrics.parquet").exists()


def test_wrong_shape_and_foreign_checkpoints_fall_back(full, tmp_path, capsys):
    cut = interrupted(full, tmp_path / "cut", after=8)
    store = RunStore(cut)
    ck = store.checkpoints(KEY)[0]
    meta = json.loads(ck.json.read_text())
    ident = {k: meta[k] for k in ("config_hash", "seed", "policy", "key")}
    state = store.load_checkpoint(ck, ident)
    state["world"]["users"]["prefs"] = state["world"]["users"]["prefs"][:, :-1].copy()  # one dimension short
    store.save_checkpoint(KEY, 8, state, ident, keep=5)  # well-formed: its sha256 matches
    code, err = resume(cut, capsys)
    assert code == 0 and "state.world.users.prefs" in err
    assert metrics(cut).equals(metrics(full))
    # a foreign state (another policy's) that verifies but does not load: KeyError/ValueError inside
    cut2 = interrupted(full, tmp_path / "cut2", after=8)
    store2 = RunStore(cut2)
    state = store2.load_checkpoint(store2.checkpoints(KEY)[0], ident)
    state["policy"] = {"pop": np.zeros(3)}
    store2.save_checkpoint(KEY, 8, state, ident, keep=5)
    code, err = resume(cut2, capsys)
    assert code == 0 and "does not fit this run" in err
    assert metrics(cut2).equals(metrics(full))


def test_checkpoint_of_another_run_or_format_is_refused(full, tmp_path, capsys):
    cut = interrupted(full, tmp_path / "cut", after=4)
    js = cut / "checkpoints" / KEY / "step_0000004.json"
    meta = json.loads(js.read_text())
    for change, needle in (({"seed": 4}, "seed"), ({"config_hash": "0" * 16}, "config_hash"),
                           ({"format": "recloop-checkpoint/0"}, "format")):
        js.write_text(json.dumps({**meta, **change}))
        code, err = resume(cut, capsys)
        assert code == 2 and needle in err and str(cut / "checkpoints" / KEY) in err


# ------------------------------------------------------------------------------------------ store fixes
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_files_respect_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        store = RunStore(tmp_path / "run")
        store.prepare()
        store.write_manifest({"runs": {}})
        store_mod.atomic_write_text(tmp_path / "run" / "scenario.yaml", "name: x\n")
        store.save_checkpoint("k__seed1", 1, {"a": np.arange(3)}, {"seed": 1})
        store.write_part("k__seed1", 0, 0, {"policy": ["k"], "seed": [1], "step": [0], "metric": ["m"],
                                            "group": [""], "value": [1.0]})
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert len(files) == 5
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p.name


def test_a_directory_of_other_files_gets_honest_advice(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    for overwrite in (False, True):
        with pytest.raises(RecloopInputError) as info:
            RunStore(out).prepare(overwrite=overwrite)
        msg = str(info.value)
        assert "Pass --overwrite" not in msg and "empty or new directory" in msg
    assert (out / "holiday.jpg").exists()


def test_run_keys_are_injective_and_parts_never_shared(tmp_path):
    keys = {run_key(p, 3) for p in ("m/f", "m_f", "m f", "m%2Ff", "m~f")}
    assert len(keys) == 5 and run_key("m_f", 3) == "m_f__seed3" and run_key("mf-1.2", 0) == "mf-1.2__seed0"
    assert all("/" not in k and " " not in k for k in keys)
    store = RunStore(tmp_path)
    row = {"policy": ["p"], "seed": [3], "step": [0], "metric": ["m"], "group": [""], "value": [1.0]}
    a, b = run_key("mf", 3), run_key("mf__seed3__x", 3)  # b starts with a's key and its part separator
    store.write_part(a, 0, 1, row)
    store.write_part(b, 0, 1, row)
    store.drop_parts_after(a, -1)
    assert [p.name for p, _ in store.parts()] == [f"{b}__0000000-0000001.parquet"]
    with pytest.raises(RecloopInputError, match="letter case"):
        check_keys([("MF", 1), ("mf", 1)], tmp_path)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120), st.text(max_size=120), st.integers(-5, 5), st.integers(-5, 5))
def test_run_key_never_maps_two_runs_to_one_key(p1, p2, s1, s2):
    if (p1, s1) != (p2, s2):
        assert run_key(p1, s1) != run_key(p2, s2)
    assert len(run_key(p1, s1).encode()) < 200 and "/" not in run_key(p1, s1)


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9_.-]{1,100}", fullmatch=True), st.from_regex(r"[A-Za-z0-9_.-]{1,100}",
                                                                               fullmatch=True))
def test_allowed_names_keep_their_readable_key(p1, p2):
    assert run_key(p1, 1) == f"{p1}__seed1"
    if p1 != p2:
        assert run_key(p1, 1) != run_key(p2, 1)


# ------------------------------------------------------------------------------------------- full disk
ENOSPC = OSError(errno.ENOSPC, "No space left on device")
POLARS_ENOSPC = pl.exceptions.ComputeError("parquet: underlying IO error: No space left on device (os error 28)")


def _fail_nth(monkeypatch, owner, name: str, n: int, error: Exception) -> None:
    """Make the n-th and later calls of ``owner.name`` raise ``error`` (the disk filled up)."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= n:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)


@pytest.mark.parametrize(("owner", "name", "n", "error"), [
    (store_mod, "atomic_write", 3, ENOSPC),  # the manifest, before any cycle
    (ckpt, "write_npz", 2, ENOSPC),  # the npz of the second checkpoint
    (store_mod, "atomic_write_bytes", 9, ENOSPC),  # the json of the second checkpoint (its npz is written)
    (store_mod, "atomic_write", 12, ENOSPC),  # a metrics part after the second checkpoint
    (RunStore, "finalize_metrics", 1, POLARS_ENOSPC),  # the final merge (polars reports os error 28)
], ids=["manifest", "npz", "json", "part", "merge"])
def test_full_disk_is_one_line_and_resumable(full, tmp_path, capsys, monkeypatch, owner, name, n, error):
    scen = full.parent / "s.yaml"
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _fail_nth(m, owner, name, n, error)
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main(["run", str(scen), "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err
    assert info.value.code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "disk is full" in lines[0] and f"recloop resume {out}" in lines[0], err
    assert not (out / "metrics.parquet").exists()
    for p in (out / "metrics.parts").glob("*.parquet"):
        pl.read_parquet(p)  # what was written is whole
    assert json.loads((out / "manifest.json").read_text())["status"] in ("running", "interrupted")
    code, err = resume(out, capsys)
    assert code == 0, err
    assert metrics(out).equals(metrics(full))


def test_full_disk_in_polars_merge_is_recognised():
    assert store_mod.is_disk_full(POLARS_ENOSPC) and store_mod.is_disk_full(OSError(errno.EDQUOT, "quota"))
    assert not store_mod.is_disk_full(OSError(errno.EACCES, "denied"))


def test_full_disk_before_the_run_starts_leaves_nothing(full, tmp_path, capsys, monkeypatch):
    out = tmp_path / "new"
    _fail_nth(monkeypatch, store_mod, "atomic_write", 1, ENOSPC)  # scenario.yaml
    with pytest.raises(SystemExit) as info:
        main(["run", str(full.parent / "s.yaml"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 1 and "\n" not in err and "disk is full" in err and "run the command again" in err
    assert not out.exists()
