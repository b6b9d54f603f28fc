"""Off-policy evaluation (OPE): the value of a target policy estimated from a log another policy collected.

The setting is the Open Bandit Dataset's (Saito et al. 2021) "independent positions" one. Each log row is
an impression (action a_i at position p_i, reward r_i, logging propensity pscore_i = μ(a_i, p_i | x_i); see
:mod:`recloop.analysis.ope_data`). A target policy π is given as its action distribution, an array
``(n, A, P)`` (or ``(1, A, P)`` when it is the same every round) whose entry ``[i, a, p]`` is the probability
that π shows a at position p in round i; for each position it sums to 1 over the actions. The estimand is
the expected reward per impression at the logged positions, V(π) = E_i[Σ_a π(a, p_i | x_i) q(x_i, a, p_i)]
with q the expected reward, assuming (as OBD does) that a slot's reward depends only on its own item.

Estimators (w_i = π(a_i, p_i | x_i) / pscore_i, the importance weight):

* ``ipw`` — inverse propensity weighting, mean(w r): unbiased whenever pscore is right and positive
  wherever π is.
* ``snipw`` — self-normalised IPW, Σ w r / Σ w: slightly biased, usually lower variance.
* ``dm`` — direct method, mean over rows of Σ_a π(a, p_i) q̂(a, p_i) with the reward model q̂ below: low
  variance, but biased as far as q̂ is wrong (it ignores contexts, so a contextual π or μ biases it).
* ``dr`` — doubly robust, DM + mean(w (r − q̂(a_i, p_i))): unbiased if pscore is right, whatever q̂.

**Reward model** (:func:`fit_reward_model`): per-(action, position) click rates with a Beta prior centred
on the position's mean rate: q̂(a, p) = (clicks(a, p) + m·r̄_p) / (impressions(a, p) + m). The prior strength m
is fitted once on the whole log by the beta-binomial method of moments (the spread of the cell rates beyond
binomial noise; clipped to [1, 10^6]) unless given. It is fitted on the log it evaluates (no cross-fitting).

**Intervals**: bootstrap percentile intervals over rows (default 2,000 resamples, 95%, seeded). The
bootstrap is vectorised: every estimator is a function of per-row sums (Σ w r, Σ w, impressions, clicks and
weights per cell, target mass per cell), so a block of resamples is one sparse product of bootstrap counts
with a per-row design matrix — and the DM and DR reward model is refitted inside every resample, so their
intervals include the reward model's own uncertainty.

**Target policies** (:func:`uniform_policy`, :func:`bernoulli_ts_policy`, and the ``policies:`` of a YAML
file read by :func:`read_targets`) are context-free: they act on the logged positions alone:

* ``random`` — recloop's uniform random slate: every item equally likely at every position (1/A).
* ``bernoulli_ts`` — Bernoulli Thompson sampling with fixed Beta(alpha_i, beta_i) beliefs: draw θ_i ~
  Beta(alpha_i, beta_i) per item, rank, the top P items fill positions 0..P-1. Its action distribution is
  computed by Monte Carlo (``samples`` draws, default 10^5, seeded). Without ``alpha``/``beta`` it uses the
  prior ZOZOTOWN's BTS started from (obp's ``prior_bts.yaml``, ``campaign``, default ``all``): obp's classic
  check evaluates it on the ``random`` log against the on-policy click rate of the ``bts`` log.

A scenario's other policy types need users and items, which a context-free log does not have; they are
skipped (and named) by :func:`read_targets`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import polars as pl
import scipy.sparse as sp
from pydantic import Field, ValidationError

from recloop.analysis.ope_data import BanditLog, load_log, obd_prior
from recloop.errors import RecloopInputError, clip, did_you_mean
from recloop.registry import Params
from recloop.rng import component_rng

__all__ = ["ESTIMATORS", "TARGET_TYPES", "Estimate", "bernoulli_ts_policy", "dm", "dr", "evaluate", "evaluate_log",
           "fit_reward_model", "ipw", "on_policy", "prior_strength", "read_targets", "snipw", "uniform_policy"]

ESTIMATORS = ("ipw", "snipw", "dm", "dr")
DEFAULT_RESAMPLES = 2000
MAX_RESAMPLES = 100_000
_BLOCK_ENTRIES = 1 << 22  # bootstrap counts held at once (resamples x rows): 32 MB of float64
_M_RANGE = (1.0, 1e6)


class Estimate(NamedTuple):
    """A point estimate and its bootstrap percentile interval [lo, hi]."""

    value: float
    lo: float
    hi: float


# --------------------------------------------------------------------------------- design and sums
@dataclass(frozen=True)
class _Design:
    """Per-row statistics whose bootstrap-weighted sums determine every estimator (see the module doc).

    Columns of ``rows``: 0 = w·r, 1 = w, 2 = r, then C impression counts, C clicks and C weights per cell
    (cell = a·P + p), then the target block: P position counts when π is shared by all rows (``shared`` is
    then π flattened to C), else C columns holding π_i(a, p_i) at cell (a, p_i).
    """

    rows: sp.csr_matrix
    n: int
    n_actions: int
    n_positions: int
    shared: np.ndarray | None

    @property
    def cells(self) -> int:
        return self.n_actions * self.n_positions

    def sums(self, counts: np.ndarray) -> np.ndarray:
        """Σ_i counts[b, i] · rows[i, :] for each bootstrap row b of ``counts`` (b, n) -> (b, K)."""
        return np.asarray((self.rows.T @ counts.T).T)


def check_action_dist(log: BanditLog, action_dist: np.ndarray) -> np.ndarray:
    """``action_dist`` as float64 (n or 1, A, P), checked against ``log`` (a :class:`RecloopInputError` if not)."""
    dist = np.asarray(action_dist, dtype=np.float64)
    if dist.ndim != 3 or dist.shape[0] not in (1, len(log)):
        raise RecloopInputError(f"the action distribution must be (n_rounds={len(log)} or 1, A, P), not "
                                f"{dist.shape}.", key="action_dist")
    _, a, p = dist.shape
    if a < log.n_actions or p < log.n_positions:
        raise RecloopInputError(f"the action distribution covers {a} actions x {p} positions but the log has "
                                f"{log.n_actions} x {log.n_positions}.", key="action_dist")
    if not np.all(np.isfinite(dist)) or dist.min() < 0:
        raise RecloopInputError("the action distribution must be finite and >= 0.", key="action_dist")
    mass = dist.sum(axis=1)
    if not np.allclose(mass, 1.0, atol=1e-6):
        raise RecloopInputError(f"the action distribution must sum to 1 over actions at every position (found "
                                f"{mass.min():.6g} to {mass.max():.6g}).", key="action_dist")
    return dist


def _design(log: BanditLog, dist: np.ndarray) -> _Design:
    n, (_, a_n, p_n) = len(log), dist.shape
    c_n = a_n * p_n
    cell = log.action * p_n + log.position
    w = dist[0 if dist.shape[0] == 1 else np.arange(n), log.action, log.position] / log.pscore
    r = log.reward
    row = np.arange(n)
    parts = [(row, np.zeros(n, np.int64), w * r), (row, np.ones(n, np.int64), w), (row, np.full(n, 2), r),
             (row, 3 + cell, np.ones(n)), (row, 3 + c_n + cell, r), (row, 3 + 2 * c_n + cell, w)]
    base = 3 + 3 * c_n
    if dist.shape[0] == 1:
        parts.append((row, base + log.position, np.ones(n)))
        shared, k = dist[0].reshape(c_n), base + p_n
    else:
        mass = dist[row, :, log.position]  # (n, A): π_i(a, p_i)
        cols = base + np.arange(a_n)[None, :] * p_n + log.position[:, None]
        parts.append((np.repeat(row, a_n), cols.ravel(), mass.ravel()))
        shared, k = None, base + c_n
    i, j, v = (np.concatenate(x) for x in zip(*parts))
    rows = sp.csr_matrix((v, (i, j)), shape=(n, k))
    return _Design(rows, n, a_n, p_n, shared)


# ----------------------------------------------------------------------------------- reward model
def _position_means(imp3: np.ndarray, clk3: np.ndarray) -> np.ndarray:
    """(b, 1, P): each position's mean reward (the overall mean for a position without impressions)."""
    pos_imp, pos_clk = imp3.sum(axis=1, keepdims=True), clk3.sum(axis=1, keepdims=True)
    overall = clk3.sum(axis=(1, 2), keepdims=True) / np.maximum(imp3.sum(axis=(1, 2), keepdims=True), 1)
    return np.where(pos_imp > 0, pos_clk / np.maximum(pos_imp, 1), overall)


