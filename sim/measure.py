"""The measure phase: the run's metric components, the fixed samples they share, and the rows they
return for each :class:`~recloop.contracts.CycleRecord`.

Metric components are built by name from the registry (``metrics.include``: ids or ``{type: id,
...params}`` blocks), bound with the analyst's context (ground truth granted), and never see the model.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from recloop import registry
from recloop.contracts import BuildContext, CycleRecord
from recloop.rng import component_rng
from recloop.sim.pool import blas_single_thread

Row = tuple[str, str, float]


def metric_entries(config) -> list[dict]:
    """The metric blocks a ``metrics:`` config selects: ``include`` (ids or blocks; default every
    component marked ``default``) minus ``exclude`` (ids)."""
    include = config.include if config.include is not None else [
        s.name for s in registry.specs("metric") if getattr(s.cls, "default", True)]
    entries = [dict(e) if isinstance(e, dict) else {"type": e} for e in include]
    drop = set(config.exclude)
    return [e for e in entries if e["type"] not in drop]


class MetricSuite:
    """The metric components of a run, with the fixed user sample they share."""

    def __init__(self, config, context: BuildContext):
        self.config = config
        self.components = [registry.build("metric", e, context) for e in metric_entries(config)]
        n = context.view.truth.users.n
        rng = component_rng(context.seed, "metric.users")
        self.sample = np.sort(rng.choice(n, size=min(n, config.user_sample), replace=False)).astype(np.int64)

    def serve_time_truth(self, world, measured: bool):
        """The world as the users' tastes were when the slates were served — a copy of the preferences,
        taken before the advance phase moves them — when a metric asks for it (``needs_serve_time_truth``)
        and the cycle is measured; else None."""
        if not measured or not any(getattr(c, "needs_serve_time_truth", False) for c in self.components):
            return None
        return dataclasses.replace(world, users=dataclasses.replace(world.users, prefs=world.users.prefs.copy()))

    def user_sample(self, active: np.ndarray) -> np.ndarray:
        """The fixed user sample, restricted to users active this cycle (``active`` is sorted)."""
        if not len(self.sample) or not len(active):
            return self.sample[:0]
        here = np.zeros(max(int(self.sample.max()), int(active.max())) + 1, bool)  # a mask of ids: no sort
        here[active] = True
        return self.sample[here[self.sample]]

    def measure(self, record: CycleRecord) -> list[Row]:
        rows: list[Row] = []
        self.tables = {}
        with blas_single_thread():  # metric products are small: one BLAS thread is faster
            for c in self.components:
                rows.extend((m, g, float(v)) for m, g, v in c.compute(record))
                table = getattr(c, "cycle_table", None)
                if callable(table):
                    self.tables.update(table() or {})
        return rows

    def take_tables(self) -> dict[str, dict[str, np.ndarray]]:
        """Per-cycle tables the components left in the last measured cycle (e.g. the homogenization
        metric's ``similar_pairs``), handed over once: the run store writes them."""
        tables, self.tables = getattr(self, "tables", {}), {}
        return tables

    def state_dict(self) -> dict:
        return {"components": [c.state_dict() for c in self.components]}

    def load_state_dict(self, state: dict) -> None:
        for c, s in zip(self.components, state["components"]):
            c.load_state_dict(s)
