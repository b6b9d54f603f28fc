"""FDR-controlled recommendation sets inside the ``conformal`` metric (reference C-FDR; Angelopoulos et al.
2023, Learn-then-Test): S_λ(u) = {i : p̂(i | u) ≥ λ} on a geometric grid of λ from 1 (strict) down to
``lambda_min`` (loose); the loss is the false-discovery proportion of the set, a *bad* item being one
whose true utility (the analyst's view, at serve time) lies outside the user's top ``good_share`` of the
catalog. λ̂ is chosen by fixed-sequence testing with Hoeffding or Hoeffding–Bentkus p-values
(:mod:`recloop.sim.conformal_ltt`), the loosest valid λ or, with ``diverse``, the valid λ whose sets
have the largest intra-list diversity (M-ILD on the true item attributes).

Calibration follows the metric's modes: ``frozen`` keeps the first cycle's λ̂; every other mode uses the
λ̂ of the previous measured cycle (``recal``). No labels are needed; the labels only give the sets'
coverage, reported beside the FDR.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from recloop.registry import Params
from recloop.sim.conformal_ltt import fdp_losses, ltt_calibrate, mean_ild, select_lambda

__all__ = ["FdrAccumulator", "FdrConfig", "FdrState"]

Level = Annotated[float, Field(gt=0.0, lt=1.0)]


class FdrConfig(Params):
    """C-FDR sets calibrated by Learn-then-Test."""

    alphas: list[Level] = Field(default_factory=lambda: [0.2], min_length=1, description="FDR levels α_FDR")
    delta: Level = Field(0.1, description="LTT error probability δ: P(R(λ̂) ≤ α) ≥ 1 − δ")
    pvalues: list[Literal["hoeffding", "hb"]] = Field(
        default_factory=lambda: ["hb"], min_length=1, description="Hoeffding and/or Hoeffding–Bentkus p-values")
    good_share: Level = Field(0.1, description="an item is good for a user when its true utility is in the user's "
                                              "top share of the catalog; bad otherwise")
    grid: Annotated[int, Field(ge=2, le=200)] = Field(30, description="λ values, geometric from 1 to lambda_min")
    lambda_min: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(1e-6, description="the loosest λ (a probability)")
    users: Annotated[int, Field(ge=2, le=100_000)] = Field(
        200, description="calibration and test users for FDR (the first of each sample)")
    diverse: bool = Field(False, description="also choose, among valid λ, the most diverse one (M-ILD)")

    def lambdas(self) -> np.ndarray:
        return np.geomspace(1.0, self.lambda_min, self.grid)

    def keys(self) -> list[tuple[str, float, str, bool]]:
        """(key, α, p-value, diverse) of every FDR variant."""
        out = []
        for a in self.alphas:
            for pv in self.pvalues:
                for div in ([False, True] if self.diverse else [False]):
                    out.append((f"{pv}{'_diverse' if div else ''}|{a!r}", a, pv, div))
        return out


class FdrAccumulator:
    """Per-user FDP, set size and label coverage on the λ grid, gathered block by block."""

    def __init__(self, cfg: FdrConfig):
        self.cfg = cfg
        self.lams = cfg.lambdas()
        self.losses, self.sizes, self.covered = [], [], []
        g = len(self.lams)
        self.ild_total, self.ild_count = np.zeros(g), np.zeros(g)

    def add(self, E: np.ndarray, Z: np.ndarray, rows: np.ndarray, users: np.ndarray, labels: np.ndarray,
            world) -> None:
        """Rows ``rows`` of a softmax block (E, Z) for ``users`` with their ``labels``; ``world``: the truth."""
        if not len(rows):
            return
        P = E[rows].astype(np.float64) / np.where(Z[rows] > 0, Z[rows], 1.0)[:, None]
        n = P.shape[1]
        V = np.asarray(world.users.prefs[users], np.float32) @ np.asarray(world.items.attrs[:n], np.float32).T
        good = max(1, int(np.ceil(self.cfg.good_share * n)))
        thr = np.partition(V, n - good, axis=1)[:, n - good]
        bad = V < thr[:, None]
        self.losses.append(fdp_losses(P, bad, self.lams))
        self.sizes.append(np.stack([(P >= lam).sum(axis=1) for lam in self.lams], axis=1))
        p_y = P[np.arange(len(rows)), labels]
        self.covered.append(p_y[:, None] >= self.lams[None, :])
        if self.cfg.diverse:
            t, c = mean_ild(P, world.items.attrs[:n], self.lams)
            self.ild_total += t
            self.ild_count += c

    def stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g = len(self.lams)
        if not self.losses:
            return np.zeros((0, g)), np.zeros((0, g)), np.zeros((0, g), bool)
        return np.concatenate(self.losses), np.concatenate(self.sizes), np.concatenate(self.covered)

    def choose(self) -> dict[str, int]:
        """λ̂ index per FDR variant from these (calibration) users; -1 when no λ is valid (empty sets)."""
        losses, _, _ = self.stacked()
        out = {}
        if not len(losses):
            return out
        ild = np.where(self.ild_count > 0, self.ild_total / np.maximum(self.ild_count, 1), np.nan)
        for key, a, pv, div in self.cfg.keys():
            valid = ltt_calibrate(losses, a, self.cfg.delta, pv)
            lam = select_lambda(self.lams, valid, ild if div else None)
            out[key] = int(np.flatnonzero(self.lams == lam)[0]) if np.isfinite(lam) else -1
        return out


class FdrState:
    """λ̂ indices kept across cycles: the first cycle's (frozen) and the previous cycle's (recal)."""

    def __init__(self):
        self.first: dict[str, int] | None = None
        self.prev: dict[str, int] | None = None

    def rows(self, test: FdrAccumulator, current: dict[str, int], calibs: list[str]) -> list[tuple[str, str, float]]:
        """Rows of the test users at this cycle's thresholds (``current``: this cycle's own choice, used when
        there is no past)."""
        losses, sizes, covered = test.stacked()
        if not len(losses):
            return []
        rows = []
        for calib in sorted({"frozen" if c == "frozen" else "recal" for c in calibs}):
            table = (self.first if calib == "frozen" else self.prev) or current
            for key, a, pv, div in test.cfg.keys():
                j = table.get(key, -1)
                fdp = losses[:, j] if j >= 0 else np.zeros(len(losses))
                size = sizes[:, j] if j >= 0 else np.zeros(len(losses))
                cov = covered[:, j] if j >= 0 else np.zeros(len(losses), bool)
                g = f"method=fdr_{pv}{'_diverse' if div else ''},calib={calib},alpha={a:g}"
                rows += [("conformal_fdr", g, float(fdp.mean())), ("conformal_coverage", g, float(cov.mean())),
                         ("conformal_set_size_mean", g, float(size.mean())),
                         ("conformal_set_size_median", g, float(np.median(size)))]
        return rows

    def update(self, current: dict[str, int]) -> None:
        if self.first is None:
            self.first = dict(current)
        self.prev = dict(current)

    def state_dict(self) -> dict:
        return {"first": self.first, "prev": self.prev}

    def load_state_dict(self, state: dict) -> None:
        self.first = None if state["first"] is None else {k: int(v) for k, v in state["first"].items()}
        self.prev = None if state["prev"] is None else {k: int(v) for k, v in state["prev"].items()}
