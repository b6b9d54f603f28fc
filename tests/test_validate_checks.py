"""`recloop validate` makes every check `recloop run` makes while setting up; `extends` merge rules."""

import pytest

from recloop.cli import main
from recloop.sim.config import deep_merge, load_raw, load_scenario

WORLD = "world: {type: chaney, n_users: 20, n_items: 8, dim: 4, n_creators: 0}\n"


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(map(str, args)))
    err = capsys.readouterr().err
    return exc.value.code, " ".join(err.split())


def validate_and_run(capsys, path, tmp_path):
    """Both commands' (code, message); asserts that they agree and that run wrote nothing."""
    v = run_cli(capsys, "validate", path)
    out = tmp_path / "run"
    r = run_cli(capsys, "run", path, "--out", out, "--no-progress")
    assert v == r, (v, r)
    assert not out.exists()
    assert v[0] == 2 and "Traceback" not in v[1]
    assert str(path) in v[1]
    return v[1]


def test_k_larger_than_catalog(write_yaml, tmp_path, capsys):
    p = write_yaml(WORLD + "policy: {type: popularity}\nk: 10\n")
    assert "key 'k': k=10 is larger than the catalog (8 items)" in validate_and_run(capsys, p, tmp_path)


def test_k_checked_against_declared_size_of_a_large_world(write_yaml, tmp_path, capsys):
    import time

    p = write_yaml("world: {type: gaussian_clusters, n_users: 1000000, n_items: 40, dim: 64}\n"
                   "policy: {type: popularity}\nk: 50\n")
    t0 = time.perf_counter()
    assert "k=50 is larger than the catalog (40 items)" in validate_and_run(capsys, p, tmp_path)
    assert time.perf_counter() - t0 < 30  # the world is built at a reduced size


def test_missing_data_file(write_yaml, tmp_path, capsys):
    p = write_yaml("world: {type: interactions_csv, path: /nonexistent/missing.csv}\npolicy: {type: popularity}\n")
    msg = validate_and_run(capsys, p, tmp_path)
    assert "key 'world.path'" in msg and "missing.csv" in msg


def test_data_file_without_the_named_column(write_yaml, tmp_path, capsys):
    (tmp_path / "log.csv").write_text("u,i\n1,2\n2,3\n")
    p = write_yaml(f"world: {{type: interactions_csv, path: {tmp_path / 'log.csv'}}}\npolicy: {{type: popularity}}\n")
    msg = validate_and_run(capsys, p, tmp_path)
    assert "key 'world.user_col'" in msg and "log.csv" in msg and "no column 'user_id'" in msg


def test_data_file_too_small_for_dim(write_yaml, tmp_path, capsys):
    (tmp_path / "log.csv").write_text("user_id,item_id\n" + "".join(f"{u},{i}\n" for u in range(4) for i in range(3)))
    p = write_yaml(f"world: {{type: interactions_csv, path: {tmp_path / 'log.csv'}, dim: 8}}\n"
                   "policy: {type: popularity}\nk: 2\n")
    assert "key 'world.dim'" in validate_and_run(capsys, p, tmp_path)


def test_unknown_metric(write_yaml, tmp_path, capsys):
    p = write_yaml(WORLD + "policy: {type: popularity}\nk: 3\nmetrics: {include: [exposure, nosuch]}\n")
    msg = validate_and_run(capsys, p, tmp_path)
    assert "key 'metrics.include.1'" in msg and "nosuch" in msg


def test_replay_users_need_a_data_set_world(write_yaml, tmp_path, capsys):
    p = write_yaml(WORLD + "policy: {type: popularity}\nk: 3\nusers: {choice: {type: replay}}\n")
    assert "key 'users.choice.type'" in validate_and_run(capsys, p, tmp_path)


def test_missing_surrogate_params_file(write_yaml, tmp_path, capsys):
    p = write_yaml(WORLD + "policy: {type: llm_augmented, base: {type: popularity}}\nk: 3\n"
                   "llm: {backend: {type: surrogate, params_file: nope.json}}\n")
    msg = validate_and_run(capsys, p, tmp_path)
    assert "key 'llm.backend.params_file'" in msg and "nope.json" in msg


def test_missing_local_model(write_yaml, tmp_path, capsys):
    p = write_yaml(WORLD + "k: 3\npolicy: {type: pipeline, retrieval: {type: popularity}, reranker: {type: llm_rank}}\n"
                   "llm: {backend: {type: transformers, model: /nonexistent/model}}\n")
    assert "key 'llm.backend.model'" in validate_and_run(capsys, p, tmp_path)


def test_missing_embedding_model(write_yaml, tmp_path, capsys, monkeypatch):
    import recloop.llm.embedding as emb
    from recloop.errors import RecloopInputError

    def absent():
        raise RecloopInputError("all-MiniLM-L6-v2 is not installed.", key="embedder")

    monkeypatch.setattr(emb, "find_minilm", absent)
    p = write_yaml(WORLD + "k: 3\npolicies: {r2: {type: llm_profiler, base: {type: popularity}}}\n")
    assert "key 'policies.r2.embedder'" in validate_and_run(capsys, p, tmp_path)


