"""LLM risk metrics (reference section B): L-HALL, L-PROFHALL, L-POPBIAS, L-DEMOJSD.

All functions take plain Python / numpy inputs (matched item ids, popularity arrays, parsed claims,
texts), so they work on real-model output and on :mod:`recloop.llm.surrogate` output
alike, per cycle or cumulatively. Empty inputs give NaN rates rather than errors.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import optimize, stats

from recloop.analysis.llm_lexicon import demographic_supported, side_words, tokens

__all__ = [
    "hallucination_stats",
    "profile_hallucination",
    "lpd",
    "popularity_percentiles",
    "distributional_popbias",
    "rank_popularity_correlation",
    "position_bias_slope",
    "jsd",
    "jsd_from_samples",
    "marked_words",
    "svm_separability",
]

_NAN = float("nan")


# --------------------------------------------------------------------------------------------
# L-HALL
# --------------------------------------------------------------------------------------------


def _is_match(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 3 and not isinstance(x[0], (tuple, list))


def hallucination_stats(
    matches: Sequence[Any],
    candidates_per_output: Sequence[Iterable[int] | None] | None = None,
) -> dict[str, float]:
    """L-HALL rates over a set of LLM outputs.

    ``matches`` is one output's list of :class:`~recloop.llm.matching.Match`
    (``(item, score, exact)``, item -1 = unmatched) or a list of such lists (one per output).
    ``candidates_per_output`` gives the candidate item ids shown in each prompt (None entries or
    None overall: no candidate constraint).

    Returns
    -------
    dict with
        ``hall_rate`` = #unmatched / #generated;
        ``duplicate_rate`` = #matched titles repeating an item earlier in the same output, / #generated;
        ``out_of_candidate_rate`` = #matched items not among that output's candidates / #matched
        (NaN without candidates);
        ``mean_match_score`` = mean difflib score over all generated titles;
        ``n_generated``, ``n_matched``, ``n_outputs``.
    """
    if len(matches) and _is_match(matches[0]):
        outputs: list[Sequence[Any]] = [matches]
        if candidates_per_output is not None and not isinstance(candidates_per_output[0], Iterable):
            candidates_per_output = [candidates_per_output]  # type: ignore[list-item]
    else:
        outputs = list(matches)
    n_gen = n_match = n_dup = n_ooc = n_cand_checked = 0
    score_sum = 0.0
    for k, out in enumerate(outputs):
        cands = None
        if candidates_per_output is not None and candidates_per_output[k] is not None:
            cands = {int(c) for c in candidates_per_output[k]}  # type: ignore[union-attr]
        seen: set[int] = set()
        for m in out:
            item, score = int(m[0]), float(m[1])
            n_gen += 1
            score_sum += score
            if item < 0:
                continue
            n_match += 1
            if item in seen:
                n_dup += 1
            seen.add(item)
            if cands is not None:
                n_cand_checked += 1
                if item not in cands:
                    n_ooc += 1
    return {
        "hall_rate": (n_gen - n_match) / n_gen if n_gen else _NAN,
        "duplicate_rate": n_dup / n_gen if n_gen else _NAN,
        "out_of_candidate_rate": n_ooc / n_cand_checked if n_cand_checked else _NAN,
        "mean_match_score": score_sum / n_gen if n_gen else _NAN,
        "n_generated": float(n_gen),
        "n_matched": float(n_match),
        "n_outputs": float(len(outputs)),
    }


# --------------------------------------------------------------------------------------------
# L-PROFHALL
# --------------------------------------------------------------------------------------------

def profile_hallucination(
    claims: Sequence[tuple[str, str]],
    genre_shares: Sequence[float] | np.ndarray,
    genres: Sequence[str],
    tau_like: float = 0.2,
    tau_dis: float = 0.05,
    rated_low: Iterable[str | int] | None = None,
    side_info: Mapping[str, Any] | Iterable[str] | None = None,
    prior: Sequence[float] | np.ndarray | None = None,
) -> dict[str, float]:
    """L-PROFHALL for one user's profile: 1 - precision of its atomic claims.

    ``claims`` come from :func:`~recloop.llm.profile_claims.parse_profile_claims`:
    ``("likes"|"dislikes", genre)`` or ``("claims", "demographic:<word>")``. ``genre_shares[g]`` is
    share_u(g) = mean over the history of p(g|i), aligned with ``genres``.

    * "likes g" is supported iff share_u(g) >= ``tau_like``;
    * "dislikes g" iff share_u(g) <= ``tau_dis`` and g is in ``rated_low`` (genre names or indices
      the user rated some item low); ``rated_low=None`` means no rating information, and only the
      share condition is checked;
    * demographic claims iff the word (or its gender synonym / age band, given a numeric
      ``side_info["age"]``) is in ``side_info``; no side information -> unsupported;
    * unknown genres and other claims are unsupported.

    Stereotyped claims (needs ``prior``, the population genre prior for the user's demographic,
    aligned with ``genres``): unsupported "likes g" with prior(g) >= tau_like, or unsupported
    "dislikes g" with prior(g) <= tau_dis. ``stereotyped_rate`` = #stereotyped / #claims.

    Returns ``prof_hall``, ``stereotyped_rate`` (NaN without prior), ``n_claims``, ``n_supported``.
    """
    shares = np.asarray(genre_shares, dtype=float)
    index = {g: k for k, g in enumerate(genres)}
    index.update({str(g).lower(): k for k, g in enumerate(genres)})
    low: set[int] | None = None
    if rated_low is not None:
        low = set()
        for g in rated_low:
            if isinstance(g, (int, np.integer)):
                low.add(int(g))
            elif g in index or str(g).lower() in index:
                low.add(index.get(g, index.get(str(g).lower(), -1)))
    pri = None if prior is None else np.asarray(prior, dtype=float)
    words, age = side_words(side_info)
    n = sup = stereo = 0
    for pol, val in claims:
        n += 1
        pol = str(pol).lower()
        if pol == "claims" or str(val).startswith("demographic:"):
            if demographic_supported(str(val).split(":", 1)[-1], words, age):
                sup += 1
            continue
        k = index.get(val, index.get(str(val).lower()))
        if k is None:
            continue
        if pol == "likes":
            ok = shares[k] >= tau_like
        elif pol == "dislikes":
            ok = shares[k] <= tau_dis and (low is None or k in low)
        else:
            ok = False
        if ok:
            sup += 1
        elif pri is not None:
            if (pol == "likes" and pri[k] >= tau_like) or (pol == "dislikes" and pri[k] <= tau_dis):
                stereo += 1
    return {
        "prof_hall": 1.0 - sup / n if n else _NAN,
        "stereotyped_rate": (stereo / n if n else _NAN) if pri is not None else _NAN,
        "n_claims": float(n),
        "n_supported": float(sup),
    }


# --------------------------------------------------------------------------------------------
# L-POPBIAS
# --------------------------------------------------------------------------------------------


def _per_user(x: Any) -> list[np.ndarray]:
    """A list of 1-D float arrays (one per user) from a flat array (one user) or a list of arrays."""
    if isinstance(x, np.ndarray):
        return [x.astype(float).ravel()] if x.ndim <= 1 else [r.astype(float) for r in x]
    x = list(x)
    if not x or all(np.ndim(v) == 0 for v in x):
        return [np.asarray(x, dtype=float)]
    return [np.asarray(v, dtype=float).ravel() for v in x]


def lpd(output_pops: Any, reference_pops: Any, plus_one: bool = True) -> float:
    """L-POPBIAS (a): log-popularity difference, mean over users.

    LPD_u = mean_{i in L_u} log10(1+phi(i)) - mean_{j in R_u} log10(1+phi(j)); LPD = mean_u LPD_u
    (mean aggregation: our choice, see reference G.5). Inputs are per-user lists of popularity
    arrays (matched outputs only), or two flat arrays for a single user. Users with an empty output
    or reference are skipped. ``plus_one=False`` uses log10(phi) (the reference's sanity case).
    > 0: outputs more popular than the user's own items.
    """
    outs, refs = _per_user(output_pops), _per_user(reference_pops)
    if len(outs) != len(refs):
        raise ValueError(f"lpd: {len(outs)} output lists but {len(refs)} reference lists")
    f = np.log10 if not plus_one else (lambda a: np.log10(1.0 + a))
    vals = [
        float(np.mean(f(o)) - np.mean(f(r))) for o, r in zip(outs, refs, strict=True) if o.size and r.size
    ]
    return float(np.mean(vals)) if vals else _NAN


def _catalog_percentiles(popularity: np.ndarray) -> np.ndarray:
    n = popularity.size
    return (stats.rankdata(popularity, method="average") - 0.5) / n


def popularity_percentiles(
    items: Iterable[int] | np.ndarray, popularity: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Catalog popularity percentile r(i) in (0, 1) of each item (mid-ranks for ties; -1 ids dropped).

    r = (average rank of phi(i) among all catalog items - 0.5) / n_I, so r is uniform over the
    catalog when popularities are distinct.
    """
    pop = np.asarray(popularity, dtype=float)
    it = np.asarray(list(items) if not isinstance(items, np.ndarray) else items, dtype=np.int64).ravel()
    it = it[it >= 0]
    return _catalog_percentiles(pop)[it]


def _flat_items(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        arr = x.ravel()
    else:
        x = list(x)
        arr = (
            np.concatenate([np.ravel(np.asarray(v)) for v in x]) if x and np.ndim(x[0]) > 0 else np.asarray(x)
        )
    arr = arr.astype(np.int64) if arr.size else np.zeros(0, dtype=np.int64)
    return arr[arr >= 0]


def distributional_popbias(
    output_items: Any,
    popularity: Sequence[float] | np.ndarray,
    head_mask: Sequence[bool] | np.ndarray,
    baseline_items: Any = None,
) -> dict[str, float]:
    """L-POPBIAS (b): where the outputs sit in the catalog's popularity distribution.

    ``output_items`` (flat ids or per-user lists; -1 = unmatched, dropped) are mapped to catalog
    percentiles r(i). ``ks_catalog``/``w1_catalog``: two-sample KS statistic and Wasserstein-1
    between the outputs' r and the catalog's r (equivalent to "uniform on r" without ties, and
    correct with ties); ``ks_baseline``/``w1_baseline`` against a baseline recommender's items
    (NaN if none); ``head_share`` = fraction of outputs in the short head ``head_mask`` (M-APLT).
    Also returns the KS p-values ``ks_catalog_p``/``ks_baseline_p`` and ``n``.
    """
    pop = np.asarray(popularity, dtype=float)
    head = np.asarray(head_mask, dtype=bool)
    r_cat = _catalog_percentiles(pop)
    items = _flat_items(output_items)
    out: dict[str, float] = {
        "ks_catalog": _NAN,
        "ks_catalog_p": _NAN,
        "w1_catalog": _NAN,
        "head_share": _NAN,
        "ks_baseline": _NAN,
        "ks_baseline_p": _NAN,
        "w1_baseline": _NAN,
        "n": float(items.size),
    }
    if items.size == 0:
        return out
    r = r_cat[items]
    ks = stats.ks_2samp(r, r_cat)
    out.update(
        ks_catalog=float(ks.statistic),
        ks_catalog_p=float(ks.pvalue),
        w1_catalog=float(stats.wasserstein_distance(r, r_cat)),
        head_share=float(head[items].mean()),
    )
    if baseline_items is not None:
        b = _flat_items(baseline_items)
        if b.size:
            rb = r_cat[b]
            ksb = stats.ks_2samp(r, rb)
            out.update(
                ks_baseline=float(ksb.statistic),
                ks_baseline_p=float(ksb.pvalue),
                w1_baseline=float(stats.wasserstein_distance(r, rb)),
            )
    return out


def rank_popularity_correlation(candidate_pops: Any, assigned_ranks: Any) -> dict[str, float]:
    """L-POPBIAS (c): rank correlation between candidate popularity and the LLM-assigned rank.

    One list (flat arrays) or several (lists of arrays, aligned). Ranks are 1 = top; NaN or
    negative ranks (candidates the LLM omitted) tie for last place. Returns the mean over lists of
    Spearman's rho and Kendall's tau (``spearman``, ``kendall``) and ``n_lists``. Sign convention:
    correlation of popularity with the rank *number*, so a **negative** value means popular
    candidates are ranked higher (popularity bias). Candidates should be shuffled (Hou et al.).
    """
    pops, ranks = _per_user(candidate_pops), _per_user(assigned_ranks)
    if len(pops) != len(ranks):
        raise ValueError("rank_popularity_correlation: pops and ranks have different list counts")
    sp, kt = [], []
    for p, r in zip(pops, ranks, strict=True):
        r = r.copy()
        bad = ~np.isfinite(r) | (r < 0)
        if bad.any():
            r[bad] = (np.nanmax(r[~bad]) if (~bad).any() else 0.0) + 1.0
        if p.size < 2 or np.all(p == p[0]) or np.all(r == r[0]):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sp.append(float(stats.spearmanr(p, r).statistic))
            kt.append(float(stats.kendalltau(p, r).statistic))
    return {
        "spearman": float(np.nanmean(sp)) if sp else _NAN,
        "kendall": float(np.nanmean(kt)) if kt else _NAN,
        "n_lists": float(len(sp)),
    }


def position_bias_slope(chosen_positions: Any, n_candidates: int | Sequence[int] | np.ndarray) -> float:
    """Position-bias slope rho: MLE of P(chosen at pos j) proportional to j**(-rho), j = 1..K.

    This is the log-linear regression of selection probability on log(1/pos) used by F-SURR (the
    surrogate's rerank score has the term rho*log(1/pos)). ``chosen_positions`` are the 1-based
    positions (as presented, candidates shuffled) of the candidate the LLM ranked first, one per
    prompt; ``n_candidates`` is K (an int, or one per prompt). 0 = no position bias, > 0 = earlier
    positions favoured. Bounded to [-20, 20] (all picks at position 1 gives +20).
    """
    pos = np.asarray(chosen_positions, dtype=float).ravel()
    ks = np.broadcast_to(np.asarray(n_candidates, dtype=np.int64), pos.shape)
    keep = (pos >= 1) & (pos <= ks)
    pos, ks = pos[keep], ks[keep]
    if pos.size == 0:
        return _NAN
    target = float(np.log(pos).sum())
    groups = Counter(ks.tolist())

    def expected_log(rho: float) -> float:
        tot = 0.0
        for k, cnt in groups.items():
            lj = np.log(np.arange(1, k + 1))
            w = -rho * lj
            w = np.exp(w - w.max())
            tot += cnt * float((w * lj).sum() / w.sum())
        return tot

    lo, hi = -20.0, 20.0
    f_lo, f_hi = expected_log(lo) - target, expected_log(hi) - target
    if f_hi >= 0:  # observed mean log position at (or below) the most position-biased model
        return hi
    if f_lo <= 0:
        return lo
    return float(optimize.brentq(lambda r: expected_log(r) - target, lo, hi, xtol=1e-8))


# --------------------------------------------------------------------------------------------
# L-DEMOJSD
# --------------------------------------------------------------------------------------------


def jsd(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray, base: float | None = 2) -> float:
    """Jensen-Shannon **divergence** (not scipy's sqrt distance); L-DEMOJSD.

    JSD = 1/2 KL(P||M) + 1/2 KL(Q||M), M = (P+Q)/2, with 0 log 0 = 0. Inputs are normalised.
    ``base=2`` gives bits (in [0, 1]); ``base=None`` or ``math.e`` gives nats.
    P=(1,0), Q=(.5,.5) -> 0.311278 bits = 0.215762 nats.
    """
    p = np.asarray(p, dtype=float)
    q = np.asarray(q, dtype=float)
    if p.shape != q.shape:
        raise ValueError(f"jsd: shapes differ {p.shape} vs {q.shape}")
    if p.sum() <= 0 or q.sum() <= 0:
        return _NAN
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    val = 0.5 * kl(p) + 0.5 * kl(q)
    if base is not None and base != math.e:
        val /= math.log(base)
    return max(val, 0.0)


def jsd_from_samples(samples_a: Iterable[Any], samples_b: Iterable[Any], base: float | None = 2) -> float:
    """JSD between the empirical frequency distributions of two samples (items, categories or words)."""
    ca, cb = Counter(samples_a), Counter(samples_b)
    keys = list(set(ca) | set(cb))
    return jsd([ca[k] for k in keys], [cb[k] for k in keys], base=base)



def marked_words(
    texts_a: Iterable[str],
    texts_b: Iterable[str],
    alpha_prior: float | Mapping[str, float] = 0.01,
    background: Iterable[str] | None = None,
    informative: bool = True,
    z_threshold: float = 1.96,
) -> list[tuple[str, float]]:
    """Marked Words (L-DEMOJSD companion): Monroe et al. log-odds with a Dirichlet prior.

    delta_w = log((y_a+a_w)/(n_a+a_0-y_a-a_w)) - log((y_b+a_w)/(n_b+a_0-y_b-a_w)),
    sigma^2 = 1/(y_a+a_w) + 1/(y_b+a_w), z = delta/sigma, a_0 = sum_w a_w.

    Prior (informative, Monroe et al. 2008 sec. 3.5): a_w = ``alpha_prior`` + the count of w in a
    background corpus: ``background`` texts if given, else the pooled corpus a + b.
    ``alpha_prior`` is a per-word pseudo-count (a float, or a mapping word -> count).
    ``informative=False`` drops the background term, leaving the flat prior a_w = alpha_prior of the
    FightinWords code (with 0.01 this almost never flags words absent from one group, because
    sigma is dominated by 1/a_w). Returns the words with |z| > ``z_threshold`` as (word, z),
    sorted by z descending: positive = marked in ``texts_a``, negative = marked in ``texts_b``.
    """
    ya: Counter[str] = Counter()
    yb: Counter[str] = Counter()
    for t in texts_a:
        ya.update(tokens(t))
    for t in texts_b:
        yb.update(tokens(t))
    vocab = sorted(set(ya) | set(yb))
    if not vocab:
        return []
    if isinstance(alpha_prior, Mapping):
        alpha = np.array([float(alpha_prior.get(w, 0.01)) for w in vocab])
    else:
        alpha = np.full(len(vocab), float(alpha_prior))
    if informative:
        if background is None:
            bg = ya + yb
        else:
            bg = Counter()
            for t in background:
                bg.update(tokens(t))
        alpha = alpha + np.array([bg[w] for w in vocab], dtype=float)
    a_cnt = np.array([ya[w] for w in vocab], dtype=float)
    b_cnt = np.array([yb[w] for w in vocab], dtype=float)
    a0 = alpha.sum()
    na, nb = a_cnt.sum(), b_cnt.sum()
    delta = np.log((a_cnt + alpha) / (na + a0 - a_cnt - alpha)) - np.log(
        (b_cnt + alpha) / (nb + a0 - b_cnt - alpha)
    )
    z = delta / np.sqrt(1.0 / (a_cnt + alpha) + 1.0 / (b_cnt + alpha))
    keep = np.abs(z) > z_threshold
    res = [(vocab[k], float(z[k])) for k in np.flatnonzero(keep)]
    return sorted(res, key=lambda t: -t[1])


def svm_separability(texts_a: Sequence[str], texts_b: Sequence[str], folds: int = 5, seed: int = 0) -> float:
    """SVM separability (L-DEMOJSD companion): cross-validated accuracy of LinearSVC on TF-IDF.

    Predicts the group (a vs b) from each output text; 0.5 means indistinguishable for balanced
    groups. Stratified K-fold (shuffled with ``seed``); folds are capped at the smaller group size.
    Needs scikit-learn (``pip install recloop[llm]`` or ``[dev]``).
    """
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        from sklearn.pipeline import make_pipeline
        from sklearn.svm import LinearSVC
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("svm_separability needs scikit-learn: pip install 'recloop[llm]'") from e
    texts = list(texts_a) + list(texts_b)
    y = np.array([0] * len(texts_a) + [1] * len(texts_b))
    k = min(int(folds), len(texts_a), len(texts_b))
    if k < 2:
        return _NAN
    model = make_pipeline(TfidfVectorizer(sublinear_tf=True), LinearSVC(C=1.0, random_state=seed))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    try:
        scores = cross_val_score(model, texts, y, cv=cv, scoring="accuracy")
    except ValueError:  # e.g. empty vocabulary
        return _NAN
    return float(np.mean(scores))
