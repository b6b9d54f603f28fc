"""F-SURR: the surrogate LLM, measured through the real parser and matcher, and its calibration."""

from __future__ import annotations

import difflib
import time

import numpy as np
import pytest

from recloop.analysis.llm_metrics import hallucination_stats, lpd, profile_hallucination
from recloop.llm.matching import TitleMatcher, normalise_title, ratio
from recloop.llm.parsing import parse_ranking, parse_title_list
from recloop.llm.profile_claims import parse_profile_claims
from recloop.llm.surrogate import SurrogateLLM, SurrogateParams
from recloop.llm.surrogate_fit import calibrate, expected_lpd_fn, fit_beta, fit_rho, validate_surrogate
from recloop.llm.types import GenerationParams, LLMRequest

N_ITEMS = 400
GP = GenerationParams()

_WORDS = (
    "night day river stone shadow king queen lost last first dark light city road dream fire ice love war "
    "storm silent secret island garden winter summer blue red golden iron star moon sun heart ghost empire "
    "return rise fall house forest ocean mountain song story wolf glass paper bridge tower valley"
).split()


def make_titles(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    while len(out) < n:
        k = int(rng.integers(1, 4))
        t = " ".join(w.capitalize() for w in rng.choice(_WORDS, k, replace=False))
        if rng.random() < 0.3:
            t = "The " + t
        if normalise_title(t) in seen:
            continue
        seen.add(normalise_title(t))
        out.append(f"{t} ({int(rng.integers(1950, 2020))})")
    return out


@pytest.fixture(scope="module")
def catalog() -> dict:
    rng = np.random.default_rng(42)
    titles = make_titles(N_ITEMS)
    pop = np.floor(rng.pareto(1.1, N_ITEMS) * 20).astype(float)
    head = pop >= np.quantile(pop, 0.8)
    return {"titles": titles, "pop": pop, "head": head, "matcher": TitleMatcher(titles)}


def aug_requests(cat: dict, n_users: int, m: int = 200, n: int = 10, seed0: int = 0, rel_scale: float = 1.0):
    rng = np.random.default_rng(1000 + seed0)
    reqs = []
    for u in range(n_users):
        cands = rng.choice(N_ITEMS, m, replace=False)
        reqs.append(
            LLMRequest(
                prompt=f"recommend for user {u}",
                task="augment",
                payload={
                    "user": u,
                    "candidates": cands,
                    "relevance": rel_scale * rng.normal(size=m),
                    "popularity": cat["pop"][cands],
                    "n": n,
                    "titles": cat["titles"],
                    "seed": seed0 * 100_000 + u,
                },
            )
        )
    return reqs


def matched(cat: dict, responses) -> list:
    return [cat["matcher"].match(parse_title_list(r.text, 50)) for r in responses]


# --------------------------------------------------------------------------------------------
# F-SURR sanity
# --------------------------------------------------------------------------------------------


def test_h1_gives_hallrate_1(catalog: dict) -> None:
    s = SurrogateLLM(SurrogateParams(h=1.0, eps_near=0.0))
    res = s.generate(aug_requests(catalog, 40), GP)
    assert not any(r.failed for r in res)
    st = hallucination_stats(matched(catalog, res))
    assert st["n_generated"] == 400
    assert st["hall_rate"] == 1.0


def test_h0_generates_only_candidates(catalog: dict) -> None:
    s = SurrogateLLM(SurrogateParams(h=0.0))
    reqs = aug_requests(catalog, 30)
    res = s.generate(reqs, GP)
    ms = matched(catalog, res)
    st = hallucination_stats(ms, [r.payload["candidates"] for r in reqs])
    assert st["hall_rate"] == 0.0 and st["out_of_candidate_rate"] == 0.0 and st["duplicate_rate"] == 0.0
    assert all(m.exact for out in ms for m in out)


def test_uniform_limit_head_share(catalog: dict) -> None:
    """h=0, beta=0, tau_s -> inf: uniform over items, so E[head share] = |H| / n_I."""
    s = SurrogateLLM(SurrogateParams(h=0.0, beta=0.0, tau_s=1e12))
    reqs = aug_requests(catalog, 300, m=N_ITEMS)
    items = np.array([m.item for out in matched(catalog, s.generate(reqs, GP)) for m in out])
    p = catalog["head"].mean()
    share = catalog["head"][items].mean()
    assert share == pytest.approx(p, abs=4 * np.sqrt(p * (1 - p) / items.size))


def test_lpd_strictly_increases_in_beta(catalog: dict) -> None:
    reqs = aug_requests(catalog, 150)
    rng = np.random.default_rng(7)
    refs = [catalog["pop"][rng.choice(N_ITEMS, 5, replace=False)] for _ in reqs]
    values = []
    for beta in (0.0, 0.5, 1.0, 2.0, 4.0):
        s = SurrogateLLM(SurrogateParams(h=0.1, eps_near=0.5, beta=beta, tau_s=1.0))
        ms = matched(catalog, s.generate(reqs, GP))
        outs = [catalog["pop"][[m.item for m in out if m.item >= 0]] for out in ms]
        values.append(lpd(outs, refs))
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), values


