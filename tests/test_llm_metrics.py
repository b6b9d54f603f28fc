"""L-HALL, L-PROFHALL, L-POPBIAS, L-DEMOJSD: reference sanity values, matcher and parsers."""

from __future__ import annotations

import difflib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recloop.analysis.llm_metrics import (
    distributional_popbias,
    hallucination_stats,
    jsd,
    jsd_from_samples,
    lpd,
    marked_words,
    popularity_percentiles,
    position_bias_slope,
    profile_hallucination,
    rank_popularity_correlation,
    svm_separability,
)
from recloop.llm.matching import Match, TitleMatcher, normalise_title, ratio
from recloop.llm.parsing import (
    FailureReason,
    ParseError,
    parse_ranking,
    parse_title_list,
    parse_title_list_checked,
    response_failure,
)
from recloop.llm.profile_claims import parse_profile_claims

# --------------------------------------------------------------------------------------------
# L-HALL: normalisation and matching
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("The Matrix", "the matrix"),
        ("Matrix, The (1999)", "the matrix"),
        ("  TOY   Story (1995) ", "toy story"),
        ("Schindler's List (1993)", "schindlers list"),
        ("Star Wars: Episode IV - A New Hope (1977)", "star wars episode iv a new hope"),
        ("ＴＯＹ Ｓｔｏｒｙ", "toy story"),  # NFKC full-width
        ("Straße", "strasse"),  # casefold
        ("Usual Suspects, The", "the usual suspects"),
        ("Lost World: Jurassic Park, The (1997)", "the lost world jurassic park"),
        ("", ""),
    ],
)
def test_normalise_title(raw: str, norm: str) -> None:
    assert normalise_title(raw) == norm


def test_lhall_reference_sanity() -> None:
    m = TitleMatcher(["The Matrix", "Toy Story", "Heat"])
    res = m.match(["the matrix", "Toy Storyy", "Flying Bananas"])
    assert [r.item for r in res] == [0, 1, -1]
    assert [r.exact for r in res] == [True, False, False]
    assert res[0].score == 1.0
    assert res[1].score == pytest.approx(0.947368, abs=5e-7)
    assert res[2].score == pytest.approx(0.260870, abs=5e-7)
    # the unmatched title's best is "toy story" (difflib is the score of record)
    assert ratio("flying bananas", "toy story") == pytest.approx(0.260870, abs=5e-7)
    st = hallucination_stats(res)
    assert st["hall_rate"] == pytest.approx(1 / 3)
    assert st["mean_match_score"] == pytest.approx((1.0 + 18 / 19 + 6 / 23) / 3)


def test_match_threshold_and_types() -> None:
    m = TitleMatcher(["Heat"], threshold=0.7)
    hit = m.match_one("Heatt")  # 8/9
    assert isinstance(hit, Match) and hit.matched and not hit.exact
    miss = m.match_one("Hat")  # 2*3/7 = 0.857 -> match; "Ha" 2*2/6 = 0.667 -> no
    assert miss.matched
    assert not m.match_one("Ha").matched
    assert m.match_one("!!!") == Match(-1, 0.0, False)


def test_year_disambiguates_duplicates() -> None:
    m = TitleMatcher(["Hamlet (1990)", "Hamlet (1996)", "Heat (1995)"])
    assert m.match_one("Hamlet (1996)").item == 1
    assert m.match_one("Hamlet").item == 0
    assert m.match_one("Heat").item == 2


def _catalog(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = (
        "night day river stone shadow king queen lost last first dark light city road dream fire ice "
        "love war storm silent secret island garden winter summer blue red golden iron star moon sun "
        "heart ghost empire return rise fall house forest ocean mountain song story"
    ).split()
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 4))
        t = " ".join(w.capitalize() for w in rng.choice(words, k, replace=False))
        if rng.random() < 0.4:
            t = "The " + t
        out.append(f"{t} ({int(rng.integers(1950, 2020))})")
    return out