def _cell_rates(imps: np.ndarray, clicks: np.ndarray, n_positions: int, m: float) -> np.ndarray:
    """q̂ (b, C): each cell's click rate shrunk towards its position's mean rate with prior strength m."""
    b = imps.shape[0]
    imp3, clk3 = imps.reshape(b, -1, n_positions), clicks.reshape(b, -1, n_positions)
    return ((clk3 + m * _position_means(imp3, clk3)) / (imp3 + m)).reshape(b, -1)


def prior_strength(log: BanditLog) -> float:
    """The reward model's prior strength m by the beta-binomial method of moments.

    Per cell c with n_c impressions and rate r_c, and its position's mean μ: E[(r_c − μ)²] ≈ σ² + μ(1−μ)/n_c,
    so σ² (the spread of true cell rates) is the mean excess; a Beta prior of mean μ and strength m has
    variance μ(1−μ)/(m+1). No excess spread means full pooling (the upper clip).
    """
    c_n = log.n_actions * log.n_positions
    imps = np.bincount(log.cell, minlength=c_n).astype(np.float64)
    clicks = np.bincount(log.cell, weights=log.reward, minlength=c_n)
    p_n = log.n_positions
    mu = np.broadcast_to(_position_means(imps.reshape(1, -1, p_n), clicks.reshape(1, -1, p_n)),
                         (1, log.n_actions, p_n)).ravel()
    seen = imps > 0
    rate = clicks[seen] / imps[seen]
    binom = mu[seen] * (1 - mu[seen])
    excess = float(np.mean((rate - mu[seen]) ** 2 - binom / imps[seen]))
    if excess <= 0 or not np.isfinite(excess):
        return _M_RANGE[1]
    return float(np.clip(np.mean(binom) / excess - 1.0, *_M_RANGE))


