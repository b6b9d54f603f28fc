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
from recloop.analysis import metrics as M
from recloop.registry import Params, register
from recloop.sim.rng import component_rng

Row = tuple[str, str, float]


class MetricComponent:
    """Base class: ``compute(model, feedback, popularity) -> rows``; state is checkpointed."""

    METRICS: dict[str, str] = {}
    default = True

    class Params(Params):
        pass

    def __init__(self, params=None, **context):
        self.params = params if params is not None else type(self).Params()

    def setup(self, world, seed: int, suite: MetricSuite) -> None:
        pass

    def compute(self, model, fb, popularity: np.ndarray) -> list[Row]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "params"}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def _f(x) -> float:
    return float(x) if x is not None else float("nan")



def _slate_exposure(model, fb, n_items: int) -> tuple[np.ndarray, bool]:
    """This cycle's exposure count per item (M.exposure_counts) and whether every slate is full,
    computed once per cycle and shared by the slate metrics."""
    suite = getattr(model, "metrics", None)
    cache = getattr(suite, "_cycle", None)
    if cache is not None and cache.get("fb") is fb and cache.get("n") == n_items:
        return cache["e"], cache["full"]
    valid = fb.slates >= 0
    full = bool(valid.all())
    if full and fb.slates.size and int(fb.slates.max()) >= n_items:
        raise ValueError(f"slate contains item id {int(fb.slates.max())} >= n_items={n_items}")
    if full:
        e = np.bincount(fb.slates.ravel(), minlength=n_items).astype(float)
    else:
        e = M.exposure_counts(fb.slates, n_items)
    if cache is not None:
        suite._cycle = {"fb": fb, "n": n_items, "e": e, "full": full}
    return e, full


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

    def setup(self, world, seed, suite):
        self.cum = np.zeros(world.items.n, np.float64)

    def compute(self, model, fb, popularity):
        n = model.world.items.n
        e, _ = _slate_exposure(model, fb, n)
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

    def setup(self, world, seed, suite):
        self.cum = np.zeros(world.items.n, np.float64)

    def compute(self, model, fb, popularity):
        n = model.world.items.n
        c = np.bincount(fb.chosen_item[fb.chosen_item >= 0], minlength=n).astype(np.float64)
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

    def setup(self, world, seed, suite):
        self.suite = None

    def compute(self, model, fb, popularity):
        w = model.world
        pop = np.zeros(w.items.n)
        pop[: len(popularity)] = popularity[: w.items.n]
        head = M.short_head_mask(pop)
        e, full = _slate_exposure(model, fb, w.items.n)
        n_u, k = fb.slates.shape
        if full and n_u > 0 and k > 0:
            # every slate holds k items: the per-user means average to item sums weighted by exposure
            # (the same values as M.arp/aplt/aclt/novelty, from one bincount instead of n x k gathers)
            tail = e @ (~head)
            nov = -np.log2(np.maximum(pop, 1.0) / max(w.users.n, 1))
            rows = [("arp", "", float(e @ pop) / (n_u * k)), ("aplt", "", float(tail) / (n_u * k)),
                    ("aclt", "", float(tail) / n_u), ("novelty", "", float(e @ nov) / (n_u * k))]
        else:
            rows = [
                ("arp", "", M.arp(fb.slates, pop)),
                ("aplt", "", M.aplt(fb.slates, head)),
                ("aclt", "", M.aclt(fb.slates, head)),
                ("novelty", "", M.novelty(fb.slates, pop, max(w.users.n, 1))),
            ]
        ch = fb.chosen_item[fb.chosen_item >= 0]
        rows.append(("mean_pop_consumed", "", float(pop[ch].mean()) if len(ch) else float("nan")))
        sample = model.metrics.user_sample(fb.users)
        if len(sample):
            idx = np.searchsorted(fb.users, sample)
            indptr, items = model.history.csr(sample)
            lens = np.diff(indptr)
            has = lens > 0
            owner = np.repeat(np.arange(len(sample)), lens)
            prof_pop = np.bincount(owner, weights=pop[items], minlength=len(sample)) / np.maximum(lens, 1)
            prof_head = np.bincount(owner, weights=head[items].astype(float), minlength=len(sample))
            prof_head = prof_head / np.maximum(lens, 1)
            rec_pop = M.per_user_mean(fb.slates[idx], pop)
            ok = has & np.isfinite(rec_pop)
            if ok.sum() >= 5:
                rows.append(("pop_lift", "all", M.popularity_lift(prof_pop[ok], rec_pop[ok])))
                groups = M.user_popularity_groups(prof_head[ok])
                for g, name in enumerate(("niche", "diverse", "blockbuster")):
                    sel = groups == g
                    if sel.any():
                        rows.append(("pop_lift", name, M.popularity_lift(prof_pop[ok][sel], rec_pop[ok][sel])))
        return rows


