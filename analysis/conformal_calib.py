"""Calibration across the cycles of a loop for the ``conformal`` metric (reference C-SPLIT, C-EXCH, C-ACI):
which calibration scores make the threshold q̂ of cycle t, and the running state that carries them.

The threshold used on the test users of cycle t comes from calibration points observed *before* the
cycle's labels (the first measured cycle, which has no past, uses its own calibration users, disjoint
from its test users):

* ``frozen``: the first cycle's calibration scores, for ever (coverage decays when the loop moves);
* ``recal``: the previous measured cycle's (the freshest interactions; one point per user);
* ``weighted``: every kept past cycle's, weighted ρ^(t − t_i) (Barber et al. 2023), the test point
  weighing 1; cycles older than ``window`` are dropped (their weight is below ρ^window);
* ``aci`` / ``aci_decay``: the previous cycle's scores at the running level α_t, updated after the cycle
  with the batch error err_t = the test users' uncovered fraction (Gibbs & Candès 2021, fixed step γ;
  Angelopoulos, Barber & Bates 2024, decaying step γ·t^(−power)).

With ``mondrian`` a query's q̂ is computed per user group (Vovk et al. 2005): the ``<calib>_mondrian``
rows. Scores are stored as computed in their own cycle (that cycle's model and temperature): that the
model moved since is exactly what C-EXCH asks us to measure. Everything here is plain arrays and
numbers, so it checkpoints with the metric (a resumed run equals an uninterrupted one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recloop.sim.conformal import (
    ACIState,
    conformal_quantile,
    decay_weights,
    mondrian_qhat,
    mondrian_quantiles,
)

__all__ = ["MODE_CODE", "CalibrationState", "Query", "method_scores"]

#: how a method's set is built (the set-size kernel's modes)
MODE_CODE = {"lac": 0, "aps": 1, "aps_rand": 2}


def method_scores(methods, p_y: np.ndarray, above: np.ndarray, u: np.ndarray) -> dict[str, np.ndarray]:
    """Nonconformity of each labelled point (C-SPLIT): LAC 1 − p̂_y; APS mass above y + p̂_y; randomised
    APS mass above y + u·p̂_y."""
    table = {"lac": lambda: 1.0 - p_y, "aps": lambda: above + p_y, "aps_rand": lambda: above + u * p_y}
    return {m: table[m]() for m in methods}


@dataclass(frozen=True)
class Query:
    """One (method, calibration, α) combination: one group of rows."""

    method: str
    calib: str  # frozen | recal | weighted | aci | aci_decay
    alpha: float
    mondrian: bool = False

    @property
    def label(self) -> str:
        calib = f"{self.calib}_mondrian" if self.mondrian else self.calib
        return f"method={self.method},calib={calib},alpha={self.alpha:g}"

    @property
    def aci(self) -> bool:
        return self.calib in ("aci", "aci_decay")

    @property
    def key(self) -> str:
        return f"{self.method}|{self.alpha!r}|{self.calib}"


def _points(scores: dict[str, np.ndarray], groups: np.ndarray, step: int) -> dict:
    return {"scores": {m: np.asarray(s, np.float64) for m, s in scores.items()},
            "groups": np.asarray(groups).astype(str), "steps": np.full(len(groups), step, np.int64)}


class CalibrationState:
    """The calibration points kept across cycles and the ACI levels (see the module docstring)."""

    def __init__(self, rho: float = 0.9, window: int = 50, gamma: float = 0.05, power: float = 0.6):
        self.rho, self.window, self.gamma, self.power = float(rho), int(window), float(gamma), float(power)
        self.first: dict | None = None
        self.prev: dict | None = None
        self.hist: dict | None = None
        self.aci: dict[str, dict] = {}

    # -- thresholds --------------------------------------------------------------------------------
    def level(self, q: Query) -> float:
        """The level q̂ is taken at: α, or ACI's running α_t."""
        return self._aci(q).alpha_t if q.aci else q.alpha

    def _aci(self, q: Query) -> ACIState:
        s = self.aci.get(q.key)
        return ACIState(q.alpha, self.gamma, q.calib == "aci_decay", self.power, **s) if s else \
            ACIState(q.alpha, self.gamma, q.calib == "aci_decay", self.power)

    def _source(self, q: Query, current: dict, step: int) -> tuple[dict, np.ndarray | None]:
        """(points, weights) the query's q̂ is computed from at cycle ``step``."""
        if q.calib == "frozen":
            return self.first or current, None
        if q.calib == "weighted":
            if self.hist is None:
                return current, None
            return self.hist, decay_weights(self.hist["steps"], step, self.rho)
        return self.prev or current, None

    def qhat(self, q: Query, current: dict, test_groups: np.ndarray, step: int) -> np.ndarray:
        """q̂ per test point (one value unless Mondrian) for the query at cycle ``step``."""
        pts, w = self._source(q, current, step)
        s = pts["scores"][q.method]
        level = self.level(q)
        if q.mondrian:
            table = mondrian_quantiles(s, pts["groups"], level, w)
            return mondrian_qhat(table, np.asarray(test_groups).astype(str))
        return np.full(len(test_groups), conformal_quantile(s, level, w))

    def current(self, scores: dict[str, np.ndarray], groups: np.ndarray, step: int) -> dict:
        """This cycle's calibration points in the stored form."""
        return _points(scores, groups, step)

    # -- after the cycle ---------------------------------------------------------------------------
    def update(self, current: dict, errors: dict[str, float]) -> None:
        """Keep this cycle's points (first, previous, weighted history) and step ACI with ``errors``
        (query key → the test users' uncovered fraction)."""
        if self.first is None:
            self.first = current
        self.prev = current
        self.hist = current if self.hist is None else self._append(self.hist, current)
        for key, err in errors.items():
            method, alpha, calib = key.split("|")
            q = Query(method, calib, float(alpha))
            st = self._aci(q)
            st.step(err)
            self.aci[key] = {"alpha_t": st.alpha_t, "alpha1": st.alpha1, "t": st.t, "err_sum": st.err_sum}

    def _append(self, hist: dict, cur: dict) -> dict:
        step = int(cur["steps"].max(initial=int(hist["steps"].max(initial=0))))
        keep = hist["steps"] > step - self.window
        return {"scores": {m: np.concatenate([hist["scores"][m][keep], s]) for m, s in cur["scores"].items()},
                "groups": np.concatenate([hist["groups"][keep], cur["groups"]]),
                "steps": np.concatenate([hist["steps"][keep], cur["steps"]])}

    def aci_rows(self, q: Query) -> tuple[float, float]:
        """(α_t to be used next, running error) of an ACI query."""
        st = self._aci(q)
        return st.alpha_t, st.err_running

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"first": self.first, "prev": self.prev, "hist": self.hist,
                "aci": {k: dict(v) for k, v in self.aci.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.first, self.prev, self.hist = state["first"], state["prev"], state["hist"]
        self.aci = {k: {n: (int(x) if n == "t" else float(x)) for n, x in v.items()} for k, v in state["aci"].items()}