def fit_reward_model(log: BanditLog, strength: float | None = None) -> np.ndarray:
    """q̂ (A, P): the DM/DR reward model fitted on ``log`` (see the module docstring); ``strength`` is the
    prior strength m (default: :func:`prior_strength`)."""
    m = prior_strength(log) if strength is None else float(strength)
    c_n = log.n_actions * log.n_positions
    imps = np.bincount(log.cell, minlength=c_n).astype(np.float64)
    clicks = np.bincount(log.cell, weights=log.reward, minlength=c_n)
    return _cell_rates(imps[None], clicks[None], log.n_positions, m)[0].reshape(log.n_actions, log.n_positions)


# -------------------------------------------------------------------------------------- estimators
def _values(s: np.ndarray, d: _Design, m: float) -> dict[str, np.ndarray]:
    """Every estimator (and the on-policy mean) from sums ``s`` (b, K) of one row-weighting each."""
    c_n, n = d.cells, d.n
    imps, clicks, wcell = (s[:, 3 + k * c_n: 3 + (k + 1) * c_n] for k in range(3))
    q = _cell_rates(imps, clicks, d.n_positions, m)
    target = s[:, 3 + 3 * c_n:]
    if d.shared is not None:  # π is the same every row: its mass per cell is π(a, p) times position counts
        target = d.shared[None, :] * np.tile(target, d.n_actions)
    with np.errstate(invalid="ignore", divide="ignore"):
        snipw = s[:, 0] / s[:, 1]
    dm_v = (q * target).sum(axis=1) / n
    return {"ipw": s[:, 0] / n, "snipw": snipw, "dm": dm_v, "dr": dm_v + (s[:, 0] - (q * wcell).sum(axis=1)) / n,
            "on_policy": s[:, 2] / n}