@register("metric", "fairness")
class Fairness(MetricComponent):
    """M-EXPFAIR: position-weighted exposure of the protected item group (items.group == 1) vs the rest."""

    METRICS = {
        "exposure_dpr": "M-EXPFAIR demographic-parity ratio Exp(G1)/Exp(G0) (1 = parity)",
        "exposure_share_gap": "M-EXPFAIR exposure share of G1 minus its catalog share",
    }

    def compute(self, model, fb, popularity):
        w = model.world
        r = M.exposure_fairness(fb.slates, w.items.group[: w.items.n], w.items.n)
        return [("exposure_dpr", "", _f(r["dpr"])), ("exposure_share_gap", "", _f(r["share_gap"]))]


@register("metric", "provenance")
class Provenance(MetricComponent):
    """Share of the training log by provenance (organic, recommended, llm_augmented)."""

    METRICS = {"log_share": "share of the training log by provenance; group provenance=<name>"}

    def compute(self, model, fb, popularity):
        from recloop.recommenders.base import PROVENANCE_NAMES

        shares = model.log.provenance_shares()
        return [("log_share", f"provenance={PROVENANCE_NAMES[i]}", float(s)) for i, s in enumerate(shares)]


class MetricSuite:
    """The metric components of a run, with the fixed samples they share."""

    def __init__(self, config, *, seed: int, world, k: int):
        self.config = config
        self.seed = seed
        names = config.include if config.include is not None else [
            s.name for s in registry.specs("metric") if getattr(s.cls, "default", True)]
        names = [n for n in names if n not in set(config.exclude)]
        self.components = [registry.build("metric", {"type": n}) for n in names]
        rng = component_rng(seed, "metric.users")
        n = world.users.n
        self._sample = np.sort(rng.choice(n, size=min(n, config.user_sample), replace=False)).astype(np.int64)
        for c in self.components:
            c.setup(world, seed, self)

    def user_sample(self, active: np.ndarray) -> np.ndarray:
        """The fixed user sample, restricted to users active this cycle (``active`` is sorted)."""
        return self._sample[np.isin(self._sample, active, assume_unique=True)]

    def compute(self, model, fb, popularity) -> list[Row]:
        from recloop.sim.pool import blas_single_thread

        rows: list[Row] = []
        self._cycle = {}  # per-cycle shared intermediates (exposure counts); dropped afterwards
        try:
            with blas_single_thread():  # metric products are small: one BLAS thread is faster
                for c in self.components:
                    rows.extend((m, g, float(v)) for m, g, v in c.compute(model, fb, popularity))
        finally:
            self._cycle = None
        return rows

    def state_dict(self) -> dict:
        return {"components": [c.state_dict() for c in self.components]}

    def load_state_dict(self, state: dict, world) -> None:
        for c, s in zip(self.components, state["components"]):
            c.load_state_dict(s)


def metric_docs() -> dict[str, str]:
    """Every metric name any registered component can emit, with its documentation."""
    out = {}
    for spec in registry.specs("metric"):
        out.update(getattr(spec.cls, "METRICS", {}))
    return out