def test_fuzzy_match_is_difflib_best() -> None:
    titles = _catalog(60)
    norms = [normalise_title(t) for t in titles]
    full = TitleMatcher(titles, shortlist=len(titles))
    dflt = TitleMatcher(titles)
    rng = np.random.default_rng(1)
    for _ in range(60):
        t = norms[int(rng.integers(len(norms)))]
        k = int(rng.integers(len(t)))
        q = t[:k] + "xq"[int(rng.integers(2))] + t[k + 1 :]
        qn = normalise_title(q)
        brute = max(difflib.SequenceMatcher(None, qn, c).ratio() for c in norms)
        r_full, r_dflt = full.match_one(q), dflt.match_one(q)
        assert r_full.score == pytest.approx(brute, abs=1e-12)
        assert r_dflt.score == pytest.approx(brute, abs=1e-12)
        assert r_dflt.matched == (brute >= 0.7)


#: difflib's greedy block matching scores these decoys far below their rapidfuzz (LCS) ratio: each has
#: Indel ratio 0.8 but difflib ratio 0.267 against QUERY, while TRUE_BEST has 0.786 under both
QUERY = "abbaabab bbaab"
DECOYS = ["abbbababbbaaabba", "bbabababbbaaabba", "abbbaaabbbababba", "bbabababbbababba", "ababaabbbbaaabba",
          "ababaaabbbababba"]
TRUE_BEST = "abababaababbaa"


def _brute(matcher: TitleMatcher, query: str) -> Match:
    """The documented L-HALL result by exhaustive difflib scoring (ties to the lower item id)."""
    qn = normalise_title(query)
    if not qn:
        return Match(-1, 0.0, False)
    if qn in matcher.normalised:
        return Match(matcher.normalised.index(qn), 1.0, True)
    scores = [ratio(qn, c) for c in matcher.normalised]
    best = max(scores, default=0.0)
    return Match(scores.index(best), best, False) if best >= matcher.threshold else Match(-1, best, False)


def test_fuzzy_match_beyond_the_rapidfuzz_top_five() -> None:
    from rapidfuzz import fuzz

    titles = DECOYS + ["Heat (1995)", TRUE_BEST, "Toy Story (1995)"]
    assert all(fuzz.ratio(QUERY, d) > fuzz.ratio(QUERY, TRUE_BEST) for d in DECOYS)  # top 6 are decoys
    assert all(ratio(QUERY, d) < 0.3 for d in DECOYS) and ratio(QUERY, TRUE_BEST) > 0.78
    m = TitleMatcher(titles)
    hit = m.match_one(QUERY)
    assert hit == _brute(m, QUERY) == Match(7, ratio(QUERY, TRUE_BEST), False)
    assert TitleMatcher(titles).match([QUERY, "heat", QUERY])[0] == hit  # the batched path agrees


def test_fuzzy_match_through_the_batched_role_path() -> None:
    from recloop.llm.roles import match_titles

    m = TitleMatcher(DECOYS + [TRUE_BEST] + _catalog(40))
    queries = [QUERY] * 3 + ["Golden River Night", "the lost empire", "zzz", "night day riverr", "Heat"]
    assert match_titles(m, queries) == [_brute(m, q) for q in queries]


def _edit(s: str, draw) -> str:
    """``s`` with up to two random one-character substitutions, insertions or deletions."""
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(s)))
        c = draw(st.sampled_from("ab "))
        s = draw(st.sampled_from([s[:i] + c + s[i + 1 :], s[:i] + c + s[i:], s[:i] + s[i + 1 :]]))
    return s


@st.composite
def _catalog_and_queries(draw) -> tuple[list[str], list[str]]:
    """Catalogs around the decoy construction above (edited decoys, the true best, random titles over
    the same tiny alphabet) and queries near QUERY: where difflib's greedy blocks score titles far
    below their rapidfuzz bound, so a top-few shortlist misses the difflib-best title."""
    text = st.text(alphabet="ab c", min_size=0, max_size=16)
    near = [_edit(t, draw) for t in draw(st.lists(st.sampled_from(DECOYS + [TRUE_BEST]), min_size=0, max_size=14))]
    catalog = draw(st.permutations(near + draw(st.lists(text, min_size=1, max_size=8))))
    return catalog, [_edit(QUERY, draw), *draw(st.lists(text, min_size=0, max_size=3))]


