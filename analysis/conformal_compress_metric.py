"""Compact conformal subgraphs as trials of a run (metric ``conformal_compress``; reference C-COMPRESS,
GROUNDING §4.4–4.5): each measured cycle runs one trial of each task, method and coverage target φ
through :func:`recloop.analysis.conformal_compress.run_trial` and records the subgraph's size and its
coverage of fresh test outputs. The loop itself is a dummy (a tiny world): the cycles only number the
trials, so ``recloop run`` gives seeded, resumable trials with their rows in ``metrics.parquet``.

Every method and φ of a cycle draws its task from the same generator state (derived from the run seed
and the cycle), so the methods are compared on identical task draws (paired differences).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from recloop.analysis.collectors import MetricComponent
from recloop.analysis.conformal_compress import run_trial
from recloop.registry import Params, register
from recloop.rng import component_rng

__all__ = ["ConformalCompress"]


@register("metric", "conformal_compress")
class ConformalCompress(MetricComponent):
    """C-COMPRESS trials: the min-cut chain ('lp') against forward and reverse greedy, one trial per cycle,
    on the 6 × 6 grid navigation task and a session-structured recommendation task."""

    default = False
    example_params = {"tasks": ["grid"], "phis": [0.6], "methods": ["lp", "forward_greedy"]}
    METRICS = {
        "conformal_compress_size": "C-COMPRESS elements (edges, items) in the selected subgraph; group "
                                   "method=<lp|forward_greedy|reverse_greedy>,phi=<φ>,task=<grid|session>",
        "conformal_compress_coverage": "C-COMPRESS share of fresh test outputs the subgraph covers",
    }

    class Params(Params):
        tasks: list[Literal["grid", "session"]] = Field(default_factory=lambda: ["grid"], min_length=1)
        phis: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
            default_factory=lambda: [0.2, 0.4, 0.6, 0.8], min_length=1, description="coverage targets φ")
        methods: list[Literal["lp", "forward_greedy", "reverse_greedy"]] = Field(
            default_factory=lambda: ["lp", "forward_greedy", "reverse_greedy"], min_length=1)

    def setup(self, world, seed, config):
        self.seed = int(seed)

    def compute(self, rec):
        rows = []
        for task in self.params.tasks:
            for phi in self.params.phis:
                for method in self.params.methods:
                    rng = component_rng(self.seed, f"metric.conformal_compress.{task}", rec.step)
                    size, cov = run_trial(task, float(phi), method, rng)
                    g = f"method={method},phi={phi:g},task={task}"
                    rows += [("conformal_compress_size", g, float(size)),
                             ("conformal_compress_coverage", g, float(cov))]
        return rows
