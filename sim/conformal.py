"""Conformal prediction as pure numpy functions (reference C-SPLIT, C-EXCH, C-ACI).

Everything here works on probability rows given one chunk at a time (``probs`` is ``(rows, items)`` for one
chunk of users, never the users × items matrix), on calibration scores, and on plain scalars. No model
access, no randomness of its own: randomised APS takes its uniform draws ``u`` explicitly, so callers draw
them from the run's seeded generators (``recloop.rng``). Both analysis metrics and recommender policies
import this module, which is why it lives in the sim layer.

Conventions:
- the conformal quantile is the ⌈(n+1)(1−α)⌉-th smallest score, +∞ when that rank exceeds n (full set)
  and −∞ when it is ≤ 0 (α ≥ 1: empty set), so ACI's α_t ≤ 0 / α_t ≥ 1 give full / empty sets (C-ACI);
- a set is ``{y : s(x, y) ≤ q̂}`` and is returned as a boolean mask over the chunk's items.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ACIState",
    "aci_bound",
    "aci_gamma",
    "aci_update",
    "conformal_quantile",
    "decay_weights",
    "mondrian_qhat",
    "mondrian_quantiles",
    "scores_aps",
    "scores_aps_all",
    "scores_lac",
    "set_stats",
    "sets_aps",
    "sets_lac",
]

_TOL = 1e-10  # guards ⌈(n+1)(1−α)⌉ against float noise such as 10 × 0.9 = 9.000000000000002


# --------------------------------------------------------------------------------------------- quantiles
def _rank(n: int, alpha: float) -> int:
    """⌈(n+1)(1−α)⌉, the 1-based rank of the split-conformal quantile (C-SPLIT)."""
    return math.ceil((n + 1) * (1.0 - alpha) - _TOL)


def conformal_quantile(scores, alpha: float, weights=None, test_weight: float = 1.0) -> float:
    """Split-conformal quantile q̂ of calibration ``scores`` at level 1 − ``alpha`` (C-SPLIT, C-EXCH).

    Unweighted: the ⌈(n+1)(1−α)⌉-th smallest score; +∞ if the rank exceeds n, −∞ if it is ≤ 0.
    Weighted (Tibshirani et al. 2019; Barber et al. 2023): the (1−α)-quantile of
    Σ_i w̃_i δ_{s_i} + w̃_{n+1} δ_{+∞} with w̃ = w / (Σ w + ``test_weight``), i.e. the smallest s with
    Σ_{s_i ≤ s} w̃_i ≥ 1 − α (+∞ if none). With all weights equal to ``test_weight`` this is the unweighted
    rule. For C-EXCH's recency weights pass ``decay_weights(t_i, t, rho)`` (the test point has weight 1).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    n = s.size
    if alpha >= 1.0:
        return -math.inf
    if weights is None:
        k = _rank(n, alpha)
        if k > n:
            return math.inf
        if k <= 0:
            return -math.inf
        return float(np.partition(s, k - 1)[k - 1])
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != s.shape or np.any(w < 0) or test_weight < 0:
        raise ValueError("weights must be non-negative and match scores")
    total = w.sum() + test_weight
    if total <= 0:
        return math.inf  # no mass at all: only the full set is valid
    order = np.argsort(s, kind="stable")
    cum = np.cumsum(w[order]) / total
    hit = np.nonzero(cum >= (1.0 - alpha) - _TOL)[0]
    return float(s[order[hit[0]]]) if hit.size else math.inf


def decay_weights(t_i, t: int, rho: float) -> np.ndarray:
    """C-EXCH recency weights ρ^(t − t_i) for calibration points observed in cycles ``t_i`` ≤ t."""
    age = t - np.asarray(t_i, dtype=np.float64)
    return np.power(float(rho), age)


