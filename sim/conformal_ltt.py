"""Learn-then-Test FDR control for recommendation sets (reference C-FDR; Angelopoulos et al. 2021, 2023).

Sets are S_λ(x) = {i : score(x, i) ≥ λ}; the loss is the false-discovery proportion
FDP(λ) = |S_λ ∩ Bad_x| / max(|S_λ|, 1). For each λ of a grid ordered from strict (large λ) to loose, test
H_λ: R(λ) > α with a valid p-value from n calibration users, reject in fixed sequence while p ≤ δ, and stop
at the first non-rejection. The rejected λ are the valid set Λ̂; with probability ≥ 1 − δ every λ in it has
R(λ) ≤ α, so any choice among them (the loosest, or the most diverse) keeps the guarantee.

"Most diverse" (C-FDR multi-objective use) means here: the valid λ with the largest mean intra-list
diversity M-ILD over the calibration users — mean pairwise cosine distance between the item embeddings of a
set, averaged over users whose set has ≥ 2 items (``mean_ild``); ties go to the loosest λ. Without
embeddings the caller can pass any per-λ value (mean set size makes the choice the loosest valid λ, because
the sets are nested). Pure numpy and scipy; inputs come one chunk of users at a time.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom

__all__ = [
    "fdp_losses",
    "fixed_sequence",
    "hb_pvalue",
    "hoeffding_pvalue",
    "ltt_calibrate",
    "mean_ild",
    "select_lambda",
]


def hoeffding_pvalue(risk_hat: float, n: int, alpha: float) -> float:
    """Hoeffding p-value exp(−2n(α − R̂)₊²) for H: R > α with losses in [0, 1] (C-FDR)."""
    gap = max(alpha - risk_hat, 0.0)
    return float(math.exp(-2.0 * n * gap * gap))


def _kl_bernoulli(a: float, b: float) -> float:
    """h₁(a, b) = a log(a/b) + (1−a) log((1−a)/(1−b)), the Bernoulli KL divergence (0 log 0 = 0)."""
    out = 0.0
    if a > 0:
        out += a * math.log(a / b)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - b))
    return out


def hb_pvalue(risk_hat: float, n: int, alpha: float) -> float:
    """Hoeffding–Bentkus p-value (Bates et al. 2021, RCPS; used by LTT) for H: R > α, losses in [0, 1]:
    min(exp(−n·h₁(min(R̂, α), α)), e·P(Binom(n, α) ≤ ⌈nR̂⌉))."""
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must lie in (0, 1)")
    hoef = math.exp(-n * _kl_bernoulli(min(risk_hat, alpha), alpha))
    bentkus = math.e * float(binom.cdf(math.ceil(n * risk_hat - 1e-12), n, alpha))
    return float(min(hoef, bentkus, 1.0))


def fixed_sequence(pvalues, delta: float) -> np.ndarray:
    """Indices rejected by fixed-sequence testing: reject in the given order while p ≤ δ, stop at the first
    non-rejection (family-wise error ≤ δ without correction, C-FDR)."""
    p = np.asarray(pvalues, dtype=np.float64)
    fail = np.nonzero(p > delta)[0]
    stop = fail[0] if fail.size else p.size
    return np.arange(stop)


def fdp_losses(scores_chunk, bad_chunk, lambdas) -> np.ndarray:
    """FDP(λ) per row and λ, ``(rows, len(lambdas))``, for S_λ = {i : score ≥ λ} and the chunk's bad-item
    mask (items with true value below the quality threshold, known in simulation). O(rows × items × |Λ|)."""
    s = np.asarray(scores_chunk, dtype=np.float64)
    bad = np.asarray(bad_chunk, dtype=bool)
    out = np.empty((s.shape[0], len(lambdas)))
    for j, lam in enumerate(lambdas):
        inset = s >= lam
        size = inset.sum(axis=1)
        out[:, j] = (inset & bad).sum(axis=1) / np.maximum(size, 1)
    return out


def mean_ild(scores_chunk, item_emb, lambdas) -> tuple[np.ndarray, np.ndarray]:
    """Per-λ (sum of ILD over rows with |S_λ| ≥ 2, count of such rows) for one chunk; divide the summed
    totals of all chunks to get M-ILD. ILD of a set = 1 − mean pairwise cosine similarity of its items'
    embeddings, from ‖Σe‖² − k over k(k−1) ordered pairs of unit vectors."""
    s = np.asarray(scores_chunk, dtype=np.float64)
    e = np.asarray(item_emb, dtype=np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    total = np.zeros(len(lambdas))
    count = np.zeros(len(lambdas))
    for j, lam in enumerate(lambdas):
        inset = (s >= lam).astype(np.float64)
        k = inset.sum(axis=1)
        ok = k >= 2
        v = inset[ok] @ e
        sim = ((v * v).sum(axis=1) - k[ok]) / (k[ok] * (k[ok] - 1))
        total[j] = (1.0 - sim).sum()
        count[j] = ok.sum()
    return total, count


def ltt_calibrate(losses, alpha: float, delta: float, pvalue: str = "hb") -> np.ndarray:
    """Learn-then-Test over a grid: ``losses`` is (n users, |Λ|) with columns ordered strict → loose.
    Returns the indices of the valid (rejected) λ, a prefix of the grid; empty if even the strictest fails.
    ``pvalue`` is "hb" (Hoeffding–Bentkus, tighter) or "hoeffding"."""
    loss = np.asarray(losses, dtype=np.float64)
    n = loss.shape[0]
    fn = {"hb": hb_pvalue, "hoeffding": hoeffding_pvalue}[pvalue]
    pv = [fn(float(r), n, alpha) for r in loss.mean(axis=0)]
    return fixed_sequence(pv, delta)


def select_lambda(lambdas, valid, diversity=None) -> float:
    """λ̂ among the valid indices: the loosest (last) one by default, or the one with the largest
    ``diversity`` value (e.g. M-ILD from ``mean_ild``), ties to the loosest. NaN when none is valid
    (the caller then shows the strictest set or nothing)."""
    idx = np.asarray(valid, dtype=np.int64)
    if idx.size == 0:
        return float("nan")
    lam = np.asarray(lambdas, dtype=np.float64)
    if diversity is None:
        return float(lam[idx[-1]])
    d = np.asarray(diversity, dtype=np.float64)[idx]
    d = np.where(np.isnan(d), -np.inf, d)
    best = idx[np.nonzero(d == d.max())[0][-1]]
    return float(lam[best])
