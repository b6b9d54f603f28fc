"""Calibrating the F-SURR surrogate against a real backend (``recloop llm calibrate``).

Protocol (reference F-SURR "Calibration against the real model", with our choices marked):

1. **Probe set.** Users of a data-set world (MovieLens-100K by default) are stratified by activity
   tercile x gender (when known) and sampled evenly with a seed. Three probe kinds use the prompts of
   the roles themselves, so what is measured is what the roles will see:

   * ``recommend`` (R1's prompt): history titles + a shuffled pool of unconsumed candidates, "recommend
     n"; measures L-HALL (HallRate, near-miss and duplicate rates), L-POPBIAS (LPD vs the user's history,
     head share, popularity percentiles);
   * ``profile`` (R2's prompt): measures L-PROFHALL and the number of claims per profile;
   * ``rank`` (R3's prompt, candidates shuffled): the 1-based position of the candidate ranked first.

   A fraction (``heldout``) of the recommend probes, on other users, is kept out of the fit.
2. **Fit** (:func:`fit_surrogate`): h = HallRate + near-miss rate, eps_near = near/(near+hall) (so the
   surrogate's HallRate equals the real one: :func:`recloop.llm.surrogate_fit.calibrate`);
   beta so that the surrogate's measured head share on the fit probes equals the real one (default;
   ``beta_from="lpd"`` is the reference's rule: root-finding on LPD(beta), :func:`~.surrogate_fit.fit_beta`,
   refined on the measured LPD); rho by the position-bias MLE (:func:`~.surrogate_fit.fit_rho`), refined so
   that the surrogate's own MLE on the rank probes equals the real one (the first-pick MLE is attenuated
   by relevance and popularity); h_p by a grid search that makes the surrogate's *measured* ProfHall
   (same parser, same claims per profile) equal the real one (our choice: the reference sets
   h_p = ProfHall, but a surrogate drawing claims from the history alone already has ProfHall > 0 under
   tau_like, so the direct rule overshoots). Parameters that cannot reach the real figure stop at the
   nearer bound (reported in ``fit_notes``).
3. **Validation** on the held-out probes (:func:`compare_heldout`): the surrogate answers the same
   held-out payloads (``replicates`` seeds each); real vs surrogate HallRate (target +-0.03), head
   share (target +-0.05) and the two-sample KS test of the matched items' popularity percentiles. The
   real rates' cluster-robust standard errors (titles of one answer are correlated) are reported: with
   a few dozen held-out probes they are about as large as the targets.

Everything goes through a :class:`~.cache.CachedBackend`, so re-running with the same probes costs no
model calls. The output JSON holds the surrogate parameters under ``params`` (what
``llm: {backend: {type: surrogate, params_file: FILE}}`` reads), plus the measurements and the
held-out report.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .calibrate_probe import NAN, Probe, ProbeSet, cluster_se, measure, run_probes
from .matching import TitleMatcher
from .surrogate import SurrogateLLM, SurrogateParams
from .surrogate_fit import calibrate, expected_lpd_fn
from .types import GenerationParams, LLMRequest

__all__ = [
    "fit_surrogate",
    "simulate",
    "compare_heldout",
    "calibrate_backend",
    "write_params",
]


def simulate(
    params: SurrogateParams,
    ps: ProbeSet,
    probes: Sequence[Probe],
    replicates: int = 1,
    n_claims: int | None = None,
) -> tuple[list[Probe], list[str | None]]:
    """The surrogate's answers to ``probes`` (each payload re-seeded ``replicates`` times)."""
    sur = SurrogateLLM(params, titles=list(ps.world.items.titles[: ps.world.items.n]))
    reqs, rep_probes = [], []
    for r in range(replicates):
        for p in probes:
            pl = dict(p.request.payload)
            pl["seed"] = int(pl.get("seed", 0)) * 7919 + r
            if n_claims is not None and p.kind == "profile":
                pl["n_claims"] = int(n_claims)
            reqs.append(LLMRequest(p.request.prompt, p.request.task, pl))
            rep_probes.append(p)
    resps = sur.generate(reqs, GenerationParams())
    return rep_probes, [None if r.failed else r.text for r in resps]


