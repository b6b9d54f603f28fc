"""Conformal recommendation sets measured every cycle of the loop (metric ``conformal``; reference C-SPLIT,
C-EXCH, C-ACI, C-FDR; not on by default).

Each cycle the users who consumed something are the points (label: the item consumed, see
:mod:`recloop.analysis.conformal_points`), split into disjoint temperature-fit, calibration and test
samples. The scorer's probabilities p̂(i | u) = softmax(β·s_ui) over the items the user can get are
computed in the engine's chunks (:mod:`recloop.sim.conformal_chunks`), never as a users × items matrix:
per user only the label's probability, the mass above it and, for test users, the set sizes.

* Scorer: the serving policy (its probe's factors or scores, as the record has them: an online policy
  has already learnt from the cycle, retraining comes after the metrics), or ``scorer:``, a separate
  policy built by the metric and fitted once on the initial log (the C-EXCH control's frozen model).
* Temperature 1/β: ``temperature`` when given, else the likelihood fit on the temperature-fit users
  (never the cycle's calibration or test points), once for a frozen scorer, every
  ``temperature_every`` cycles for the serving one (warm-started Newton steps).
* Methods ``lac``, ``aps``, ``aps_rand``; calibration ``frozen``, ``recal``, ``weighted``, ``aci``,
  ``aci_decay`` (:mod:`recloop.analysis.conformal_calib`); Mondrian variants with
  ``group_conditional``; FDR-controlled sets with ``fdr`` (:mod:`recloop.analysis.conformal_fdr`).

Rows: ``group`` is ``method=<m>,calib=<c>,alpha=<a>`` and, for stratified rows, ``,stratum=<s>`` with s
``size:<0|1|2-5|6-20|21-100|>100>``, ``pop:<head|mid|tail>`` or ``user:<group>``.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from recloop import registry
from recloop.analysis import conformal_points as P
from recloop.analysis.collectors import MetricComponent
from recloop.analysis.conformal_calib import MODE_CODE, CalibrationState, Query, method_scores
from recloop.analysis.conformal_fdr import FdrAccumulator, FdrConfig, FdrState
from recloop.analysis.user_collectors import _Before
from recloop.component import Child
from recloop.contracts import TrainingData
from recloop.registry import Params, register
from recloop.rng import component_rng
from recloop.sim.conformal_chunks import BlockScorer, block_stats, fit_beta, score_blocks

__all__ = ["ConformalMetric"]

Level = Annotated[float, Field(gt=0.0, lt=1.0)]
Users = Annotated[int, Field(ge=0, le=1_000_000)]


class _Params(Params):
    scorer: Child("policy") | None = Field(  # type: ignore[valid-type]
        None, description="the policy whose scores give p̂ (fitted once on the initial log); default: the serving "
                          "policy")
    methods: list[Literal["lac", "aps", "aps_rand"]] = Field(default_factory=lambda: ["lac", "aps"], min_length=1)
    alphas: list[Level] = Field(default_factory=lambda: [0.1], min_length=1, description="miscoverage levels α")
    calibration: list[Literal["frozen", "recal", "weighted", "aci", "aci_decay"]] = Field(
        default_factory=lambda: ["recal"], min_length=1, description="how q̂ follows the loop (C-EXCH, C-ACI)")
    rho: Annotated[float, Field(gt=0.0, le=1.0)] = Field(0.9, description="weighted: weights ρ^(t − t_i)")
    window: Annotated[int, Field(ge=1, le=10_000)] = Field(50, description="weighted: cycles of points kept")
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = Field(0.05, description="ACI step γ")
    aci_power: Annotated[float, Field(gt=0.5, le=1.0)] = Field(0.6, description="aci_decay: step γ·t^(−power)")
    calibration_users: Users = Field(500, description="calibration points per cycle")
    test_users: Users = Field(500, description="test points per cycle")
    temperature_users: Users = Field(300, description="points per temperature fit (disjoint from the others)")
    temperature: Annotated[float, Field(gt=0.0)] | Literal["model"] | None = Field(
        None, description="a fixed temperature (no fit); model: the scorer's own probabilities where it has them "
                          "(score_temperature, e.g. sasrec/cosrec with the softmax loss), else fitted")
    temperature_every: Annotated[int, Field(ge=1, le=100_000)] = Field(
        1, description="refit the serving scorer's temperature every n measured cycles")
    group_conditional: bool = Field(False, description="also Mondrian (per user group) calibration")
    user_groups: str = Field("auto", description="user attribute defining groups; auto | popularity | none")
    strata: list[Literal["set_size", "popularity", "user_group"]] = Field(
        default_factory=lambda: ["set_size", "popularity", "user_group"], description="stratified rows")
    fdr: FdrConfig | None = Field(None, description="FDR-controlled sets by Learn-then-Test (C-FDR)")


@register("metric", "conformal")
class ConformalMetric(MetricComponent):
    """Conformal sets' coverage, size and FDR per cycle (C-SPLIT, C-EXCH, C-ACI, C-FDR): LAC / APS sets
    from the scorer's softmax probabilities, calibrated frozen, every cycle, with recency weights or ACI."""

    default = False
    Params = _Params
    example_params = {"methods": ["lac", "aps", "aps_rand"], "calibration": ["frozen", "recal", "weighted", "aci"],
                      "calibration_users": 15, "test_users": 15, "temperature_users": 10, "group_conditional": True,
                      "scorer": {"type": "popularity"}, "fdr": {"users": 5, "grid": 5, "diverse": True}}
    METRICS = {
        "conformal_coverage": "C-SPLIT empirical coverage: the share of the cycle's test users whose label (the item "
                              "consumed) is in their set; group method=<m>,calib=<c>,alpha=<a>[,stratum=<s>]",
        "conformal_gap": "C-SPLIT coverage − (1 − α)",
        "conformal_set_size_mean": "C-SPLIT mean |C| over the test users",
        "conformal_set_size_median": "C-SPLIT median |C| over the test users",
        "conformal_qhat": "the threshold q̂ used this cycle (marginal calibrations)",
        "conformal_n_calib": "calibration points behind q̂ this cycle",
        "conformal_n_test": "test points this cycle",
        "conformal_alpha_t": "C-ACI level α_t used this cycle",
        "conformal_err_running": "C-ACI long-run error (1/T)Σ err_t (err_t: the test users' uncovered fraction)",
        "conformal_fdr": "C-FDR mean false-discovery proportion of the LTT-calibrated sets over the test users",
    }

    def __init__(self, params=None):
        super().__init__(params)
        p = self.params
        self.scorer = registry.build("policy", p.scorer) if p.scorer is not None else None
        self.needs_serve_time_truth = p.fdr is not None
        self.queries = [Query(m, c, a, mond) for m in p.methods for c in p.calibration for a in p.alphas
                        for mond in ([False, True] if p.group_conditional and c not in ("aci", "aci_decay")
                                     else [False])]

    def on_bind(self, context) -> None:
        if self.scorer is not None:
            view = context.view.granting(self.scorer.uses_ground_truth, who="the conformal metric's scorer")
            self.scorer.bind(context.with_view(view))
        super().on_bind(context)

    def setup(self, world, seed, config):
        p = self.params
        self.seed = int(seed)
        self.beta = 1.0 / p.temperature if isinstance(p.temperature, float) else math.nan
        self.own_probabilities = False  # the scorer's own probabilities are used (temperature: model)
        self.fits = 0  # temperature fits so far (the serving scorer refits every temperature_every cycles)
        self.measured = 0
        self.scorer_fitted = False
        self.attribute = P.group_attribute(world, p.user_groups) if p.user_groups != "none" else None
        self.calib = CalibrationState(p.rho, p.window, p.gamma, p.aci_power)
        self.fdr = FdrState()

    # -- the scorer -------------------------------------------------------------------------------------
    def _block_scorer(self, rec) -> BlockScorer:
        n = rec.world.items.n
        if self.scorer is not None:
            if not self.scorer_fitted:
                self._fit_scorer()
            view = self.scorer.context.view
            f = self.scorer.factors(view)
            return BlockScorer(n, factors=f) if f is not None else \
                BlockScorer(n, fn=lambda ids: self.scorer.score(ids, view, rec.step))
        f = rec.policy.factors()
        return BlockScorer(n, factors=f) if f is not None else BlockScorer(n, fn=rec.policy.scores)

    def _fit_scorer(self) -> None:
        view = self.scorer.context.view
        d = view.training_data()
        m = d.steps < 0  # the initial (organic) log only: the model is frozen from then on
        data = TrainingData(d.users[m], d.items[m], d.steps[m], d.provenance[m], d.n_users, d.n_items)
        self.scorer.fit(data, view, step=0, rng=component_rng(self.seed, "metric.conformal.scorer"), warm_start=False)
        self.scorer_fitted = True

    def _model_temperature(self, rec) -> float | None:
        """The scorer's own temperature when ``temperature: model`` and it has probabilities."""
        if self.params.temperature != "model":
            return None
        if self.scorer is not None:
            t = self.scorer.score_temperature
            return None if t is None else float(t)
        return rec.policy.score_temperature()

    def _fit_due(self) -> bool:
        p = self.params
        return not isinstance(p.temperature, float) and not self.own_probabilities and (
            not math.isfinite(self.beta) or (
            self.scorer is None and self.measured % p.temperature_every == 0))

    def _temperature(self, rec, scorer, users, labels, exclude) -> None:
        if not len(users):
            return

        def blocks():
            return score_blocks(rec.engine, users, scorer, exclude)

        beta0 = self.beta if math.isfinite(self.beta) else _initial_beta(blocks())
        self.beta = fit_beta(blocks, labels, beta0, max_iter=8 if math.isfinite(self.beta) else 30)
        self.fits += 1

    # -- one cycle ----------------------------------------------------------------------------------------
    def compute(self, rec):
        p = self.params
        users, labels = P.cycle_points(rec)
        own = self._model_temperature(rec)
        self.own_probabilities = own is not None
        if own is not None:
            self.beta = 1.0 / own
        fit_now = self._fit_due()
        s = P.split(len(users), self.seed, rec.step, p.temperature_users if fit_now else 0, p.calibration_users,
                    p.test_users)
        if len(s.cal) < 1 or len(s.test) < 1:
            self.measured += 1
            return []
        exclude = None if rec.repeat_consumption else _Before(rec.history, rec)
        scorer = self._block_scorer(rec)
        if fit_now:
            self._temperature(rec, scorer, users[s.temp], labels[s.temp], exclude)
        if not math.isfinite(self.beta):
            self.beta = 1.0
        need_groups = p.group_conditional or "user_group" in p.strata
        groups = {k: (P.user_groups(rec, users[idx], self.attribute, exclude or _Before(rec.history, rec))
                      if need_groups else np.full(len(idx), "all")) for k, idx in (("cal", s.cal), ("test", s.test))}
        fdr_cal = FdrAccumulator(p.fdr) if p.fdr is not None else None
        cal = self._calibration_pass(rec, scorer, users[s.cal], labels[s.cal], exclude, fdr_cal)
        current = self.calib.current(cal, groups["cal"], rec.step)
        rows, errors, fdr_test = self._test_pass(rec, scorer, users[s.test], labels[s.test], exclude, current,
                                                 groups["test"])
        if fdr_cal is not None:
            chosen = fdr_cal.choose()
            rows += self.fdr.rows(fdr_test, chosen, list(p.calibration))
            self.fdr.update(chosen)
        self.calib.update(current, errors)
        for q in self.queries:
            if q.aci:
                rows.append(("conformal_err_running", q.label, self.calib.aci_rows(q)[1]))
        self.measured += 1
        return rows

    def _calibration_pass(self, rec, scorer, users, labels, exclude, fdr) -> dict[str, np.ndarray]:
        p = self.params
        u = P.draws(self.seed, rec.step, len(users), "cal")
        p_y, above = np.zeros(len(users)), np.zeros(len(users))
        for lo, hi, S in score_blocks(rec.engine, users, scorer, exclude):
            p_y[lo:hi], above[lo:hi], _, Z = block_stats(S, self.beta, labels[lo:hi], workers=rec.engine.workers)
            if fdr is not None:
                rows = np.arange(0, max(0, min(hi, p.fdr.users) - lo))
                fdr.add(S, Z, rows, users[lo:hi][rows], labels[lo:hi][rows], _truth(rec))
        return method_scores(p.methods, p_y, above, u)

    def _test_pass(self, rec, scorer, users, labels, exclude, current, groups):
        p = self.params
        n = len(users)
        u = P.draws(self.seed, rec.step, n, "test")
        Q = np.stack([self.calib.qhat(q, current, groups, rec.step) for q in self.queries], axis=1)
        modes = np.array([MODE_CODE[q.method] for q in self.queries], np.int64)
        p_y, above = np.zeros(n), np.zeros(n)
        sizes = np.zeros((n, len(self.queries)), np.int64)
        fdr = FdrAccumulator(p.fdr) if p.fdr is not None else None
        for lo, hi, S in score_blocks(rec.engine, users, scorer, exclude):
            p_y[lo:hi], above[lo:hi], sizes[lo:hi], Z = block_stats(
                S, self.beta, labels[lo:hi], Q[lo:hi], modes, u[lo:hi], workers=rec.engine.workers)
            if fdr is not None:
                rows = np.arange(0, max(0, min(hi, p.fdr.users) - lo))
                fdr.add(S, Z, rows, users[lo:hi][rows], labels[lo:hi][rows], _truth(rec))
        scores = method_scores(p.methods, p_y, above, u)
        strata = self._strata(rec, labels, groups)
        rows, errors = [], {}
        n_cal = {m: len(v) for m, v in current["scores"].items()}
        for k, q in enumerate(self.queries):
            covered = scores[q.method] <= Q[:, k]
            cuts = {"size": P.size_stratum(sizes[:, k])} if "set_size" in p.strata else {}
            rows += _rows(q, covered, sizes[:, k], {**cuts, **strata})
            if not q.mondrian:
                rows.append(("conformal_qhat", q.label, float(Q[0, k])))
            rows += [("conformal_n_calib", q.label, float(self._n_calib(q, n_cal))),
                     ("conformal_n_test", q.label, float(n))]
            if q.aci:
                rows.append(("conformal_alpha_t", q.label, self.calib.level(q)))
                errors[q.key] = 1.0 - float(covered.mean())
        return rows, errors, fdr

    def _n_calib(self, q: Query, n_cur: dict[str, int]) -> int:
        st = self.calib
        src = {"frozen": st.first, "weighted": st.hist}.get(q.calib, st.prev)
        return len(src["groups"]) if src is not None else n_cur[q.method]

    def _strata(self, rec, labels, groups) -> dict[str, np.ndarray]:
        p = self.params
        out = {}
        if "popularity" in p.strata:
            out["pop"] = P.popularity_stratum(rec, labels)
        if "user_group" in p.strata:
            out["user"] = groups
        return out

    # -- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "beta": float(self.beta), "fits": self.fits, "measured": self.measured,
                "scorer_fitted": self.scorer_fitted, "attribute": self.attribute,
                "calib": self.calib.state_dict(), "fdr": self.fdr.state_dict(),
                "scorer": self.scorer.state_dict() if self.scorer is not None and self.scorer_fitted else None}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.beta, self.fits = int(state["seed"]), float(state["beta"]), int(state["fits"])
        self.measured, self.scorer_fitted = int(state["measured"]), bool(state["scorer_fitted"])
        self.attribute = state["attribute"]
        self.calib.load_state_dict(state["calib"])
        self.fdr.load_state_dict(state["fdr"])
        if self.scorer is not None and state["scorer"] is not None:
            self.scorer.load_state_dict(state["scorer"])


