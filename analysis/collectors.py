"""Per-cycle metric components (registered as ``metric``), computed from one cycle's feedback.

Each component documents the metric names it emits in ``METRICS`` (shown by ``recloop list``) and
returns rows ``(metric, group, value)``; the run store adds policy, seed and step. Components that
need pairs or user histories work on fixed samples drawn once per run (``metrics.pairs``,
``metrics.user_sample``), so their cost does not grow with the population.

This module holds the base class, the suite that runs the components, and the exposure-side
components (exposure, consumption, popularity bias, fairness, provenance); the user-side components
(calibration, diversity, homogenization, polarization, drift, utility) are in
:mod:`recloop.analysis.user_collectors`.
"""

from __future__ import annotations

import numpy as np

from recloop import registry
from recloop.analysis import metric_kernels as MK
from recloop.analysis import metrics as M
from recloop.component import Component
from recloop.contracts import PROVENANCE_NAMES, CycleRecord
from recloop.registry import Params, register

Row = tuple[str, str, float]


class MetricComponent(Component):
    """Base class: ``compute(record) -> rows`` from one :class:`~recloop.contracts.CycleRecord`.

    Metrics are the analyst: bound with a view that grants ground truth (``context.view.truth``), and
    given the run's metric settings (``metrics:`` block) in :meth:`setup`. State is checkpointed."""

    METRICS: dict[str, str] = {}
    default = True
    uses_ground_truth = True

    class Params(Params):
        pass

    def on_bind(self, context) -> None:
        cfg = getattr(context.scenario, "metrics", None)
        self.setup(context.view.truth, context.seed, cfg if cfg is not None else MetricSettings())

    def setup(self, world, seed: int, config) -> None:
        """Draw fixed samples once per run (``config``: the scenario's ``metrics:`` settings)."""

    def compute(self, record: CycleRecord) -> list[Row]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("params", "context")}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


class MetricSettings:
    """The suite-wide sample sizes when a metric is bound outside a scenario (tests, notebooks)."""

    pairs = 800
    user_sample = 2000
    regret_sample = 1000


def _f(x) -> float:
    return float(x) if x is not None else float("nan")



@register("metric", "exposure")
class Exposure(MetricComponent):
    """M-GINI, M-COV, M-ENT on exposure (slates), per cycle and cumulative.

    ``coverage_cum`` (M-COV, cumulative union over τ ≤ t) is |items ever shown| / |current catalog|:
    the denominator is the catalog size *now*, so the value falls when new items arrive faster than
    they are shown (creators publishing), even though no shown item is ever forgotten."""

    METRICS = {
        "gini_exposure": "M-GINI of item exposure counts this cycle (all items, zeros included)",
        "gini_exposure_cum": "M-GINI of cumulative exposure since the start",
        "coverage": "M-COV: share of the catalog shown to anyone this cycle",
        "coverage_cum": "M-COV cumulative coverage (share of current catalog): items ever shown ÷ current "
                        "catalog size; falls when the catalog grows faster than new items are shown",
        "exposure_entropy": "M-ENT: Shannon entropy (nats) of exposure shares this cycle",
    }

    def setup(self, world, seed, config):
        self.cum = np.zeros(world.items.n, np.float64)

    def compute(self, rec):
        n = rec.world.items.n
        e = rec.exposure
        if len(self.cum) < n:
            self.cum = np.concatenate([self.cum, np.zeros(n - len(self.cum))])
        self.cum += e
        return [
            ("gini_exposure", "", M.gini(e)),
            ("gini_exposure_cum", "", M.gini(self.cum)),
            ("coverage", "", float(np.count_nonzero(e)) / n if n > 0 else float("nan")),
            ("coverage_cum", "", float(np.count_nonzero(self.cum)) / n),
            ("exposure_entropy", "", M.entropy(e)),
        ]


@register("metric", "consumption")
class Consumption(MetricComponent):
    """M-GINI on consumption (chosen items), per cycle and cumulative."""

    METRICS = {
        "gini_consumption": "M-GINI of item consumption counts this cycle",
        "gini_consumption_cum": "M-GINI of cumulative consumption",
    }

    def setup(self, world, seed, config):
        self.cum = np.zeros(world.items.n, np.float64)

    def compute(self, rec):
        n = rec.world.items.n
        c = np.bincount(rec.chosen_item[rec.chosen_item >= 0], minlength=n).astype(np.float64)
        if len(self.cum) < n:
            self.cum = np.concatenate([self.cum, np.zeros(n - len(self.cum))])
        self.cum += c
        return [("gini_consumption", "", M.gini(c)), ("gini_consumption_cum", "", M.gini(self.cum))]