@settings(max_examples=150, deadline=None, database=None)
@given(data=_catalog_and_queries(), threshold=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9]))
def test_matcher_equals_brute_force(data: tuple[list[str], list[str]], threshold: float) -> None:
    """The exact search returns what exhaustive difflib scoring returns (item, score, exactness)."""
    catalog, queries = data
    m = TitleMatcher(catalog, threshold=threshold)
    expected = [_brute(m, q) for q in queries]
    assert m.match(queries) == expected
    assert [TitleMatcher(catalog, threshold=threshold).match_one(q) for q in queries] == expected


def test_exact_search_on_a_larger_catalog() -> None:
    """Past the partially sorted head of candidates (catalogs > 128 titles) the search stays exact."""
    from recloop.llm.matching import _descending

    titles = _catalog(300, seed=5) + DECOYS * 10 + [TRUE_BEST]
    m = TitleMatcher(titles)
    queries = [QUERY, "golden river nite", "the lost empire of night", "zzz", "abab", titles[7].lower() + "s"]
    assert m.match(queries) == [_brute(m, q) for q in queries]
    bound = np.random.default_rng(0).integers(0, 5, size=500).astype(float)
    order = list(_descending(bound, head=3))
    assert sorted(order) == list(range(500)) and all(np.diff(bound[order]) <= 0)


def test_max_possible_scores_is_an_upper_bound() -> None:
    titles = _catalog(80, seed=2)
    m = TitleMatcher(titles)
    norms = m.normalised
    queries = ["Golden River Night", "the lost empire", "Flying Bananas", titles[3], "zzz"]
    bound = m.max_possible_scores(queries)
    for q, b in zip(queries, bound, strict=True):
        qn = normalise_title(q)
        brute = max(difflib.SequenceMatcher(None, qn, c).ratio() for c in norms)
        assert b >= brute - 1e-9
    assert bound[3] == 1.0


def test_matcher_scales_to_large_catalogs() -> None:
    titles = _catalog(20_000, seed=3)
    m = TitleMatcher(titles)
    res = m.match([titles[5], titles[17].lower() + "x", "Completely Unrelated Words Here"] * 20)
    assert res[0].item == 5 and res[0].exact
    assert res[1].matched
    m.extend(["Brand New Film (2030)"])
    assert m.match_one("brand new film").item == 20_000


# --------------------------------------------------------------------------------------------
# L-HALL: rates
# --------------------------------------------------------------------------------------------


def test_hallucination_stats_rates() -> None:
    out1 = [Match(3, 1.0, True), Match(3, 0.9, False), Match(-1, 0.2, False), Match(7, 1.0, True)]
    out2 = [Match(1, 1.0, True)]
    st = hallucination_stats([out1, out2], candidates_per_output=[[3, 4, 5], None])
    assert st["hall_rate"] == pytest.approx(1 / 5)
    assert st["duplicate_rate"] == pytest.approx(1 / 5)
    assert st["out_of_candidate_rate"] == pytest.approx(1 / 3)  # item 7 of out1's 3 matched
    assert st["mean_match_score"] == pytest.approx((1 + 0.9 + 0.2 + 1 + 1) / 5)
    assert st["n_outputs"] == 2
    empty = hallucination_stats([])
    assert math.isnan(empty["hall_rate"]) and empty["n_generated"] == 0
    single = hallucination_stats(out1, candidates_per_output=[3, 4, 5])
    assert single["out_of_candidate_rate"] == pytest.approx(1 / 3)


# --------------------------------------------------------------------------------------------
# L-PROFHALL
# --------------------------------------------------------------------------------------------

GENRES = ["horror", "drama", "comedy", "sci-fi"]


def test_profhall_reference_sanity() -> None:
    res = profile_hallucination(
        [("likes", "horror"), ("likes", "comedy"), ("likes", "sci-fi")], [0.5, 0.5, 0.0, 0.0], GENRES
    )
    assert res["prof_hall"] == pytest.approx(2 / 3)
    assert res["n_claims"] == 3 and res["n_supported"] == 1
    assert math.isnan(res["stereotyped_rate"])


