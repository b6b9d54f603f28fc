"""LLM risk metrics per cycle, tagged by role and phase (reference B, F-ROLES).

Three metric components, one per phase; each emits names starting with ``llm_`` and a ``group``
``role=<augmenter|ranker|profiler>,phase=<generation|recommendation|feedback_loop>``, so the
phase-wise picture can be read from ``metrics.parquet`` alone:

* ``llm_generation`` - the LLM's own outputs (content generation): L-HALL with duplicate and
  out-of-candidate rates, L-POPBIAS (LPD, head share, KS vs the catalog) of the augmenter's
  generated items, the malformed-output rate;
* ``llm_recommendation`` - the ranked lists after the LLM stage: the re-ranker's position-bias
  slope and popularity-rank correlation (Hou et al.), LPD and head share of the final slates vs the
  users' histories, and how much the LLM changed the base slates;
* ``llm_feedback`` - the ecosystem over time: the share of the training log that is LLM-augmented,
  phantom items and their exposure and consumption, and the cumulative fallback rate per role.

They are on by default but emit nothing when the policy has no LLM role, so non-LLM runs are
unchanged. They read the roles' stage reports in the cycle record (``record.stages``: each LLM
role's ``stage_report()``, snapshotted by the loop) and the run's LLM service (``record.services``).
"""

from __future__ import annotations

import numpy as np

from recloop.analysis import llm_metrics as L
from recloop.analysis import metrics as M
from recloop.analysis.collectors import MetricComponent
from recloop.registry import register

from .reports import AugmenterReport, ProfilerReport, RankerReport

NAN = float("nan")


def _roles(rec) -> list:
    """The stage reports of the LLM roles in the serving policy (tree order)."""
    return [s for s in rec.stages if isinstance(s, AugmenterReport | RankerReport | ProfilerReport)]


def group(role: str, phase: str) -> str:
    """The metric group of an LLM risk metric: ``role=<role>,phase=<phase>``."""
    return f"role={role},phase={phase}"


def _pop(popularity: np.ndarray, n: int) -> np.ndarray:
    pop = np.zeros(n)
    m = min(n, len(popularity))
    pop[:m] = popularity[:m]
    return pop


def _slate_lpd(slates: np.ndarray, users: np.ndarray, history, pop: np.ndarray) -> tuple[float, float]:
    """(LPD of slates vs each user's history, head share of the slate items) over the given rows."""
    if len(users) == 0 or slates.size == 0:
        return NAN, NAN
    logp = np.log10(1.0 + pop)
    valid = slates >= 0
    sl = np.where(valid, slates, 0)
    cnt = valid.sum(axis=1)
    rec = np.where(valid, logp[sl], 0.0).sum(axis=1) / np.maximum(cnt, 1)
    indptr, items = history.csr(users)
    lens = np.diff(indptr)
    owner = np.repeat(np.arange(len(users)), lens)
    items = np.minimum(items, len(pop) - 1)
    ref = np.bincount(owner, weights=logp[items], minlength=len(users)) / np.maximum(lens, 1)
    ok = (cnt > 0) & (lens > 0)
    lpd = float(np.mean(rec[ok] - ref[ok])) if ok.any() else NAN
    head = M.short_head_mask(pop)
    head_share = float(head[sl][valid].mean()) if valid.any() else NAN
    return lpd, head_share


def mean_spearman(pops: list, ranks: list) -> float:
    """Mean over lists of Spearman's rho between candidate popularity and assigned rank (L-POPBIAS c),
    vectorised per list length; lists with constant popularity are skipped (as in
    :func:`recloop.analysis.llm_metrics.rank_popularity_correlation`, which this matches)."""
    from scipy.stats import rankdata

    by_len: dict[int, list[int]] = {}
    for j, p in enumerate(pops):
        by_len.setdefault(len(p), []).append(j)
    vals = []
    for m, idx in by_len.items():
        if m < 2:
            continue
        P = np.asarray([pops[j] for j in idx], np.float64)
        R = np.asarray([ranks[j] for j in idx], np.float64)
        ok = ~np.all(P == P[:, :1], axis=1) & ~np.all(R == R[:, :1], axis=1)
        if not ok.any():
            continue
        rp = rankdata(P[ok], axis=1)
        rr = rankdata(R[ok], axis=1)
        rp -= rp.mean(axis=1, keepdims=True)
        rr -= rr.mean(axis=1, keepdims=True)
        rho = (rp * rr).sum(axis=1) / np.sqrt((rp**2).sum(axis=1) * (rr**2).sum(axis=1))
        vals.append(rho)
    if not vals:
        return NAN
    return float(np.nanmean(np.concatenate(vals)))