def test_near_misses_match_and_fabricated_do_not(catalog: dict) -> None:
    s = SurrogateLLM(SurrogateParams(h=1.0, eps_near=1.0))
    titles, matcher = catalog["titles"], catalog["matcher"]
    pool = s.pool_for(titles)
    for t in titles[:100]:
        for v in pool.near_misses(t):
            nv, nt = normalise_title(v), normalise_title(t)
            assert nv != nt and matcher.exact_item(nv) < 0
            assert ratio(nv, nt) >= 0.7
            assert matcher.match_one(v).matched
    # every fabricated title is unmatched; check a sample by brute force against every title
    assert len(pool.fabricated) == 512
    assert all(not m.matched for m in matcher.match(pool.fabricated))
    norms = matcher.normalised
    for f in pool.fabricated[:25]:
        nf = normalise_title(f)
        assert max(difflib.SequenceMatcher(None, nf, c).ratio() for c in norms) < 0.7
    # through generate(): all near-misses -> HallRate 0, none exact
    res = s.generate(aug_requests(catalog, 30), GP)
    ms = matched(catalog, res)
    assert hallucination_stats(ms)["hall_rate"] == 0.0
    assert not any(m.exact for out in ms for m in out)


def test_hall_rate_tracks_h(catalog: dict) -> None:
    s = SurrogateLLM(SurrogateParams(h=0.3, eps_near=0.5))
    st = hallucination_stats(matched(catalog, s.generate(aug_requests(catalog, 200), GP)))
    expected = 0.3 * 0.5
    assert st["hall_rate"] == pytest.approx(expected, abs=4 * np.sqrt(expected * (1 - expected) / 2000))


# --------------------------------------------------------------------------------------------
# determinism and batching
# --------------------------------------------------------------------------------------------


def test_determinism_and_batching_invariance(catalog: dict) -> None:
    params = SurrogateParams(h=0.3, eps_near=0.5, seed=11)
    reqs = aug_requests(catalog, 25) + aug_requests(catalog, 5, m=50, n=4, seed0=3)
    reqs += [
        LLMRequest("rank", "rank", {"relevance": np.arange(8.0), "popularity": np.ones(8), "seed": 5}),
        LLMRequest(
            "profile",
            "profile",
            {
                "history_genre_shares": [0.5, 0.5, 0, 0],
                "genre_prior": [0.25] * 4,
                "genres": ["A", "B", "C", "D"],
                "n_claims": 3,
                "seed": 5,
            },
        ),
    ]
    a = [r.text for r in SurrogateLLM(params).generate(reqs, GP)]
    b = [r.text for r in SurrogateLLM(params).generate(reqs[::-1], GP)][::-1]
    single = SurrogateLLM(params)
    c = [single.generate([r], GP)[0].text for r in reqs]
    assert a == b == c
    other = [r.text for r in SurrogateLLM(params.model_copy(update={"seed": 12})).generate(reqs, GP)]
    assert other != a
    # a different payload seed changes the text; the same seed in another task does not collide
    r0 = reqs[0]
    r0b = LLMRequest(r0.prompt, r0.task, {**r0.payload, "seed": 999_999})
    assert SurrogateLLM(params).generate([r0b], GP)[0].text != a[0]