def test_profhall_through_the_parser() -> None:
    claims = parse_profile_claims("The user likes horror, comedy and sci-fi.", GENRES)
    assert claims == [("likes", "horror"), ("likes", "comedy"), ("likes", "sci-fi")]
    res = profile_hallucination(claims, [0.5, 0.5, 0.0, 0.0], GENRES)
    assert res["prof_hall"] == pytest.approx(2 / 3)


def test_profhall_dislikes_demographics_and_stereotypes() -> None:
    shares = [0.6, 0.4, 0.0, 0.0]
    claims = [("dislikes", "comedy"), ("dislikes", "sci-fi"), ("dislikes", "drama")]
    r = profile_hallucination(claims, shares, GENRES, rated_low=["comedy"])
    assert r["n_supported"] == 1  # comedy: share 0 and rated low; sci-fi: never rated low; drama: share 0.4
    r = profile_hallucination(claims, shares, GENRES)  # no rating info: share condition only
    assert r["n_supported"] == 2
    demo = [("claims", "demographic:female"), ("claims", "demographic:woman"), ("claims", "demographic:teen")]
    r = profile_hallucination(demo, shares, GENRES, side_info={"gender": "F", "age": 34})
    assert r["n_supported"] == 2
    assert profile_hallucination(demo, shares, GENRES)["prof_hall"] == 1.0
    prior = [0.1, 0.1, 0.5, 0.3]
    r = profile_hallucination([("likes", "comedy"), ("likes", "horror")], shares, GENRES, prior=prior)
    assert r["prof_hall"] == pytest.approx(0.5)
    assert r["stereotyped_rate"] == pytest.approx(0.5)  # unsupported "likes comedy" matches the prior


# --------------------------------------------------------------------------------------------
# L-POPBIAS
# --------------------------------------------------------------------------------------------


def test_lpd_reference_sanity() -> None:
    assert lpd([100, 1000], [10, 100], plus_one=False) == pytest.approx(1.0)
    assert lpd([[100, 1000]], [[10, 100]], plus_one=False) == pytest.approx(1.0)
    two = lpd([np.array([100, 1000]), np.array([10])], [np.array([10, 100]), np.array([10])], plus_one=False)
    assert two == pytest.approx(0.5)
    with_one = lpd([99, 999], [9, 99])
    assert with_one == pytest.approx(1.0)
    assert math.isnan(lpd([[]], [[1.0]]))
    with pytest.raises(ValueError):
        lpd([[1.0], [2.0]], [[1.0]])


def test_distributional_popbias() -> None:
    rng = np.random.default_rng(0)
    n = 500
    pop = rng.permutation(np.arange(n, dtype=float))
    head = pop >= np.quantile(pop, 0.8)
    r = popularity_percentiles(np.arange(n), pop)
    assert r.min() > 0 and r.max() < 1 and np.allclose(np.sort(r), (np.arange(n) + 0.5) / n)
    all_items = distributional_popbias(np.arange(n), pop, head)
    assert all_items["ks_catalog"] == pytest.approx(0.0, abs=1e-12)
    assert all_items["head_share"] == pytest.approx(head.mean())
    top = distributional_popbias([np.flatnonzero(head)[:50], np.flatnonzero(head)[50:]], pop, head)
    assert top["head_share"] == 1.0 and top["ks_catalog"] > 0.7 and top["w1_catalog"] > 0.3
    vs = distributional_popbias(np.flatnonzero(head), pop, head, baseline_items=np.arange(n))
    assert vs["ks_baseline"] == pytest.approx(vs["ks_catalog"])
    assert math.isnan(distributional_popbias([-1, -1], pop, head)["head_share"])


def test_rank_popularity_correlation() -> None:
    pops = [10, 50, 5, 100]
    ranks_by_pop = [3, 2, 4, 1]  # most popular ranked first
    res = rank_popularity_correlation(pops, ranks_by_pop)
    assert res["spearman"] == pytest.approx(-1.0) and res["kendall"] == pytest.approx(-1.0)
    res = rank_popularity_correlation([pops, pops], [ranks_by_pop, [2, 3, 1, 4]])
    assert res["n_lists"] == 2 and -1 < res["spearman"] < 0.5
    omitted = rank_popularity_correlation(pops, [2, 1, np.nan, np.nan])
    assert omitted["spearman"] < 0