def _truth(rec):
    return rec.truth_at_serve if rec.truth_at_serve is not None else rec.world


def _initial_beta(blocks) -> float:
    """A starting β: the inverse of the mean per-row standard deviation of the first block's finite scores."""
    for _, _, S in blocks:
        S = np.where(np.isfinite(S), S, np.nan)
        sd = float(np.nanmean(np.nanstd(S, axis=1)))
        return 1.0 / sd if sd > 0 and math.isfinite(sd) else 1.0
    return 1.0


def _rows(q: Query, covered: np.ndarray, sizes: np.ndarray, strata: dict[str, np.ndarray]) -> list:
    """Coverage, gap and set sizes of one query, overall and per stratum."""
    target = 1.0 - q.alpha
    g = q.label
    rows = [("conformal_coverage", g, float(covered.mean())), ("conformal_gap", g, float(covered.mean()) - target),
            ("conformal_set_size_mean", g, float(sizes.mean())),
            ("conformal_set_size_median", g, float(np.median(sizes)))]
    for kind, labels in strata.items():
        for s in np.unique(labels):
            m = labels == s
            cov = float(covered[m].mean())
            sg = f"{g},stratum={kind}:{s}"
            rows += [("conformal_coverage", sg, cov), ("conformal_gap", sg, cov - target),
                     ("conformal_set_size_mean", sg, float(sizes[m].mean()))]
    return rows