@register("metric", "llm_generation")
class LLMGeneration(MetricComponent):
    """LLM risk metrics of the LLM's own outputs (phase generation), per LLM role (none without one)."""

    METRICS = {
        "llm_hall_rate": "L-HALL share of generated titles matching no real catalog item (tau=0.7; "
        "a match to a phantom item counts as a hallucination); role=augmenter,phase=generation",
        "llm_duplicate_rate": "L-HALL matched titles repeating an item earlier in the same answer "
        "/ generated",
        "llm_out_of_candidate_rate": "L-HALL matched items not among the candidates shown / matched",
        "llm_match_score": "L-HALL mean difflib match score over generated titles",
        "llm_lpd": "L-POPBIAS LPD: mean log10(1+phi) of the LLM's items (generation: matched "
        "generated items; "
        "recommendation: final slates) minus that of the user's history (>0: more popular)",
        "llm_head_share": "L-POPBIAS share of the LLM's items in the short head (M-APLT head, pop_ratio 0.8)",
        "llm_ks_catalog": "L-POPBIAS KS statistic of the items' popularity percentiles vs the catalog's",
        "llm_cold_share": "share of matched generated items that were cold (no interactions) - "
        "LLMRec cold start",
        "llm_malformed_rate": "malformed answers (empty, unparsable, too_long, timeout, budget, "
        "backend_error) "
        "/ requests this cycle, per role",
        "llm_augmented": "pseudo-interactions added to the training log in this round (R1)",
        "llm_new_phantoms": "phantom items created in this round (R1, unmatched: phantom)",
        "llm_served": "users whose slate the LLM re-ranked this cycle (R3)",
    }

    def setup(self, world, seed, config):
        self.reported: dict[str, int] = {}

    def compute(self, rec):
        rows = []
        for idx, role in enumerate(_roles(rec)):
            name = role.role
            if name == "augmenter":
                last = role.last or {}
                key = f"{idx}:{name}"
                if last and self.reported.get(key) != last.get("seq"):
                    self.reported[key] = last["seq"]
                    g = group(name, "generation")
                    for k, v in last["stats"].items():
                        if k == "n_generated":
                            continue
                        rows.append((f"llm_{k}", g, float(v)))
            elif name == "ranker":
                c = role.cycle
                if c.get("step") == rec.step and c.get("requests"):
                    g = group(name, "generation")
                    rows.append(("llm_malformed_rate", g, c["failed"] / c["requests"]))
                    rows.append(("llm_served", g, float(c["served"])))
        return rows


@register("metric", "llm_recommendation")
class LLMRecommendation(MetricComponent):
    """LLM risk metrics of the ranked lists after the LLM stage (phase recommendation)."""

    METRICS = {
        "llm_position_bias_slope": "R3 position-bias slope rho (MLE of P(first pick at presented position j) "
        "~ j^-rho; 0 = none; meaningful with shuffles > 0); role=ranker,phase=recommendation",
        "llm_rank_pop_corr": "R3 Spearman correlation of candidate popularity with the LLM-assigned "
        "rank number "
        "(negative = popular candidates ranked higher), mean over prompts",
        "llm_lpd_shift": "R3 LPD of the LLM's slates minus LPD of the base order's slates (same users)",
        "llm_slate_change": "R3 share of shown top-k slots whose item differs from the base order's at the "
        "same position (re-ordering counts)",
        "llm_slate_turnover": "R3 share of shown top-k items that were not in the base order's top k",
    }

    def compute(self, rec):

        rows = []
        pop = _pop(rec.popularity_before, rec.world.items.n)
        for role in _roles(rec):
            name = role.role
            g = group(name, "recommendation")
            if name == "ranker":
                c = role.cycle
                if c.get("step") != rec.step or not c.get("users"):
                    continue
                if c["first_pos"]:
                    rows.append(
                        (
                            "llm_position_bias_slope",
                            g,
                            L.position_bias_slope(c["first_pos"], c["n_presented"]),
                        )
                    )
                    rows.append(("llm_rank_pop_corr", g, mean_spearman(c["cand_pops"], c["ranks"])))
                users = np.asarray(c["users"], np.int64)
                llm = np.asarray(c["llm_topk"], np.int64)
                base = np.asarray(c["base_topk"], np.int64)
                lpd_llm, head = _slate_lpd(llm, users, rec.history, pop)
                lpd_base, _ = _slate_lpd(base, users, rec.history, pop)
                rows += [
                    ("llm_lpd", g, lpd_llm),
                    ("llm_head_share", g, head),
                    ("llm_lpd_shift", g, lpd_llm - lpd_base),
                ]
                shown_mask = llm >= 0
                moved = (llm != base) & shown_mask
                same = (llm[:, :, None] == base[:, None, :]).any(axis=2) & shown_mask
                shown = (llm >= 0).sum()
                rows.append(("llm_slate_change", g, moved.sum() / shown if shown else NAN))
                rows.append(("llm_slate_turnover", g, 1.0 - same.sum() / shown if shown else NAN))
            elif name == "augmenter":
                sample = rec.user_sample
                if len(sample) == 0:
                    continue
                sl = rec.slates[np.searchsorted(rec.users, sample)]
                lpd_v, head = _slate_lpd(sl, sample, rec.history, pop)
                rows += [("llm_lpd", g, lpd_v), ("llm_head_share", g, head)]
        return rows