def test_position_bias_slope_recovers_rho() -> None:
    rng = np.random.default_rng(0)
    k = 10
    for rho in (0.0, 0.8):
        p = np.arange(1, k + 1) ** -rho
        pos = rng.choice(np.arange(1, k + 1), size=20_000, p=p / p.sum())
        assert position_bias_slope(pos, k) == pytest.approx(rho, abs=0.05)
    assert position_bias_slope([1, 1, 1], 5) == 20.0
    assert math.isnan(position_bias_slope([], 5))


# --------------------------------------------------------------------------------------------
# L-DEMOJSD
# --------------------------------------------------------------------------------------------


def test_jsd_reference_sanity() -> None:
    from scipy.spatial.distance import jensenshannon

    assert jsd([1, 0], [0.5, 0.5], base=None) == pytest.approx(0.215762, abs=5e-7)
    assert jsd([1, 0], [0.5, 0.5], base=math.e) == pytest.approx(0.215762, abs=5e-7)
    assert jsd([1, 0], [0.5, 0.5]) == pytest.approx(0.311278, abs=5e-7)
    assert jensenshannon([1, 0], [0.5, 0.5], base=2) == pytest.approx(0.557923, abs=5e-7)  # the sqrt
    assert jsd([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == pytest.approx(0.0, abs=1e-15)
    assert jsd([1, 1, 0, 0], [0, 0, 3, 1]) == pytest.approx(1.0)
    assert jsd_from_samples(["a", "a", "b"], ["c"]) == pytest.approx(1.0)
    assert jsd_from_samples(["a", "b"], ["b", "a"]) == pytest.approx(0.0, abs=1e-15)


def test_marked_words() -> None:
    a = ["she is a caring nurse"] * 12 + ["she enjoys cooking"] * 4
    b = ["he is a strong engineer"] * 12 + ["he enjoys cooking"] * 4
    words = dict(marked_words(a, b))
    assert words["she"] > 1.96 and words["he"] < -1.96
    assert "cooking" not in words and "enjoys" not in words
    assert marked_words(a, a) == []
    zs = [z for _, z in marked_words(a, b)]
    assert zs == sorted(zs, reverse=True)


def test_svm_separability() -> None:
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    vocab = "movie film story plot actor scene great good nice fun long short".split()
    a = [" ".join(rng.choice(vocab, 8)) + " nurse caring" for _ in range(30)]
    b = [" ".join(rng.choice(vocab, 8)) + " engineer strong" for _ in range(30)]
    assert svm_separability(a, b) >= 0.95
    c = [" ".join(rng.choice(vocab, 8)) for _ in range(30)]
    d = [" ".join(rng.choice(vocab, 8)) for _ in range(30)]
    assert svm_separability(c, d) < 0.8
    assert math.isnan(svm_separability(["x"], ["y"]))


# --------------------------------------------------------------------------------------------
# parsers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("   \n ", []),
        (
            '1. The Matrix (1999)\n2. **Toy Story** - a fun film\n3. "Heat"',
            ["The Matrix (1999)", "Toy Story", "Heat"],
        ),
        ("Here are some movies:\n- Heat\n- Alien\n* Up", ["Heat", "Alien", "Up"]),
        ("Heat, Alien, Up", ["Heat", "Alien", "Up"]),
        ("1. Apollo 13. 2. Heat 3. Se7en", ["Apollo 13", "Heat", "Se7en"]),
        ('```json\n["Heat", {"title": "Alien"}]\n```', ["Heat", "Alien"]),
        (
            "Sure! Here are 3 recommendations:\n\n1. Heat: A crime film by Michael Mann with two legends.\n"
            "2) Alien\n3) Up\n\nEnjoy!",
            ["Heat", "Alien", "Up"],
        ),
        ("1. Heat\n   A great crime film.\n2. Alien", ["Heat", "Alien"]),
    ],
)
def test_parse_title_list(text: str, expected: list[str]) -> None:
    assert parse_title_list(text, 10) == expected