def test_exclude_callable_titles_and_errors(catalog: dict) -> None:
    titles = catalog["titles"]
    s = SurrogateLLM(SurrogateParams(h=0.0))
    cands = np.arange(20)
    pl = {"candidates": cands, "n": 15, "titles": titles, "exclude": np.arange(10), "seed": 1}
    items = [
        m.item
        for m in catalog["matcher"].match(
            parse_title_list(s.generate([LLMRequest("p", "augment", pl)], GP)[0].text, 50)
        )
    ]
    assert len(items) == 10 and set(items) == set(range(10, 20))
    pl2 = {"candidates": cands, "n": 5, "titles": lambda i: titles[i], "n_items": len(titles), "seed": 1}
    pl3 = {**pl2, "titles": titles}
    t2, t3 = (s.generate([LLMRequest("p", "augment", p)], GP)[0].text for p in (pl2, pl3))
    assert t2 == t3
    bad = LLMRequest("p", "augment", {"candidates": cands, "relevance": [1.0], "titles": titles})
    unknown = LLMRequest("p", "dance", {})
    res = s.generate([bad, LLMRequest("p", "augment", pl3), unknown], GP)
    assert res[0].failed and "surrogate" in res[0].error and res[1].text == t3 and res[2].failed
    assert not res[1].failed and res[1].error == ""


def test_grown_catalog_extends_pool(catalog: dict) -> None:
    titles = list(catalog["titles"])
    s = SurrogateLLM(SurrogateParams(h=1.0, eps_near=0.0), pool_size=64)
    pool = s.pool_for(titles)
    clash = list(pool.fabricated[:5])
    grown = titles + clash  # new items that coincide with fabricated titles
    pool2 = s.pool_for(grown)
    assert pool2 is pool and len(pool2.titles) == len(grown)
    assert len(pool2.fabricated) == 59 and not set(clash) & set(pool2.fabricated)
    grown2 = grown + list(pool2.fabricated[:40])  # most of the pool lost -> topped up
    pool3 = s.pool_for(grown2)
    assert pool3 is pool and len(pool3.fabricated) == 64
    full = TitleMatcher(grown2)
    assert all(not m.matched for m in full.match(pool3.fabricated))