def test_unusable_engine_backend(write_yaml, tmp_path, capsys, monkeypatch):
    """A backend this machine cannot use (here: CuPy made unimportable, so the test also runs where a
    GPU and CuPy are present) is refused by validate and run alike, naming engine.backend."""
    from recloop.sim import backends

    def no_cupy(self, xp=None):
        raise ImportError("No module named 'cupy'")

    monkeypatch.setattr(backends.CupyBackend, "__init__", no_cupy)
    p = write_yaml(WORLD + "policy: {type: popularity}\nk: 3\nengine: {backend: cupy}\n")
    err = validate_and_run(capsys, p, tmp_path)
    assert "key 'engine.backend'" in err and "cupy" in err


def test_unknown_nested_component_names_its_key(write_yaml, capsys):
    p = write_yaml(WORLD + "policy: {type: pipeline, retrieval: {type: nosuch}}\n")
    code, err = run_cli(capsys, "validate", p)
    assert code == 2 and str(p) in err and "key 'policy.retrieval.type'" in err


def test_policy_named_like_a_type_keeps_its_name_in_the_key(write_yaml, capsys):
    p = write_yaml(WORLD + "policies: {als: {type: als, factor: 8}}\n")
    code, err = run_cli(capsys, "validate", p)
    assert code == 2 and "key 'policies.als.factor'" in err


def test_validate_writes_nothing(write_yaml, tmp_path, capsys):
    cache = tmp_path / "llm_cache"
    p = write_yaml(WORLD + "k: 3\npolicy: {type: llm_augmented, base: {type: popularity}}\n"
                   f"llm: {{backend: {{type: surrogate}}, cache: true, cache_dir: {cache}}}\n")
    before = sorted(tmp_path.rglob("*"))
    main(["validate", str(p)])
    assert "ok:" in capsys.readouterr().out
    assert sorted(tmp_path.rglob("*")) == before


# -- extends -------------------------------------------------------------------------------------------

PARENT = """
seed: 4
world: {type: chaney, n_users: 30, n_items: 40, dim: 4, n_creators: 3}
creators: {type: trecs, creation_prob: 0.3}
users: {dynamics: [{type: drift}, {type: satiation}]}
policies:
  mf: {type: als, factors: 8, iterations: 3}
  pop: {type: popularity}
steps: 5
"""


def test_extends_merges_mappings_and_policies(write_yaml):
    write_yaml(PARENT, "parent.yaml")
    child = write_yaml("extends: parent.yaml\npolicies: {mf: {factors: 4}, rnd: {type: random}}\n"
                       "world: {n_users: 25}\n", "child.yaml")
    sc = load_scenario(child)
    assert list(sc.policies) == ["mf", "pop", "rnd"]  # added
    assert sc.policies["mf"].factors == 4 and sc.policies["mf"].iterations == 3  # merged
    assert sc.world.n_users == 25 and sc.world.n_items == 40


def test_extends_type_change_replaces_block_and_lists_replace(write_yaml):
    write_yaml(PARENT, "parent.yaml")
    child = write_yaml("extends: parent.yaml\nworld: {type: gaussian_clusters, n_items: 12}\n"
                       "policies: {pop: {type: random}}\nusers: {dynamics: [{type: drift, rate: 0.2}]}\n", "child.yaml")
    raw = load_raw(child)
    assert raw["world"] == {"type": "gaussian_clusters", "n_items": 12}  # no chaney parameter leaks in
    assert raw["policies"]["pop"] == {"type": "random"}
    assert raw["users"]["dynamics"] == [{"type": "drift", "rate": 0.2}]


def test_extends_null_drops_inherited_keys(write_yaml):
    write_yaml(PARENT, "parent.yaml")
    child = write_yaml("extends: parent.yaml\ncreators: null\npolicies: {mf: null}\nseed: null\n", "child.yaml")
    raw = load_raw(child)
    assert "creators" not in raw and "seed" not in raw and list(raw["policies"]) == ["pop"]
    sc = load_scenario(child)
    assert sc.creators is None and list(sc.policies) == ["pop"] and sc.seed == 0  # defaults apply


def test_extends_null_swaps_policies_for_policy(write_yaml):
    write_yaml(PARENT, "parent.yaml")
    child = write_yaml("extends: parent.yaml\npolicies: null\npolicy: {type: random}\n", "child.yaml")
    sc = load_scenario(child)
    assert sc.policies is None and sc.policy.type == "random"


def test_deep_merge_keeps_null_the_parent_lacks_and_leaves_inputs_alone():
    base = {"a": {"x": 1, "y": {"z": 2}}, "b": [1, 2]}
    over = {"a": {"y": {"z": None}, "w": None}, "b": None}
    out = deep_merge(base, over)
    assert out == {"a": {"x": 1, "y": {}, "w": None}}
    assert base == {"a": {"x": 1, "y": {"z": 2}}, "b": [1, 2]}
    assert over == {"a": {"y": {"z": None}, "w": None}, "b": None}


def test_unknown_component_type_names_the_type_key(write_yaml, capsys):
    """A misspelt id names the key that holds it (``policies.mf.type``), with a did-you-mean."""
    cases = {
        WORLD + "policies: {mf: {type: alss}}\n": ("key 'policies.mf.type'", "Did you mean 'als'?"),
        "world: {type: chaneyy}\npolicy: {type: random}\n": ("key 'world.type'", "Did you mean 'chaney'?"),
        WORLD + "policy: {type: randm}\n": ("key 'policy.type'", "Did you mean 'random'?"),
    }
    for i, (text, needles) in enumerate(cases.items()):
        p = write_yaml(text, f"t{i}.yaml")
        code, err = run_cli(capsys, "validate", p)
        assert code == 2 and str(p) in err and all(n in err for n in needles), err