def mondrian_quantiles(scores, groups, alpha: float, weights=None) -> dict[Hashable, float]:
    """Group-conditional (Mondrian) q̂ per group label: the split rule run separately in each group (C-SPLIT),
    which gives coverage ≥ 1 − α within every group (Vovk et al. 2005)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    g = np.asarray(groups).ravel()
    w = None if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    out: dict[Hashable, float] = {}
    for label in np.unique(g):
        sel = g == label
        key = label.item() if hasattr(label, "item") else label
        out[key] = conformal_quantile(s[sel], alpha, None if w is None else w[sel])
    return out


def mondrian_qhat(qhats: dict[Hashable, float], groups, default: float = math.inf) -> np.ndarray:
    """Per-row q̂ for test rows of the given groups; a group unseen at calibration gets ``default``
    (+∞, the full set: the only valid choice with zero calibration points)."""
    g = np.asarray(groups).ravel()
    out = np.full(g.size, default, dtype=np.float64)
    for label, q in qhats.items():
        out[g == label] = q
    return out


# ------------------------------------------------------------------------------------------------ scores
def scores_lac(p_true) -> np.ndarray:
    """LAC nonconformity 1 − p̂(y|x) from the true label's probability (C-SPLIT; Sadinle et al. 2019)."""
    return 1.0 - np.asarray(p_true, dtype=np.float64)