def _bisect(fn: Callable[[float], float], target: float, lo: float, hi: float, iters: int = 14) -> float:
    """x in [lo, hi] with fn(x) ~ target for an increasing fn (the nearer bound when out of range)."""
    f_lo, f_hi = fn(lo), fn(hi)
    if not (math.isfinite(f_lo) and math.isfinite(f_hi)):
        return float(0.5 * (lo + hi))
    if target <= f_lo:
        return float(lo)
    if target >= f_hi:
        return float(hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        v = fn(mid)
        if not math.isfinite(v):
            break
        if v < target:
            lo = mid
        else:
            hi = mid
    return float(0.5 * (lo + hi))


def fit_surrogate(
    ps: ProbeSet,
    real: dict[str, Any],
    base: SurrogateParams | None = None,
    replicates: int = 4,
    refine: bool = True,
    beta_from: str = "head_share",
    tau_grid: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
) -> tuple[SurrogateParams, dict[str, Any]]:
    """Surrogate parameters from the real model's figures on the fit probes (see the module doc).

    ``beta_from``: ``head_share`` (default; our choice: beta is bisected until the surrogate's measured
    head share on the fit probes equals the real one, tau_s kept), ``lpd`` (the reference's rule: beta
    by root-finding on LPD, refined on the measured LPD), or ``both`` (for each tau_s of ``tau_grid``,
    beta matches the head share, and the tau_s whose LPD is nearest wins; beta and tau_s trade off,
    so this is weakly identified on small probe sets).
    """
    base = base or SurrogateParams()
    rec = ps.of("recommend", "fit")
    payloads = [p.request.payload for p in rec]
    refs = [p.info["ref_pops"] for p in rec]
    inputs: dict[str, Any] = {"base": base}
    if math.isfinite(real.get("hall_rate", NAN)):
        inputs["hall_rate"] = real["hall_rate"]
        if math.isfinite(real.get("near_miss_rate", NAN)):
            inputs["near_miss_rate"] = real["near_miss_rate"]
    if math.isfinite(real.get("lpd", NAN)) and payloads:
        inputs["lpd"] = real["lpd"]
        inputs["lpd_payloads"] = payloads
        inputs["reference_pops"] = refs
    if real.get("first_positions"):
        inputs["chosen_positions"] = real["first_positions"]
        inputs["n_candidates"] = real["n_presented"]
    params = calibrate(inputs)
    notes: dict[str, Any] = {}
    if payloads and "lpd" in inputs:
        fn = expected_lpd_fn(payloads, refs, tau_s=params.tau_s)
        notes["lpd_range"] = [fn(-5.0), fn(5.0)]
        notes["beta_analytic"] = params.beta
        if refine:
            # the expected-LPD curve ignores sampling without replacement: refine beta on the
            # surrogate's measured LPD (common random numbers, so LPD(beta) is monotone in practice)
            def lpd_of(beta: float) -> float:
                sp = params.model_copy(update={"beta": float(beta)})
                pr, tx = simulate(sp, ps, rec, replicates=replicates)
                return measure(ps, pr, tx)["lpd"]

            beta = _bisect(lpd_of, real["lpd"], params.beta - 1.5, params.beta + 1.5)
            params = params.model_copy(update={"beta": beta})
            notes["lpd_fitted"] = lpd_of(beta)
        else:
            notes["lpd_fitted"] = fn(params.beta)
    target_head = real.get("head_share", NAN)
    if refine and rec and beta_from in ("head_share", "both") and math.isfinite(target_head):

        def pop_figures(beta: float, tau: float) -> dict[str, Any]:
            sp = params.model_copy(update={"beta": float(beta), "tau_s": float(tau)})
            pr, tx = simulate(sp, ps, rec, replicates=replicates)
            return measure(ps, pr, tx)

        taus = (
            list(tau_grid) if beta_from == "both" and math.isfinite(real.get("lpd", NAN)) else [params.tau_s]
        )
        best = None
        tried = []
        for tau in taus:
            beta = _bisect(lambda b, tau=tau: pop_figures(b, tau)["head_share"], target_head, -3.0, 5.0)
            fig = pop_figures(beta, tau)
            gap = abs(fig["lpd"] - real["lpd"]) if math.isfinite(real.get("lpd", NAN)) else 0.0
            tried.append({"tau_s": tau, "beta": beta, "head_share": fig["head_share"], "lpd": fig["lpd"]})
            if best is None or gap < best[0]:
                best = (gap, tau, beta, fig)
        _, tau, beta, fig = best
        params = params.model_copy(update={"beta": beta, "tau_s": tau})
        notes.update(
            beta_from=beta_from,
            tau_beta_tried=tried,
            head_share_fitted=fig["head_share"],
            lpd_fitted=fig["lpd"],
        )
    params = _fit_rho_and_hp(ps, real, params, notes, replicates, refine)
    return SurrogateParams(**params.model_dump()), notes


def _fit_rho_and_hp(
    ps: ProbeSet, real: dict[str, Any], params: SurrogateParams, notes: dict[str, Any], replicates: int, refine: bool
) -> SurrogateParams:
    """fit_surrogate's last steps: rho on the rank probes, h_p on the profile probes (notes updated)."""
    rank = ps.of("rank", "fit")
    if refine and rank and real.get("first_positions") and math.isfinite(real.get("rho", NAN)):
        # the first-pick MLE is attenuated by relevance and popularity: match the surrogate's own estimate
        def rho_of(rho: float) -> float:
            sp = params.model_copy(update={"rho": float(rho)})
            pr, tx = simulate(sp, ps, rank, replicates=replicates)
            return measure(ps, pr, tx)["rho"]

        notes["rho_mle"] = params.rho
        rho = _bisect(rho_of, real["rho"], -3.0, 6.0)
        params = params.model_copy(update={"rho": rho})
        notes["rho_fitted_estimate"] = rho_of(rho)
    # h_p: match the surrogate's measured ProfHall (grid; our choice, see the module doc)
    prof = ps.of("profile", "fit")
    if prof and math.isfinite(real.get("prof_hall", NAN)):
        k = int(min(6, max(1, round(real.get("claims_per_profile", 3) or 3))))
        grid = np.linspace(0.0, 1.0, 21)
        vals = []
        for hp in grid:
            sp = params.model_copy(update={"h_p": float(hp)})
            pr, tx = simulate(sp, ps, prof, replicates=replicates, n_claims=k)
            vals.append(measure(ps, pr, tx)["prof_hall"])
        vals = np.asarray(vals)
        j = int(np.nanargmin(np.abs(vals - real["prof_hall"])))
        params = params.model_copy(update={"h_p": float(grid[j])})
        notes.update(
            prof_hall_grid=dict(
                zip([round(float(g), 2) for g in grid], [float(v) for v in vals], strict=True)
            ),
            n_claims=k,
            prof_hall_fitted=float(vals[j]),
        )
    return params


def compare_heldout(
    real: dict[str, Any],
    sur: dict[str, Any],
    hall_tol: float = 0.03,
    head_tol: float = 0.05,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Held-out validation: HallRate within ``hall_tol``, head share within ``head_tol``, and the KS
    two-sample test of popularity percentiles (passes when p > alpha; reported, not required)."""
    from scipy import stats

    def diff(k):
        a, b = real.get(k, NAN), sur.get(k, NAN)
        return (
            float(b - a)
            if (a is not None and b is not None and math.isfinite(a) and math.isfinite(b))
            else NAN
        )

    hd, sd = diff("hall_rate"), diff("head_share")
    rp, sp_ = np.asarray(real.get("percentiles", []), float), np.asarray(sur.get("percentiles", []), float)
    if rp.size and sp_.size:
        ks = stats.ks_2samp(rp, sp_)
        ks_stat, ks_p = float(ks.statistic), float(ks.pvalue)
    else:
        ks_stat = ks_p = NAN

    def se(k, n_key):  # standard error of the real rate (the noise floor of the comparison)
        if real.get("per_probe"):  # cluster-robust over probes
            num, den = {"hall_rate": (1, 0), "head_share": (3, 2)}[k]
            return cluster_se(real["per_probe"], num, den)
        v, n = real.get(k, NAN), real.get(n_key, 0) or 0  # binomial (independent titles)
        return float(math.sqrt(v * (1 - v) / n)) if (n and math.isfinite(v)) else NAN

    hall_ok = bool(math.isfinite(hd) and abs(hd) <= hall_tol)
    head_ok = bool(math.isfinite(sd) and abs(sd) <= head_tol)
    return {
        "real": {
            k: real.get(k, NAN)
            for k in ("hall_rate", "head_share", "lpd", "near_miss_rate", "n_generated", "n_matched")
        },
        "surrogate": {
            k: sur.get(k, NAN)
            for k in ("hall_rate", "head_share", "lpd", "near_miss_rate", "n_generated", "n_matched")
        },
        "hall_rate_diff": hd,
        "hall_rate_tol": hall_tol,
        "hall_rate_ok": hall_ok,
        "hall_rate_se": se("hall_rate", "n_generated"),
        "head_share_diff": sd,
        "head_share_tol": head_tol,
        "head_share_ok": head_ok,
        "head_share_se": se("head_share", "n_matched"),
        "ks_stat": ks_stat,
        "ks_p": ks_p,
        "ks_ok": bool(math.isfinite(ks_p) and ks_p > alpha),
        "passed": hall_ok and head_ok,
    }


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def calibrate_backend(
    backend,
    ps: ProbeSet,
    *,
    max_tokens: dict[str, int] | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    replicates: int = 5,
    batch: int = 64,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
    beta_from: str = "head_share",
) -> dict[str, Any]:
    """Run the probes on ``backend`` (an :class:`~.types.LLMBackend`, ideally a CachedBackend), fit
    the surrogate on the fit split, validate on the held-out split; the JSON-able report."""
    say = log or (lambda s: None)
    mt = {"recommend": 96, "profile": 80, "rank": 48, **(max_tokens or {})}
    params = {k: GenerationParams(max_tokens=v, temperature=temperature, seed=seed) for k, v in mt.items()}
    t0 = time.perf_counter()
    texts = run_probes(backend.generate, ps.probes, params, batch=batch, progress=progress)
    wall = time.perf_counter() - t0
    matcher = TitleMatcher(list(ps.world.items.titles[: ps.world.items.n]))
    fit_idx = [j for j, p in enumerate(ps.probes) if p.split == "fit"]
    held_idx = [j for j, p in enumerate(ps.probes) if p.split == "heldout"]
    real_fit = measure(ps, [ps.probes[j] for j in fit_idx], [texts[j] for j in fit_idx], matcher)
    real_held = measure(ps, [ps.probes[j] for j in held_idx], [texts[j] for j in held_idx], matcher)
    say(
        f"real model on {len(fit_idx)} fit probes: HallRate {real_fit['hall_rate']:.3f}, "
        f"LPD {real_fit['lpd']:.3f}, head share {real_fit['head_share']:.3f}, "
        f"ProfHall {real_fit['prof_hall']:.3f}, "
        f"rho {real_fit['rho']:.3f}"
    )
    params_fit, notes = fit_surrogate(ps, real_fit, beta_from=beta_from)
    held = ps.of("recommend", "heldout")
    pr, tx = simulate(params_fit, ps, held, replicates=replicates)
    sur_held = measure(ps, pr, tx, matcher)
    report = compare_heldout(real_held, sur_held)
    acc = getattr(backend, "accounting", None)
    inner = getattr(backend, "inner", backend)
    out = {
        "format": "recloop-surrogate-calibration/1",
        "params": params_fit.model_dump(),
        "backend": {"name": getattr(inner, "name", "?"), "model": getattr(inner, "model_id", "?")},
        "probes": ps.meta,
        "generation": {k: v.key() for k, v in params.items()},
        "measured": {
            k: v
            for k, v in real_fit.items()
            if k not in ("percentiles", "first_positions", "n_presented", "per_probe")
        },
        "fit_notes": notes,
        "heldout": report,
        "roles": {"profiler": {"n_claims": notes.get("n_claims")}},
        "accounting": acc.as_dict() if acc is not None else None,
        "probe_wall_s": wall,
        "examples": [
            {"kind": ps.probes[j].kind, "text": (texts[j] or "")[:400]}
            for j in ([fit_idx[0]] if fit_idx else [])
            + [j for j in fit_idx if ps.probes[j].kind != "recommend"][:2]
        ],
    }
    return _clean(out)


def write_params(report: dict[str, Any], path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, sort_keys=False)
        fh.write("\n")