def test_candidates_unknown_to_the_built_catalog(catalog: dict) -> None:
    """Items added after the model was built (creator items): named from the request's ``candidate_titles``
    like titles a real model reads off the prompt, never picked without them, never an IndexError; requests
    with known candidates only are unchanged, and rank requests rank any candidate."""
    titles = catalog["titles"]
    n0 = 300  # the model knows titles[:n0]; ids n0.. are new
    s = SurrogateLLM(SurrogateParams(h=0.0, seed=3), titles=titles[:n0])
    cands = np.array([5, 7, n0 + 3, n0 + 50, 9])
    pl = {"candidates": cands, "relevance": [0.0, 0.0, 60.0, 50.0, 0.0], "n": 3, "seed": 1,
          "candidate_titles": [titles[i] for i in cands]}
    res = s.generate([LLMRequest("p", "augment", pl)], GP)[0]
    assert not res.failed and parse_title_list(res.text, 10)[:2] == [titles[n0 + 3], titles[n0 + 50]]
    bare = {k: v for k, v in pl.items() if k != "candidate_titles"}  # cannot be named: never picked
    res = s.generate([LLMRequest("p", "augment", bare)], GP)[0]
    assert not res.failed and set(parse_title_list(res.text, 10)) == {titles[5], titles[7], titles[9]}
    bad = s.generate([LLMRequest("p", "augment", {**pl, "candidate_titles": ["x"]})], GP)[0]
    assert bad.failed and "candidate_titles" in bad.error
    # near-misses of a new title match the new item in the grown catalog, never a known one by mistake
    hs = SurrogateLLM(SurrogateParams(h=1.0, eps_near=1.0, seed=3), titles=titles[:n0])
    reqs = [LLMRequest("p", "augment", {**pl, "relevance": [0.0, 0.0, 60.0, 0.0, 0.0], "n": 1, "seed": i})
            for i in range(20)]
    got = [TitleMatcher(titles).match(parse_title_list(r.text, 5))[0] for r in hs.generate(reqs, GP)]
    assert all(m.matched and m.item == n0 + 3 for m in got)
    # known candidates only: the same text with or without candidate_titles, alone or batched with new items
    rng = np.random.default_rng(5)
    known = [LLMRequest("p", "augment", {"candidates": rng.choice(n0, 40, replace=False), "relevance":
                                         rng.normal(size=40), "n": 6, "seed": i}) for i in range(12)]
    with_ct = [LLMRequest("p", "augment", {**r.payload, "candidate_titles": [titles[i] for i in
                                                                            r.payload["candidates"]]})
               for r in known]
    new = rng.choice(np.arange(n0, len(titles)), 40, replace=False)
    grown = [LLMRequest("p", "augment", {"candidates": new, "candidate_titles": [titles[i] for i in new],
                                         "relevance": rng.normal(size=40), "n": 6, "seed": 99 + i})
             for i in range(3)]
    mk = lambda: SurrogateLLM(SurrogateParams(h=0.3, seed=3), titles=titles[:n0])  # noqa: E731
    base = [r.text for r in mk().generate(known, GP)]
    mixed = mk().generate(with_ct + grown, GP)
    assert [r.text for r in mixed[: len(known)]] == base and not any(r.failed for r in mixed)
    assert [r.text for r in mixed[len(known):]] == [mk().generate([r], GP)[0].text for r in grown]
    named = TitleMatcher(titles).match([t for r in mixed[len(known):] for t in parse_title_list(r.text, 10)])
    assert {m.item for m in named if m.matched} & set(new.tolist())
    rank = s.generate([LLMRequest("p", "rank", {"relevance": np.arange(5.0), "candidates": cands, "seed": 2})], GP)
    assert sorted(parse_ranking(rank[0].text, 5)) == list(range(5))


# --------------------------------------------------------------------------------------------
# rank and profile tasks
# --------------------------------------------------------------------------------------------


def test_rank_output_parses_and_rho_is_recovered() -> None:
    k = 10
    s = SurrogateLLM(SurrogateParams(rho=0.7, beta=0.0, tau_s=1.0))
    reqs = [LLMRequest("rank", "rank", {"relevance": np.zeros(k), "seed": i}) for i in range(3000)]
    res = s.generate(reqs, GP)
    perms = [parse_ranking(r.text, k) for r in res]
    assert all(p is not None and sorted(p) == list(range(k)) for p in perms)
    first = np.array([p[0] + 1 for p in perms])
    assert fit_rho(first, k) == pytest.approx(0.7, abs=0.1)
    top_n = s.generate([LLMRequest("rank", "rerank", {"relevance": np.zeros(k), "n": 3, "seed": 1})], GP)
    assert len(parse_ranking(top_n[0].text, k)) == 3


def test_profile_claims_roundtrip() -> None:
    genres = ["Horror", "Drama", "Comedy", "Sci-Fi"]
    shares = np.array([0.5, 0.5, 0.0, 0.0])
    prior = np.array([0.0, 0.0, 0.6, 0.4])

    def run(h_p: float, n: int = 60) -> list[float]:
        s = SurrogateLLM(SurrogateParams(h_p=h_p))
        pl = {"history_genre_shares": shares, "genre_prior": prior, "genres": genres, "n_claims": 2}
        res = s.generate([LLMRequest("p", "profile", {**pl, "seed": i}) for i in range(n)], GP)
        out = []
        for r in res:
            claims = parse_profile_claims(r.text, genres)
            assert len(claims) == 2 and all(pol == "likes" for pol, _ in claims)
            out.append(profile_hallucination(claims, shares, genres)["prof_hall"])
        return out

    assert run(0.0) == [0.0] * 60
    assert run(1.0) == [1.0] * 60
    assert 0.1 < np.mean(run(0.3, 200)) < 0.5


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------