def scores_aps(probs_chunk, labels, u=None) -> np.ndarray:
    """APS nonconformity Σ_{i: p̂_i > p̂_y} p̂_i + u·p̂_y of each row's label (C-SPLIT; Romano et al. 2020).

    ``u`` = None means u = 1 (non-randomised: the mass up to and including y in descending order);
    ``aps_rand`` passes u ~ Unif(0, 1), one draw per row, from the caller's generator. Ties with p̂_y are
    not counted above y, so the score does not depend on an arbitrary sort order. O(rows × items).
    """
    p = np.asarray(probs_chunk, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    p_y = p[np.arange(p.shape[0]), y]
    above = np.where(p > p_y[:, None], p, 0.0).sum(axis=1)
    uu = 1.0 if u is None else np.asarray(u, dtype=np.float64)
    return above + uu * p_y


def scores_aps_all(probs_chunk, u=None) -> np.ndarray:
    """APS score of every item of every row, ``(rows, items)``; ``u`` one draw per row (None → 1).
    Sorting per row: O(rows × items log items), the C-SPLIT cost of an APS query."""
    p = np.asarray(probs_chunk, dtype=np.float64)
    rows, m = p.shape
    order = np.argsort(-p, axis=1, kind="stable")
    sp = np.take_along_axis(p, order, axis=1)
    excl = np.cumsum(sp, axis=1) - sp  # mass strictly before each position
    # tied items share the mass strictly above their common value: the exclusive sum at the tie's first slot
    start = np.ones_like(sp, dtype=bool)
    start[:, 1:] = sp[:, 1:] != sp[:, :-1]
    first = np.maximum.accumulate(np.where(start, np.arange(m)[None, :], 0), axis=1)
    above = np.take_along_axis(excl, first, axis=1)
    uu = np.ones((rows, 1)) if u is None else np.asarray(u, dtype=np.float64).reshape(rows, 1)
    out = np.empty_like(p)
    np.put_along_axis(out, order, above + uu * sp, axis=1)
    return out


# -------------------------------------------------------------------------------------------------- sets
def _qcol(qhat, rows: int) -> np.ndarray:
    """q̂ as a (rows, 1) column: a scalar, or one value per row (Mondrian)."""
    return np.broadcast_to(np.asarray(qhat, dtype=np.float64).reshape(-1, 1), (rows, 1))


def sets_lac(probs_chunk, qhat) -> np.ndarray:
    """LAC set mask {y : 1 − p̂_y ≤ q̂} for a chunk of rows (C-SPLIT); ``qhat`` scalar or one per row."""
    p = np.asarray(probs_chunk, dtype=np.float64)
    return (1.0 - p) <= _qcol(qhat, p.shape[0])


def sets_aps(probs_chunk, qhat, u=None) -> np.ndarray:
    """APS set mask {y : s_APS(x, y, u) ≤ q̂} for a chunk of rows (C-SPLIT); ``u`` one draw per row for
    ``aps_rand`` (the same u for every item of a row, Romano et al. 2020), None for non-randomised APS.
    The non-randomised set may be empty when q̂ < max p̂ (no 'include the last label' rule)."""
    p = np.asarray(probs_chunk, dtype=np.float64)
    return scores_aps_all(p, u) <= _qcol(qhat, p.shape[0])


def set_stats(mask, labels) -> tuple[np.ndarray, np.ndarray]:
    """(set sizes, covered flags 1[y ∈ C]) of a chunk's set mask and its true labels (C-SPLIT outputs)."""
    m = np.asarray(mask, dtype=bool)
    y = np.asarray(labels, dtype=np.int64)
    return m.sum(axis=1), m[np.arange(m.shape[0]), y]


# --------------------------------------------------------------------------------------------------- ACI
def aci_update(alpha_t: float, err: float, target_alpha: float, gamma: float) -> float:
    """One ACI step α_{t+1} = α_t + γ(α − err_t) (C-ACI; Gibbs & Candès 2021); ``err`` ∈ [0, 1] may be
    a batch's uncovered fraction."""
    return float(alpha_t + gamma * (target_alpha - err))


def aci_gamma(t: int, gamma: float, decay: bool = False, power: float = 0.6) -> float:
    """Step size at step t ≥ 1: fixed γ, or the decaying γ·t^(−power) (Angelopoulos, Barber & Bates 2024
    use η_t ∝ t^(−1/2−ε); power 0.6 is our default choice, ε = 0.1). Non-increasing in t."""
    if t < 1:
        raise ValueError("t starts at 1")
    return float(gamma) * (float(t) ** -power if decay else 1.0)


def aci_bound(T: int, alpha1: float, gamma: float, decay: bool = False, power: float = 0.6) -> float:
    """Deterministic bound on |(1/T)Σ err_t − α| after T ACI steps (C-ACI).

    Fixed step: (max(α₁, 1−α₁) + γ)/(γT) (Gibbs & Candès 2021, Prop. 4.1). Decaying (non-increasing γ_t):
    Abel summation of Σ(α_{t+1} − α_t)/γ_t with |α_t − α₁| ≤ B = max(α₁, 1−α₁) + γ₁ gives
    B(2/γ_T − 1/γ₁)/T, which equals the fixed-step bound when γ_t is constant. Both need full sets at
    α_t ≤ 0 (err = 0) and empty sets at α_t ≥ 1 (err = 1), which ``conformal_quantile`` provides.
    """
    g1 = aci_gamma(1, gamma, decay, power)
    gT = aci_gamma(T, gamma, decay, power)
    b = max(alpha1, 1.0 - alpha1) + g1
    return b * (2.0 / gT - 1.0 / g1) / T


@dataclass
class ACIState:
    """Running ACI state (C-ACI): the current level ``alpha_t``, steps taken and the error sum.

    ``step(err)`` applies the update with the fixed or decaying step; ``err_running`` is the long-run error
    rate (1/T)Σ err_t that ``aci_bound`` constrains. Plain floats, so it checkpoints as numbers.
    """

    target_alpha: float
    gamma: float
    decay: bool = False
    power: float = 0.6
    alpha_t: float = float("nan")
    alpha1: float = float("nan")
    t: int = 0
    err_sum: float = 0.0

    def __post_init__(self) -> None:
        if math.isnan(self.alpha_t):
            self.alpha_t = float(self.target_alpha)
        if math.isnan(self.alpha1):
            self.alpha1 = float(self.alpha_t)

    @property
    def err_running(self) -> float:
        """Mean error so far (nan before the first step)."""
        return self.err_sum / self.t if self.t else float("nan")

    def step(self, err: float) -> float:
        """Record err_t for the set built at the current α_t and move to α_{t+1}; returns α_{t+1}."""
        self.t += 1
        self.err_sum += float(err)
        g = aci_gamma(self.t, self.gamma, self.decay, self.power)
        self.alpha_t = aci_update(self.alpha_t, err, self.target_alpha, g)
        return self.alpha_t

    def bound(self) -> float:
        """The deterministic bound on |err_running − target| after the steps taken so far."""
        return aci_bound(max(self.t, 1), self.alpha1, self.gamma, self.decay, self.power)