def _bootstrap_counts(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks (b, n) of bootstrap counts: how often each row is drawn in each resample (n draws with
    replacement). Blocks bound memory to :data:`_BLOCK_ENTRIES`; the draws depend only on (n, resamples, seed)."""
    rng = component_rng(seed, "analysis.ope.bootstrap")
    block = max(1, _BLOCK_ENTRIES // n)
    for start in range(0, resamples, block):
        b = min(block, resamples - start)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def _check_options(names: Sequence[str], resamples: int, alpha: float) -> None:
    allowed = (*ESTIMATORS, "on_policy")
    for name in names:
        if name not in allowed:
            raise RecloopInputError(f"unknown estimator {clip(name)!r}.{did_you_mean(name, allowed)} Allowed: "
                                    f"{', '.join(ESTIMATORS)}.", key="estimators")
    if not 0 <= resamples <= MAX_RESAMPLES:
        raise RecloopInputError(f"resamples must be in [0, {MAX_RESAMPLES}], not {resamples}.", key="resamples")
    if not 0 < alpha < 1:
        raise RecloopInputError(f"alpha must be in (0, 1), not {alpha}.", key="alpha")


def evaluate(log: BanditLog, action_dist: np.ndarray, estimators: Sequence[str] = ESTIMATORS, *,
             resamples: int = DEFAULT_RESAMPLES, alpha: float = 0.05, seed: int = 0,
             strength: float | None = None) -> dict[str, Estimate]:
    """Estimate the target policy's value with each of ``estimators`` (see :data:`ESTIMATORS`).

    ``action_dist``: (n or 1, A, P), the target's probability of each action at each position per round.
    Intervals are bootstrap percentile intervals at level 1 − ``alpha`` from ``resamples`` resamples of the
    rows, drawn from ``seed`` (the same resamples for every estimator; 0 resamples gives NaN bounds).
    ``strength`` fixes the reward model's prior strength (default: :func:`prior_strength`).
    """
    _check_options(estimators, resamples, alpha)
    d = _design(log, check_action_dist(log, action_dist))
    m = prior_strength(log) if strength is None else float(strength)
    point = _values(d.sums(np.ones((1, d.n))), d, m)
    boot = [_values(d.sums(c), d, m) for c in _bootstrap_counts(d.n, resamples, seed)]
    out = {}
    for name in estimators:
        lo = hi = float("nan")
        if boot:
            draws = np.concatenate([b[name] for b in boot])
            if np.isfinite(draws).any():
                lo, hi = (float(x) for x in np.nanquantile(draws, [alpha / 2, 1 - alpha / 2]))
        out[name] = Estimate(float(point[name][0]), lo, hi)
    return out


def ipw(log: BanditLog, action_dist: np.ndarray, **kwargs) -> Estimate:
    """Inverse propensity weighting, mean(w r), with its bootstrap interval (options as :func:`evaluate`)."""
    return evaluate(log, action_dist, ["ipw"], **kwargs)["ipw"]


def snipw(log: BanditLog, action_dist: np.ndarray, **kwargs) -> Estimate:
    """Self-normalised IPW, Σ w r / Σ w, with its bootstrap interval (options as :func:`evaluate`)."""
    return evaluate(log, action_dist, ["snipw"], **kwargs)["snipw"]


def dm(log: BanditLog, action_dist: np.ndarray, **kwargs) -> Estimate:
    """Direct method with the cell-rate reward model, with its bootstrap interval (options as :func:`evaluate`)."""
    return evaluate(log, action_dist, ["dm"], **kwargs)["dm"]


def dr(log: BanditLog, action_dist: np.ndarray, **kwargs) -> Estimate:
    """Doubly robust: DM plus the IPW-weighted residuals, with its bootstrap interval (options as :func:`evaluate`)."""
    return evaluate(log, action_dist, ["dr"], **kwargs)["dr"]


def on_policy(log: BanditLog, **kwargs) -> Estimate:
    """The logging policy's own value, the mean reward of ``log``, with its bootstrap interval."""
    dist = np.full((1, log.n_actions, log.n_positions), 1.0 / log.n_actions)
    return evaluate(log, dist, ["on_policy"], **kwargs)["on_policy"]


# --------------------------------------------------------------------------------- target policies
def uniform_policy(n_actions: int, n_positions: int) -> np.ndarray:
    """(1, A, P): a uniform random slate (recloop's ``random`` policy) shows each item at each position
    with probability 1/A."""
    return np.full((1, n_actions, n_positions), 1.0 / n_actions)


def bernoulli_ts_policy(alpha: np.ndarray, beta: np.ndarray, n_positions: int, *, samples: int = 100_000,
                        seed: int = 0) -> np.ndarray:
    """(1, A, P): Bernoulli Thompson sampling's action distribution by Monte Carlo.

    Each draw samples θ_i ~ Beta(alpha_i, beta_i) for every item and shows the P items with the largest θ
    at positions 0..P-1; the result is the share of ``samples`` draws with item a at position p.
    """
    alpha, beta = np.asarray(alpha, np.float64), np.asarray(beta, np.float64)
    a_n = len(alpha)
    if alpha.shape != beta.shape or alpha.ndim != 1 or not 0 < n_positions <= a_n:
        raise RecloopInputError(f"alpha and beta need one value per item and at least {n_positions} items "
                                f"(got {alpha.shape} and {beta.shape}).", key="alpha")
    if not (np.all(np.isfinite(alpha)) and np.all(np.isfinite(beta)) and alpha.min() > 0 and beta.min() > 0):
        raise RecloopInputError("alpha and beta must be finite and > 0.", key="alpha")
    rng = component_rng(seed, "analysis.ope.bernoulli_ts")
    counts = np.zeros(a_n * n_positions)
    block = max(1, _BLOCK_ENTRIES // (4 * a_n))
    for start in range(0, samples, block):
        theta = rng.beta(alpha, beta, size=(min(block, samples - start), a_n))
        top = np.argpartition(-theta, n_positions - 1, axis=1)[:, :n_positions]
        order = np.argsort(-np.take_along_axis(theta, top, axis=1), axis=1)
        ranked = np.take_along_axis(top, order, axis=1)
        counts += np.bincount((ranked * n_positions + np.arange(n_positions)).ravel(), minlength=len(counts))
    return (counts / samples).reshape(1, a_n, n_positions)


class RandomTarget(Params):
    """``type: random``: uniform random slates."""


class BernoulliTSTarget(Params):
    """``type: bernoulli_ts``: Bernoulli Thompson sampling with fixed Beta beliefs (see the module doc)."""

    alpha: list[float] | None = Field(None, description="alpha_i per item (default: obp's ZOZOTOWN prior)")
    beta: list[float] | None = Field(None, description="beta_i per item (default: obp's ZOZOTOWN prior)")
    campaign: Literal["all", "men", "women"] = Field("all", description="the campaign of obp's prior")
    samples: int = Field(100_000, ge=1, le=10_000_000, description="Monte Carlo draws of the slate")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the Monte Carlo draws")


TARGET_TYPES: dict[str, type[Params]] = {"random": RandomTarget, "bernoulli_ts": BernoulliTSTarget}


def target_dist(params: Params, log: BanditLog) -> np.ndarray:
    """The action distribution (1, A, P) of a target policy's ``params`` on ``log``'s actions and positions."""
    if isinstance(params, BernoulliTSTarget):
        if (params.alpha is None) != (params.beta is None):
            raise RecloopInputError("give both alpha and beta, or neither (obp's prior).", key="alpha")
        a, b = (params.alpha, params.beta) if params.alpha is not None else obd_prior(params.campaign)
        if len(a) != log.n_actions:
            raise RecloopInputError(f"{len(a)} alpha values but the log has {log.n_actions} actions.", key="alpha")
        return bernoulli_ts_policy(a, b, log.n_positions, samples=params.samples, seed=params.seed)
    return uniform_policy(log.n_actions, log.n_positions)


def _policy_blocks(data: dict, file: str) -> dict[str, dict]:
    """The ``policies:`` mapping of a scenario-like file (or its single ``policy:``, named by its type)."""
    pols = data.get("policies")
    if pols is None and isinstance(data.get("policy"), dict):
        pols = {str(data["policy"].get("type", "policy")): data["policy"]}
    if not isinstance(pols, dict) or not pols:
        raise RecloopInputError("needs a 'policies:' mapping of name -> {type: ...} (or one 'policy:'); OPE "
                                f"evaluates the types {', '.join(TARGET_TYPES)}.", file=file, key="policies")
    for name, cfg in pols.items():
        if not isinstance(cfg, dict) or not isinstance(cfg.get("type"), str):
            raise RecloopInputError("each policy needs a mapping with a 'type:' naming it (one of "
                                    f"{', '.join(TARGET_TYPES)}).", file=file, key=f"policies.{clip(name)}")
    return {str(k): v for k, v in pols.items()}


def _target_params(cfg: dict, file: str, key: str) -> Params:
    """``cfg`` validated as the Params of its target type (one paragraph per bad key)."""
    model = TARGET_TYPES[cfg["type"]]
    try:
        return model.model_validate({k: v for k, v in cfg.items() if k != "type"})
    except ValidationError as exc:
        err = exc.errors()[0]
        sub = ".".join(str(x) for x in err["loc"])
        hint = did_you_mean(sub, model.model_fields) if err["type"] == "extra_forbidden" else ""
        allowed = ", ".join(model.model_fields) or "none"
        raise RecloopInputError(f"{clip(err['msg'])}.{hint} Keys of type {cfg['type']}: {allowed}.", file=file,
                                key=f"{key}.{sub}") from None


def read_targets(path: str | Path, log: BanditLog) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The action distributions of the target policies in the YAML file ``path`` (a scenario, ``extends``
    resolved), for ``log``'s actions and positions; and the policies skipped (name -> type).

    Policies of the types in :data:`TARGET_TYPES` are evaluated; other registered recloop policy types need
    users and items a context-free log lacks, so they are skipped; anything else is an error.
    """
    from recloop import registry
    from recloop.sim.scenario_yaml import load_raw

    file = str(path)
    targets, skipped = {}, {}
    for name, cfg in _policy_blocks(load_raw(path), file).items():
        key, typ = f"policies.{name}", cfg["type"]
        if typ not in TARGET_TYPES:
            known = registry.names("policy")
            if typ in known:
                skipped[name] = typ
                continue
            raise RecloopInputError(f"unknown policy type {clip(typ)!r}.{did_you_mean(typ, [*TARGET_TYPES, *known])}"
                                    f" OPE evaluates the types {', '.join(TARGET_TYPES)}.", file=file,
                                    key=f"{key}.type")
        params = _target_params(cfg, file, key)
        try:
            targets[name] = target_dist(params, log)
        except RecloopInputError as exc:
            detail = f"{clip(exc.file, 300)}: {exc.detail}" if exc.file else exc.detail
            raise RecloopInputError(detail, file=file, key=f"{key}.{exc.key}" if exc.key else key) from None
    if not targets:
        what = ", ".join(f"{n} ({t})" for n, t in skipped.items())
        raise RecloopInputError(f"no policy here can act on a context-free log (skipped: {clip(what)}). OPE "
                                f"evaluates the types {', '.join(TARGET_TYPES)}.", file=file, key="policies")
    return targets, skipped


LOGGING = "(logging)"


def evaluate_log(log_spec: str | Path | BanditLog, policy_file: str | Path, estimators: Sequence[str] = ESTIMATORS,
                 *, resamples: int = DEFAULT_RESAMPLES, alpha: float = 0.05, seed: int = 0,
                 ) -> tuple[pl.DataFrame, dict[str, str]]:
    """What ``recloop ope`` computes: each target policy of ``policy_file`` evaluated on the log by each
    estimator, plus the logging policy's own mean reward (policy ``(logging)``, estimator ``on_policy``).

    Returns a frame with columns ``policy, estimator, value, lo, hi`` and the skipped policies (name -> type).
    """
    _check_options(estimators, resamples, alpha)
    log = log_spec if isinstance(log_spec, BanditLog) else load_log(log_spec)
    targets, skipped = read_targets(policy_file, log)
    rows = [(LOGGING, "on_policy", *on_policy(log, resamples=resamples, alpha=alpha, seed=seed))]
    for name, dist in targets.items():
        est = evaluate(log, dist, estimators, resamples=resamples, alpha=alpha, seed=seed)
        rows += [(name, e, *est[e]) for e in estimators]
    schema = {"policy": pl.String, "estimator": pl.String, "value": pl.Float64, "lo": pl.Float64, "hi": pl.Float64}
    return pl.DataFrame(rows, schema=schema, orient="row"), skipped
