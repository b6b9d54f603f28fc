"""Calibration helpers of the F-SURR surrogate ("Calibration against the real model"): :func:`fit_beta`,
:func:`fit_rho`, :func:`expected_lpd_fn`, :func:`calibrate`, :func:`validate_surrogate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from recloop.analysis.llm_metrics import position_bias_slope

from .surrogate import SurrogateParams

__all__ = [
    "fit_beta",
    "fit_rho",
    "fit_monotone",
    "expected_lpd_fn",
    "calibrate",
    "calibrate_surrogate",
    "validate_surrogate",
]


def fit_monotone(
    target: float, fn: Callable[[float], float], lo: float, hi: float, xtol: float = 1e-4
) -> float:
    """Root of fn(x) = target for a monotone fn on [lo, hi] (brentq); clipped to the nearer bound
    when the target is outside [fn(lo), fn(hi)]."""
    from scipy.optimize import brentq

    f_lo, f_hi = fn(lo) - target, fn(hi) - target
    if f_lo == 0:
        return float(lo)
    if f_hi == 0:
        return float(hi)
    if np.sign(f_lo) == np.sign(f_hi):
        return float(lo if abs(f_lo) < abs(f_hi) else hi)
    return float(brentq(lambda x: fn(x) - target, lo, hi, xtol=xtol))


def fit_beta(target_lpd: float, lpd_fn: Callable[[float], float], lo: float = -5.0, hi: float = 5.0) -> float:
    """beta such that the surrogate's LPD(beta) equals the real model's LPD (F-SURR; L-POPBIAS a).

    LPD is monotone increasing in beta, so 1-D root finding (``scipy.optimize.brentq``) on
    [lo, hi]; a target outside [LPD(lo), LPD(hi)] gives the nearer bound. ``lpd_fn`` is e.g.
    :func:`expected_lpd_fn`.
    """
    return fit_monotone(float(target_lpd), lpd_fn, lo, hi)


def fit_rho(selected_positions: Any, n_candidates: int | Sequence[int] | np.ndarray) -> float:
    """rho from the 1-based positions (candidates shuffled) of the real model's first-ranked candidate.

    MLE of P(pos = j) proportional to j**(-rho), i.e. the log-linear regression of selection
    probability on log(1/pos) (F-SURR; same estimator as
    :func:`recloop.analysis.llm_metrics.position_bias_slope`).
    """

    return position_bias_slope(selected_positions, n_candidates)


def expected_lpd_fn(
    payloads: Sequence[Mapping[str, Any]],
    reference_pops: Sequence[Sequence[float] | np.ndarray],
    tau_s: float = 1.0,
    plus_one: bool = True,
) -> Callable[[float], float]:
    """LPD(beta) of the surrogate on probe payloads, in expectation (smooth, strictly increasing).

    For each probe payload (``candidates``/``relevance``/``popularity`` as in ``augment``), the
    expected mean log10(1+phi) of a recommended item under pi(beta) = softmax(rel/tau_s +
    beta*log(1+phi)) minus the mean log10(1+phi) of the user's reference items R_u; averaged over
    payloads (L-POPBIAS a). Hallucinated slots do not enter LPD, so h does not matter; sampling
    without replacement is approximated by the per-slot marginal.
    """
    rows = []
    for pl, ref in zip(payloads, reference_pops, strict=True):
        pop = np.maximum(np.asarray(pl.get("popularity"), dtype=float).ravel(), 0.0)
        rel = np.asarray(pl.get("relevance", np.zeros(pop.size)), dtype=float).ravel()
        ref = np.asarray(ref, dtype=float).ravel()
        if pop.size == 0 or ref.size == 0:
            continue
        f = np.log10(1.0 + pop) if plus_one else np.log10(np.maximum(pop, 1e-12))
        r = np.log10(1.0 + ref) if plus_one else np.log10(np.maximum(ref, 1e-12))
        rows.append((rel / tau_s, np.log1p(pop), f, float(r.mean())))
    if not rows:
        raise ValueError("expected_lpd_fn: no usable probe payloads")
    width = max(r[0].size for r in rows)
    base = np.full((len(rows), width), -np.inf)
    lp = np.zeros((len(rows), width))
    val = np.zeros((len(rows), width))
    refm = np.array([r[3] for r in rows])
    for k, (b, l_, f, _) in enumerate(rows):
        base[k, : b.size], lp[k, : b.size], val[k, : b.size] = b, l_, f

    def lpd_of(beta: float) -> float:
        z = base + beta * lp
        z = z - z.max(axis=1, keepdims=True)
        w = np.exp(z)
        e = (w * val).sum(axis=1) / w.sum(axis=1)
        return float(np.mean(e - refm))

    return lpd_of


def calibrate(probe_results: Mapping[str, Any]) -> SurrogateParams:
    """Fit :class:`SurrogateParams` to a real model's behaviour on a probe set (F-SURR).

    ``probe_results`` keys (all optional; a missing one keeps the ``base`` value):

    ``base``: SurrogateParams or dict - starting values (tau_s, seed, ...); default SurrogateParams().
    ``hall_rate``: the real model's HallRate (L-HALL) on the probe.
    ``near_miss_rate``: fraction of generated titles that matched fuzzily but not exactly. With it,
        eps_near = near/(near+hall) and h = hall + near (so the surrogate's HallRate = h(1-eps_near)
        reproduces ``hall_rate``); without it, eps_near = 0 and h = hall_rate (the reference's rule).
    ``prof_hall``: the real model's ProfHall (L-PROFHALL); sets h_p (the reference's rule).
    ``lpd``: the real model's LPD (L-POPBIAS a) on the probe.
    ``lpd_fn``: callable beta -> surrogate LPD; or ``lpd_payloads`` (the probe's augment payloads)
        plus ``reference_pops`` (per payload, the popularity of R_u) to build :func:`expected_lpd_fn`.
    ``beta_bounds``: (lo, hi) for the beta search, default (-5, 5).
    ``chosen_positions``: 1-based positions of the real model's first-ranked candidate per rank
        probe (candidates shuffled), with ``n_candidates`` (int or one per probe) -> rho.
    """
    base = probe_results.get("base")
    if base is None:
        params = SurrogateParams().model_dump()
    elif isinstance(base, SurrogateParams):
        params = base.model_dump()
    else:
        params = SurrogateParams(**dict(base)).model_dump()
    if probe_results.get("hall_rate") is not None:
        hall = float(probe_results["hall_rate"])
        near = probe_results.get("near_miss_rate")
        if near is not None and float(near) + hall > 0:
            near = float(near)
            params["h"] = min(1.0, hall + near)
            params["eps_near"] = near / (hall + near)
        else:
            params["h"] = min(1.0, max(0.0, hall))
            params["eps_near"] = 0.0
    if probe_results.get("prof_hall") is not None:
        params["h_p"] = min(1.0, max(0.0, float(probe_results["prof_hall"])))
    if probe_results.get("lpd") is not None:
        fn = probe_results.get("lpd_fn")
        if fn is None and probe_results.get("lpd_payloads") is not None:
            fn = expected_lpd_fn(
                probe_results["lpd_payloads"], probe_results["reference_pops"], tau_s=params["tau_s"]
            )
        if fn is not None:
            lo, hi = probe_results.get("beta_bounds", (-5.0, 5.0))
            params["beta"] = fit_beta(float(probe_results["lpd"]), fn, lo, hi)
    if probe_results.get("chosen_positions") is not None:
        rho = fit_rho(probe_results["chosen_positions"], probe_results.get("n_candidates", 20))
        if np.isfinite(rho):
            params["rho"] = float(rho)
    return SurrogateParams(**params)


#: Alias (the CLI ``recloop llm calibrate`` is to call this).
calibrate_surrogate = calibrate


def validate_surrogate(
    real_percentiles: Sequence[float] | np.ndarray,
    surrogate_percentiles: Sequence[float] | np.ndarray,
    real_head_share: float | None = None,
    surrogate_head_share: float | None = None,
    alpha: float = 0.05,
    head_tol: float = 0.02,
) -> dict[str, float | bool]:
    """F-SURR validation: two-sample KS on popularity percentiles (pass if p > alpha) and head share
    within +-head_tol. Returns ``ks_stat``, ``ks_p``, ``head_share_diff`` (NaN if not given), ``passed``."""
    from scipy import stats

    ks = stats.ks_2samp(np.asarray(real_percentiles, float), np.asarray(surrogate_percentiles, float))
    diff = float("nan")
    ok = bool(ks.pvalue > alpha)
    if real_head_share is not None and surrogate_head_share is not None:
        diff = float(surrogate_head_share) - float(real_head_share)
        ok = ok and abs(diff) <= head_tol
    return {"ks_stat": float(ks.statistic), "ks_p": float(ks.pvalue), "head_share_diff": diff, "passed": ok}