def test_parse_title_list_limits_and_failures() -> None:
    text = "\n".join(f"{i}. Film {i}" for i in range(1, 31))
    assert len(parse_title_list(text, 10)) == 10
    items, reason = parse_title_list_checked(text, 10)
    assert len(items) == 10 and reason is FailureReason.TOO_LONG
    assert parse_title_list_checked("", 10) == ([], FailureReason.EMPTY)
    assert parse_title_list_checked("1. Heat", 10, max_chars=3)[1] is FailureReason.TOO_LONG
    assert parse_title_list_checked("***", 10) == ([], FailureReason.UNPARSABLE)
    assert parse_title_list_checked("1. Heat\n2. Up", 10) == (["Heat", "Up"], None)
    # junk still parses as a title: it is a hallucination for L-HALL, not a parse failure
    assert parse_title_list("asdf qwer zxcv", 10) == ["asdf qwer zxcv"]


def test_failure_reasons() -> None:
    assert {r.value for r in FailureReason} == {"empty", "unparsable", "too_long", "timeout", "budget"}
    err = ParseError("unparsable", "no list")
    assert err.reason is FailureReason.UNPARSABLE and "no list" in str(err)

    class R:
        def __init__(self, text: str = "", failed: bool = False, error: str = "") -> None:
            self.text, self.failed, self.error = text, failed, error

    assert response_failure(R(failed=True, error="timeout")) is FailureReason.TIMEOUT
    assert response_failure(R(failed=True, error="budget_exhausted")) is FailureReason.BUDGET
    assert response_failure(R(failed=True, error="http_503")) is FailureReason.EMPTY
    assert response_failure(R(text="  ")) is FailureReason.EMPTY
    assert response_failure(R(text="1. Heat")) is None


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("3, 1, 2", 3, [2, 0, 1]),
        ("[C] > [A] > [B]", 3, [2, 0, 1]),
        ("C > A", 4, [2, 0]),
        ("I think the ranking for these 3 is: 2, 3, 1", 3, [1, 2, 0]),
        ("1. 3\n2. 1\n3. 2", 3, [2, 0, 1]),
        ("1. [B] Heat\n2. [A] Up", 2, [1, 0]),
        ("5, 5, 2, 9, 1", 5, [4, 1, 0]),
        ("junk", 3, None),
        ("", 3, None),
        ("2 -> 1", 2, [1, 0]),
    ],
)
def test_parse_ranking(text: str, n: int, expected: list[int] | None) -> None:
    assert parse_ranking(text, n) == expected


def test_parse_ranking_by_titles_and_zero_based() -> None:
    assert parse_ranking("1. Heat\n2. Up", 2, titles=["Up", "Heat"]) == [1, 0]
    assert parse_ranking("0, 2, 1", 3, one_based=False) == [0, 2, 1]


def test_parse_profile_claims() -> None:
    g = ["Horror", "Drama", "Comedy", "Sci-Fi", "Children's", "Film-Noir"]
    text = (
        "She loves comedies and sci fi but does not like horror; a 25-year-old female student who is "
        "not a fan of Film-Noir. Enjoys Children's movies."
    )
    claims = parse_profile_claims(text, g)
    assert ("likes", "Comedy") in claims and ("likes", "Sci-Fi") in claims
    assert ("dislikes", "Horror") in claims and ("dislikes", "Film-Noir") in claims
    assert ("likes", "Children's") in claims
    assert ("claims", "demographic:female") in claims and ("claims", "demographic:age25") in claims
    assert parse_profile_claims("", g) == []
    assert parse_profile_claims("Nothing relevant here.", g) == []
    assert parse_profile_claims("The user likes Horror. The user likes Horror.", g) == [("likes", "Horror")]
    assert parse_profile_claims("Likes science fiction.", g, aliases={"science fiction": "Sci-Fi"}) == [
        ("likes", "Sci-Fi")
    ]