@register("metric", "llm_feedback")
class LLMFeedback(MetricComponent):
    """LLM risk metrics of the ecosystem over time (phase feedback_loop): spread of augmented and
    hallucinated interactions, phantom exposure, fallbacks."""

    METRICS = {
        "llm_log_share": "share of the training log with provenance llm_augmented; "
        "role=augmenter,phase=feedback_loop",
        "llm_augmented_cum": "cumulative llm_augmented interactions logged",
        "llm_phantom_items": "phantom (hallucinated) items in the catalog",
        "llm_phantom_exposure": "share of shown slots (all users, this cycle) holding phantom items",
        "llm_phantom_consumption": "share of this cycle's consumed items that are phantom items",
        "llm_phantom_in_log": "share of the training log's interactions on phantom items",
        "llm_fallback_rate": "cumulative share of LLM decisions that fell back (R1: users not augmented; "
        "R3: users keeping the base order; others: fallbacks/requests), per role",
    }

    def compute(self, rec):
        rows = []
        roles = _roles(rec)
        if not roles:
            return rows
        svc = rec.services.get("llm")
        acc_roles = svc.roles if svc is not None else {}
        for role in roles:
            name = role.role
            g = group(name, "feedback_loop")
            if name == "augmenter":
                shares = rec.provenance_shares
                rows.append(("llm_log_share", g, float(shares[2])))
                rows.append(("llm_augmented_cum", g, float(rec.log_counts[2])))
                ph = role.phantom
                rows.append(("llm_phantom_items", g, float(ph.sum())))
                if ph.any():
                    shown = rec.slates[rec.slates >= 0]
                    shown = shown[shown < len(ph)]
                    rows.append(("llm_phantom_exposure", g, float(ph[shown].sum()) / max(rec.slates.size, 1)))
                    ch = rec.chosen_item[(rec.chosen_item >= 0) & (rec.chosen_item < len(ph))]
                    n_ch = int((rec.chosen_item >= 0).sum())
                    rows.append(("llm_phantom_consumption", g, float(ph[ch].sum()) / n_ch if n_ch else 0.0))
                    items = rec.platform.training_data().items
                    inside = items[items < len(ph)]
                    rows.append(("llm_phantom_in_log", g, float(ph[inside].sum()) / max(len(items), 1)))
                else:
                    rows += [("llm_phantom_exposure", g, 0.0), ("llm_phantom_consumption", g, 0.0)]
                a = acc_roles.get("augmenter", {})
                req = a.get("requests", 0)
                rows.append(("llm_fallback_rate", g, a.get("fallbacks", 0) / req if req else NAN))
            elif name == "ranker":
                served = role.served_total
                rows.append(("llm_fallback_rate", g, role.fallbacks_total / served if served else NAN))
            else:
                a = acc_roles.get(name, {})
                req = a.get("requests", 0)
                rows.append(("llm_fallback_rate", g, a.get("fallbacks", 0) / req if req else NAN))
        return rows