@register("metric", "popularity_bias")
class PopularityBias(MetricComponent):
    """M-ARP, M-APLT/ACLT (Elliot head, pop_ratio 0.8), M-POPLIFT (ΔGAP by user group), M-NOV."""

    METRICS = {
        "arp": "M-ARP: mean popularity φ of recommended items",
        "aplt": "M-APLT: mean share of long-tail items per slate",
        "aclt": "M-ACLT: mean count of long-tail items per slate",
        "pop_lift": "M-POPLIFT ΔGAP (GAP_r−GAP_p)/GAP_p; group all|niche|diverse|blockbuster (sampled users)",
        "mean_pop_consumed": "M-POPLIFT companion: mean φ of items consumed this cycle (Mansoury 2020)",
        "novelty": "M-NOV: mean self-information −log2(φ/n_users) of recommended items (bits)",
    }

    def compute(self, rec):
        w = rec.world
        pop = np.zeros(w.items.n)
        popularity = rec.popularity_before
        pop[: len(popularity)] = popularity[: w.items.n]
        head = M.short_head_mask(pop)
        e, full = rec.exposure, rec.full_slates
        n_u, k = rec.slates.shape
        if full and n_u > 0 and k > 0:
            # every slate holds k items: the per-user means average to item sums weighted by exposure
            # (the same values as M.arp/aplt/aclt/novelty, from one bincount instead of n x k gathers)
            tail = e @ (~head)
            nov = -np.log2(np.maximum(pop, 1.0) / max(w.users.n, 1))
            rows = [("arp", "", float(e @ pop) / (n_u * k)), ("aplt", "", float(tail) / (n_u * k)),
                    ("aclt", "", float(tail) / n_u), ("novelty", "", float(e @ nov) / (n_u * k))]
        else:
            rows = [
                ("arp", "", M.arp(rec.slates, pop)),
                ("aplt", "", M.aplt(rec.slates, head)),
                ("aclt", "", M.aclt(rec.slates, head)),
                ("novelty", "", M.novelty(rec.slates, pop, max(w.users.n, 1))),
            ]
        ch = rec.chosen_item[rec.chosen_item >= 0]
        rows.append(("mean_pop_consumed", "", float(pop[ch].mean()) if len(ch) else float("nan")))
        sample = rec.user_sample
        if len(sample):
            idx = np.searchsorted(rec.users, sample)
            indptr, items = rec.history.csr(sample)
            lens = np.diff(indptr)
            has = lens > 0
            sum_pop, sum_head = _history_sums(indptr, items, pop, head)
            prof_pop = sum_pop / np.maximum(lens, 1)
            prof_head = sum_head / np.maximum(lens, 1)
            if full and k > 0:  # M.per_user_mean without its checks: every slot holds an item
                rec_pop = pop[rec.slates[idx]].sum(axis=1) / k
            else:
                rec_pop = M.per_user_mean(rec.slates[idx], pop)
            ok = has & np.isfinite(rec_pop)
            if ok.sum() >= 5:
                rows.append(("pop_lift", "all", M.popularity_lift(prof_pop[ok], rec_pop[ok])))
                groups = M.user_popularity_groups(prof_head[ok])
                for g, name in enumerate(("niche", "diverse", "blockbuster")):
                    sel = groups == g
                    if sel.any():
                        rows.append(("pop_lift", name, M.popularity_lift(prof_pop[ok][sel], rec_pop[ok][sel])))
        return rows


def _history_sums(indptr, items, pop, head) -> tuple[np.ndarray, np.ndarray]:
    """Per history row: the sum of its items' popularity and its count of short-head items."""
    n = len(indptr) - 1
    if MK.HAVE_NUMBA:
        ptr = np.asarray(indptr, np.int64)
        return (MK.csr_row_sums(ptr, items, pop, np.empty(n)),
                MK.csr_row_sums(ptr, items, head.astype(np.float64), np.empty(n)))
    owner = np.repeat(np.arange(n), np.diff(indptr))
    return (np.bincount(owner, weights=pop[items], minlength=n),
            np.bincount(owner, weights=head[items].astype(float), minlength=n))


@register("metric", "fairness")
class Fairness(MetricComponent):
    """M-EXPFAIR: position-weighted exposure of the protected item group (items.group == 1) vs the rest."""

    METRICS = {
        "exposure_dpr": "M-EXPFAIR demographic-parity ratio Exp(G1)/Exp(G0) (1 = parity)",
        "exposure_share_gap": "M-EXPFAIR exposure share of G1 minus its catalog share",
    }

    def compute(self, rec):
        w = rec.world
        r = M.exposure_fairness(rec.slates, w.items.group[: w.items.n], w.items.n)
        return [("exposure_dpr", "", _f(r["dpr"])), ("exposure_share_gap", "", _f(r["share_gap"]))]


@register("metric", "provenance")
class Provenance(MetricComponent):
    """Share of the training log by provenance (organic, recommended, llm_augmented)."""

    METRICS = {"log_share": "share of the training log by provenance; group provenance=<name>"}

    def compute(self, rec):
        shares = rec.provenance_shares
        return [("log_share", f"provenance={PROVENANCE_NAMES[i]}", float(s)) for i, s in enumerate(shares)]


def metric_docs() -> dict[str, str]:
    """Every metric name any registered component can emit, with its documentation."""
    out = {}
    for spec in registry.specs("metric"):
        out.update(getattr(spec.cls, "METRICS", {}))
    return out