def test_fit_beta_and_calibrate(catalog: dict) -> None:
    payloads = [r.payload for r in aug_requests(catalog, 100)]
    rng = np.random.default_rng(3)
    refs = [catalog["pop"][rng.choice(N_ITEMS, 5, replace=False)] for _ in payloads]
    fn = expected_lpd_fn(payloads, refs, tau_s=1.0)
    grid = [fn(b) for b in np.linspace(-2, 3, 11)]
    assert all(b > a for a, b in zip(grid, grid[1:], strict=False))
    target = fn(1.3)
    assert fit_beta(target, fn) == pytest.approx(1.3, abs=1e-3)
    assert fit_beta(fn(5.0) + 10, fn) == 5.0  # out of range -> the bound

    k = 10
    w = np.arange(1, k + 1) ** -0.6
    positions = rng.choice(np.arange(1, k + 1), 5000, p=w / w.sum())
    p = calibrate(
        {
            "hall_rate": 0.1,
            "near_miss_rate": 0.05,
            "prof_hall": 0.25,
            "lpd": target,
            "lpd_payloads": payloads,
            "reference_pops": refs,
            "chosen_positions": positions,
            "n_candidates": k,
            "base": {"seed": 9},
        }
    )
    assert isinstance(p, SurrogateParams)
    assert p.h == pytest.approx(0.15) and p.eps_near == pytest.approx(1 / 3)
    assert p.h * (1 - p.eps_near) == pytest.approx(0.1)
    assert p.h_p == 0.25 and p.seed == 9
    assert p.beta == pytest.approx(1.3, abs=1e-3)
    assert p.rho == pytest.approx(0.6, abs=0.08)
    q = calibrate({"hall_rate": 0.2})
    assert q.h == 0.2 and q.eps_near == 0.0


def test_validate_surrogate() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random(500), rng.random(500)
    ok = validate_surrogate(a, b, 0.30, 0.31)
    assert ok["passed"] and ok["head_share_diff"] == pytest.approx(0.01)
    bad = validate_surrogate(a, b**3, 0.30, 0.31)
    assert not bad["passed"]
    assert not validate_surrogate(a, b, 0.30, 0.40)["passed"]


# --------------------------------------------------------------------------------------------
# interface and cost
# --------------------------------------------------------------------------------------------


def test_interface_and_registry() -> None:
    from recloop.llm.types import LLMBackend

    s = SurrogateLLM({"h": 0.2}, titles=["A", "B"])
    assert isinstance(s, LLMBackend) and s.uses_payload
    assert s.model_id.startswith("surrogate-v1:")
    assert s.model_id != SurrogateLLM({"h": 0.3}).model_id
    with pytest.raises(NotImplementedError):
        s.loglik(["a"], ["b"])
    registry = pytest.importorskip("recloop.registry")
    b = registry.build("llm_backend", {"type": "surrogate", "h": 0.05})
    assert isinstance(b, SurrogateLLM) and b.params.h == 0.05 and b.titles is None
    with pytest.raises(TypeError, match="unknown parameters"):  # nothing is swallowed
        SurrogateLLM(h=0.1, no_such_param=1)


def test_cost_is_small(catalog: dict) -> None:
    s = SurrogateLLM(SurrogateParams(h=0.1, eps_near=0.3))
    reqs = aug_requests(catalog, 100)
    s.generate(reqs, GP)  # builds the pool and near-miss caches
    best = min(_timed(lambda: s.generate(reqs, GP)) for _ in range(3))
    assert best < 0.1  # ~3 ms on an idle machine; generous for loaded CI runners


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
