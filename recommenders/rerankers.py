"""Re-rankers: pick a slate of k items from each user's m candidates (reference E-MMR, E-CALIB, E-FAIR).

Interface (``@register("reranker", name)``; a :class:`~recloop.component.Component` built as
``Cls(params)`` and bound with the run's build context)::

    rerank(users (n,), candidates (n, m) item ids (-1 = invalid), scores (n, m) float32 (-inf = invalid),
           k, view, *, step=0, history=None) -> (n, k) int64 item ids, -1 for empty slots

``view`` is the policy's :class:`~recloop.contracts.PlatformView` (observable item features, popularity).

A candidate is valid when its id is >= 0 and its score is a number above -inf. Inputs are never
modified. Greedy re-rankers run k steps, each vectorised over users and candidates (O(k·n·m) array work,
no Python loop over users, in row blocks that bound the temporaries); ties go to the higher base score,
then to the earlier candidate column. ``history`` is any object with
``csr(users) -> (indptr, indices)`` (e.g. :class:`recloop.sim.state.History`).

Optional hook: :meth:`Reranker.fit` is called by the pipeline with the training log at each retrain;
``popularity_penalty`` takes φ from it (the Elliot convention: φ of the training log used at t).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from pydantic import ConfigDict, Field

from recloop.component import Component
from recloop.contracts import PlatformView
from recloop.registry import Params, register

NEG = -np.inf


# --------------------------------------------------------------------------------------------- helpers
def _prepare(candidates: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidate ids int64, scores float64 with -inf where invalid, valid mask) — fresh arrays."""
    cand = np.asarray(candidates)
    if cand.ndim != 2:
        raise ValueError(f"candidates must be 2-D (n, m), got shape {cand.shape}")
    s = np.asarray(scores)
    if s.shape != cand.shape:
        raise ValueError(f"scores shape {s.shape} differs from candidates shape {cand.shape}")
    cand = cand.astype(np.int64)  # a copy
    s = s.astype(np.float64)  # a copy
    valid = (cand >= 0) & ~np.isnan(s) & (s > NEG)
    s[~valid] = NEG
    return cand, s, valid


def _by_score(cand: np.ndarray, s: np.ndarray, valid: np.ndarray):
    """Reorder each row's candidates by descending score (stable), so greedy ties → higher base score."""
    order = np.argsort(np.where(valid, -s, np.inf), axis=1, kind="stable")
    return (np.take_along_axis(cand, order, axis=1), np.take_along_axis(s, order, axis=1),
            np.take_along_axis(valid, order, axis=1))


def minmax_rows(s: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-row min-max normalisation of the valid entries to [0, 1]; a row whose valid scores are all
    equal maps them to 1. Invalid entries become -inf."""
    lo = np.where(valid, s, np.inf).min(axis=1, keepdims=True)
    hi = np.where(valid, s, NEG).max(axis=1, keepdims=True)
    span = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(span > 0, (s - lo) / np.where(span > 0, span, 1.0), 1.0)
    return np.where(valid, r, NEG)


def topk_by_value(cand: np.ndarray, value: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """(n, k) ids of the k best valid candidates by ``value`` (ties → earlier column), -1 padded."""
    n, m = cand.shape
    out = np.full((n, k), -1, dtype=np.int64)
    if n == 0 or m == 0 or k == 0:
        return out
    key = np.where(valid, -value, np.inf)
    order = np.argsort(key, axis=1, kind="stable")[:, : min(k, m)]
    ok = np.take_along_axis(valid, order, axis=1)
    out[:, : order.shape[1]] = np.where(ok, np.take_along_axis(cand, order, axis=1), -1)
    return out


def _greedy(cand: np.ndarray, valid: np.ndarray, k: int, objective, commit) -> np.ndarray:
    """Generic greedy selection over k steps, vectorised over rows.

    ``objective(t) -> (n, m)`` gives the marginal value of each candidate at step t; ``commit(j)`` is told
    the column picked in every row (rows with nothing left pick an unavailable column, whose update is
    harmless because those rows never pick again).
    """
    n, m = cand.shape
    out = np.full((n, k), -1, dtype=np.int64)
    avail = valid.copy()
    rows = np.arange(n)
    for t in range(min(k, m)):
        if not avail.any():
            break
        obj = np.where(avail, objective(t), NEG)
        j = np.argmax(obj, axis=1)
        ok = avail[rows, j]
        out[:, t] = np.where(ok, cand[rows, j], -1)
        avail[rows, j] = False
        commit(j)
    return out


def _row_blocks(n: int, per_row: int, budget: int = 1 << 21) -> list[slice]:
    """Row blocks whose (rows x per_row) temporaries stay within ``budget`` entries."""
    step = max(1, budget // max(per_row, 1))
    return [slice(lo, min(lo + step, n)) for lo in range(0, n, step)] or [slice(0, 0)]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def history_genre_distribution(
    history, users: np.ndarray, genres: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """p(g|u) = mean of p(g|i) over the user's history (w ≡ 1, M-CALKL); returns (p (n, G), has_history)."""
    users = np.asarray(users, dtype=np.int64)
    G = genres.shape[1]
    if history is None:
        return np.zeros((len(users), G)), np.zeros(len(users), bool)
    indptr, indices = history.csr(users)
    counts = np.diff(indptr)
    indices = np.asarray(indices, dtype=np.int64)
    keep = indices < genres.shape[0]
    rows = np.repeat(np.arange(len(users)), counts)[keep]
    H = sp.csr_matrix((np.ones(len(rows)), (rows, indices[keep])), shape=(len(users), genres.shape[0]))
    acc = np.asarray(H @ np.asarray(genres, dtype=np.float64))
    n_kept = np.bincount(rows, minlength=len(users))
    has = n_kept > 0
    acc[has] /= n_kept[has, None]
    return acc, has


def calibration_kl(p: np.ndarray, q: np.ndarray, alpha: float = 0.01) -> np.ndarray:
    """C_KL(p, q̃) = Σ_g p log(p / q̃), q̃ = (1−α)q + αp, over the last axis; p = 0 terms are 0."""
    qt = (1.0 - alpha) * q + alpha * p
    pos = p > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(pos, p * np.log(np.where(pos, p, 1.0) / np.where(pos, qt, 1.0)), 0.0)
    return terms.sum(axis=-1)


# ------------------------------------------------------------------------------------------------ base
class Reranker(Component):
    """Base class for re-rankers (registered with ``@register("reranker", name)``); ``world`` in their
    methods is the platform view (:class:`~recloop.contracts.PlatformView`)."""

    class Params(Params):
        pass

    def fit(self, data, world, *, step: int = 0, rng=None, warm_start: bool = False) -> None:
        """Optional: see the training log at each retrain (``TrainingData``). Default: nothing."""

    def update(self, feedback, world) -> None:
        """Optional online hook (per cycle feedback). Default: nothing."""

    def rerank(self, users: np.ndarray, candidates: np.ndarray, scores: np.ndarray, k: int, world, *,
               step: int = 0, history=None) -> np.ndarray:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@register("reranker", "identity")
class Identity(Reranker):
    """No re-ranking: the k best candidates by base score (ties → earlier candidate)."""

    def rerank(self, users, candidates, scores, k, world, *, step=0, history=None):
        cand, s, valid = _prepare(candidates, scores)
        return topk_by_value(cand, s, valid, int(k))


# ------------------------------------------------------------------------------------------------- MMR
@register("reranker", "mmr")
class MMR(Reranker):
    """Maximal marginal relevance (Carbonell & Goldstein 1998; E-MMR).

    Repeatedly add argmax_{i∉S} λ·rel(i) − (1−λ)·max_{j∈S} sim(i, j) (the penalty is 0 while S is empty).
    rel = the base scores min-max normalised per user over the valid candidates (``normalize=True``; a
    user whose scores are all equal gets rel = 1), so λ means the same for every base policy; sim = cosine
    of the items' attribute vectors (``world.items.attrs``, the simulator's latent attributes) or of their
    genre distributions (``similarity="genres"``).
    """

    class Params(Params):
        model_config = ConfigDict(populate_by_name=True)
        lambda_: float = Field(0.5, alias="lambda", ge=0.0, le=1.0, description="relevance weight λ")
        normalize: bool = Field(True, description="min-max normalise the base scores per user")
        similarity: Literal["attrs", "genres"] = "attrs"

    def rerank(self, users, candidates, scores, k, world, *, step=0, history=None):
        cand, s, valid = _by_score(*_prepare(candidates, scores))
        rel = minmax_rows(s, valid) if self.params.normalize else s
        feats = world.items.attrs if self.params.similarity == "attrs" else world.items.genres
        unit = _unit_rows(feats[: world.items.n]).astype(np.float32)
        out = np.full((cand.shape[0], int(k)), -1, dtype=np.int64)
        for blk in _row_blocks(cand.shape[0], cand.shape[1] * (unit.shape[1] + 4)):
            out[blk] = self._block(cand[blk], rel[blk], valid[blk], int(k), unit)
        return out

    def _block(self, cand, rel, valid, k, unit):
        lam = float(self.params.lambda_)
        A = unit[np.maximum(cand, 0)]  # (n, m, d) unit vectors
        rows = np.arange(cand.shape[0])
        maxsim = np.full(cand.shape, NEG)
        base = lam * np.where(valid, rel, 0.0)

        def objective(t: int) -> np.ndarray:
            return base if t == 0 else base - (1.0 - lam) * maxsim

        def commit(j: np.ndarray) -> None:
            sim = np.matmul(A, A[rows, j][:, :, None])[:, :, 0]
            np.maximum(maxsim, sim, out=maxsim)

        return _greedy(cand, valid, k, objective, commit)


# ------------------------------------------------------------------------------------------ calibrated
@register("reranker", "calibrated")
class Calibrated(Reranker):
    """Steck's calibrated re-ranking, greedy (E-CALIB; Steck 2018, the Cornac/Informfully greedy-KL).

    Add the i maximising (1−λ)·Σ_{j∈S∪i} s(j) − λ·C_KL(p, q̃(S∪i)): p = the user's history genre
    distribution (mean p(g|i) over ``history``), q = mean p(g|i) over the slate, q̃ = (1−α)q + αp
    (α = ``alpha`` = 0.01). Scores are used raw (as in Steck) unless ``normalize=True`` (per-user min-max).
    Users without history (or ``history=None``) are not calibrated: their slate is the top-k by score.
    """

    class Params(Params):
        model_config = ConfigDict(populate_by_name=True)
        lambda_: float = Field(0.5, alias="lambda", ge=0.0, le=1.0, description="calibration weight λ")
        alpha: float = Field(0.01, ge=0.0, le=1.0, description="smoothing of q toward p")
        normalize: bool = False

    def rerank(self, users, candidates, scores, k, world, *, step=0, history=None):
        cand, s, valid = _by_score(*_prepare(candidates, scores))
        rel = minmax_rows(s, valid) if self.params.normalize else s
        rel = np.where(valid, rel, 0.0)
        users = np.asarray(users, dtype=np.int64)
        genres = np.asarray(world.items.genres[: world.items.n], dtype=np.float64)
        out = np.full((cand.shape[0], int(k)), -1, dtype=np.int64)
        for blk in _row_blocks(cand.shape[0], cand.shape[1] * (genres.shape[1] + 4)):
            p, has = history_genre_distribution(history, users[blk], genres)
            out[blk] = self._block(cand[blk], rel[blk], valid[blk], int(k), genres, p, has)
        return out

    def _block(self, cand, rel, valid, k, genres, p, has):
        lam, alpha = float(self.params.lambda_), float(self.params.alpha)
        Gc = genres[np.maximum(cand, 0)].astype(np.float32)  # (n, m, G)
        rows = np.arange(cand.shape[0])
        acc = np.zeros(p.shape, np.float32)  # Σ p(g|j) over the slate so far
        w_kl = np.where(has, lam, 0.0)[:, None]
        w_rel = np.where(has, 1.0 - lam, 1.0)[:, None]  # no history: plain relevance
        ap = (alpha * p[:, None, :]).astype(np.float32)
        p_col = p[:, :, None].astype(np.float32)
        buf = np.empty_like(Gc)
        # −C_KL(p, q̃) = Σ_g p log q̃ − Σ_g p log p; the second sum is constant per user, so only the
        # first is needed for the argmax (terms with p_g = 0 vanish; q̃ > 0 wherever p_g > 0).

        def objective(t: int) -> np.ndarray:
            q = np.add(acc[:, None, :], Gc, out=buf)  # q̃ = (1−α)(acc + p(g|i))/(t+1) + αp, in place
            q *= np.float32((1.0 - alpha) / (t + 1))
            q += ap
            np.maximum(q, np.float32(1e-30), out=q)
            np.log(q, out=q)
            cross = np.matmul(q, p_col)[:, :, 0]
            return w_rel * rel + w_kl * cross

        def commit(j: np.ndarray) -> None:
            acc[:] += Gc[rows, j]

        return _greedy(cand, valid, k, objective, commit)


# ---------------------------------------------------------------------------------------------- FA*IR
def fair_mtable(k: int, p: float, alpha: float) -> np.ndarray:
    """Unadjusted FA*IR table: m(i) = binom.ppf(α, i, p) for i = 1..k (minimum protected in the top i)."""
    from scipy.stats import binom

    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if p <= 0.0:
        return np.zeros(k, dtype=np.int64)
    m = binom.ppf(alpha, np.arange(1, k + 1), min(p, 1.0))
    return np.maximum(np.nan_to_num(m, nan=0.0), 0).astype(np.int64)


def fair_fail_probability(mtable: np.ndarray, p: float) -> float:
    """P(a ranking whose positions are i.i.d. protected with probability p fails some prefix test).

    Exact dynamic programme over the protected count (O(k²)).
    """
    k = len(mtable)
    dist = np.zeros(k + 1)
    dist[0] = 1.0
    for i in range(k):
        new = dist * (1.0 - p)
        new[1:] += dist[:-1] * p
        new[: int(mtable[i])] = 0.0
        dist = new
    return float(max(0.0, 1.0 - dist.sum()))


@lru_cache(maxsize=256)
def _adjusted(k: int, p: float, alpha: float, rule: str) -> tuple[float, tuple[int, ...]]:
    top = fair_mtable(k, p, alpha)
    if fair_fail_probability(top, p) <= alpha:
        return alpha, tuple(top.tolist())
    # bisection on α_c: fail probability is a non-decreasing step function of α_c
    lo, hi = 0.0, alpha
    below, above = fair_mtable(k, p, 0.0), top
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        mt = fair_mtable(k, p, mid)
        if fair_fail_probability(mt, p) <= alpha:
            lo, below = mid, mt
        else:
            hi, above = mid, mt
    if rule == "closest":
        d_below = alpha - fair_fail_probability(below, p)
        d_above = fair_fail_probability(above, p) - alpha
        if d_above < d_below:
            return hi, tuple(above.tolist())
    return lo, tuple(below.tolist())


def fair_adjusted_mtable(
    k: int, p: float, alpha: float, rule: Literal["closest", "conservative"] = "closest"
) -> tuple[np.ndarray, float]:
    """Multiple-testing-adjusted FA*IR table and its α_c (Zehlike et al. 2017, ``create_adjusted_mtable``).

    The fail probability of a table (the chance that a ranking whose positions are protected i.i.d. with
    probability p fails some prefix test) is computed exactly. If the unadjusted table already fails with
    probability ≤ α it is kept; otherwise α_c is bisected and, as in ``fairsearchcore``, the table whose
    fail probability is closest to α is returned (``rule="closest"``, it may exceed α slightly), or the
    largest table with fail probability ≤ α (``rule="conservative"``).
    Matches fairsearchcore's tests: (20, 0.25, 0.1) → [0×8, 1×7, 2×5], fail probability 0.105152.
    """
    a, mt = _adjusted(int(k), float(p), float(alpha), rule)
    return np.asarray(mt, dtype=np.int64), a


@register("reranker", "fair")
class FairTopK(Reranker):
    """FA*IR top-k (Zehlike et al. 2017; E-FAIR) with protected items = ``world.items.group == 1``.

    At position i, if the slate holds fewer than m(i) protected items take the best remaining protected
    candidate, otherwise the best remaining candidate (a protected one on a score tie, as in
    ``fairsearchcore``). m(i) = binom.ppf(α_c, i, p); α_c = α, or the multiple-testing-adjusted value
    (``adjust=True``, see :func:`fair_adjusted_mtable`). p defaults to the protected share of the live
    catalog. When no protected candidate is left the best non-protected one fills the slot (the ranking
    is then not FA*IR-fair).
    """

    class Params(Params):
        p: float | None = Field(None, gt=0.0, lt=1.0, description="target protected share (None: catalog)")
        alpha: float = Field(0.1, gt=0.0, lt=1.0, description="significance level α")
        adjust: bool = Field(True, description="multiple-testing adjustment of α")
        adjust_rule: Literal["closest", "conservative"] = "closest"

    def mtable(self, k: int, world) -> np.ndarray:
        p = self.params.p
        if p is None:
            n = int(world.items.n)
            p = float(np.mean(world.items.group[:n] == 1)) if n else 0.0
        if p <= 0.0:
            return np.zeros(k, dtype=np.int64)
        p = round(float(p), 12)
        if self.params.adjust:
            return fair_adjusted_mtable(k, p, self.params.alpha, self.params.adjust_rule)[0]
        return fair_mtable(k, p, self.params.alpha)

    def rerank(self, users, candidates, scores, k, world, *, step=0, history=None):
        k = int(k)
        cand, s, valid = _prepare(candidates, scores)
        n, m = cand.shape
        out = np.full((n, k), -1, dtype=np.int64)
        if n == 0 or m == 0 or k == 0:
            return out
        mt = self.mtable(k, world)
        prot = valid & (np.asarray(world.items.group)[np.maximum(cand, 0)] == 1)
        # each user's two queues (protected / not), sorted by score, ties → earlier column
        order = np.argsort(np.where(valid, -s, np.inf), axis=1, kind="stable")
        s_o = np.take_along_axis(s, order, axis=1)
        c_o = np.take_along_axis(cand, order, axis=1)
        p_o = np.take_along_axis(prot, order, axis=1)
        v_o = np.take_along_axis(valid, order, axis=1)
        qp = np.argsort(~(p_o & v_o), axis=1, kind="stable")  # protected first, in score order
        qn = np.argsort(~(~p_o & v_o), axis=1, kind="stable")
        n_p, n_n = (p_o & v_o).sum(axis=1), (~p_o & v_o).sum(axis=1)
        ip = np.zeros(n, dtype=np.int64)
        iN = np.zeros(n, dtype=np.int64)
        rows = np.arange(n)
        for t in range(min(k, m)):
            has_p, has_n = ip < n_p, iN < n_n
            jp = qp[rows, np.minimum(ip, m - 1)]
            jn = qn[rows, np.minimum(iN, m - 1)]
            take_p = has_p & ((ip < mt[t]) | ~has_n | (s_o[rows, jp] >= s_o[rows, jn]))
            take_n = ~take_p & has_n
            out[:, t] = np.where(take_p, c_o[rows, jp], np.where(take_n, c_o[rows, jn], -1))
            ip += take_p
            iN += take_n
        return out


# ------------------------------------------------------------------------------------ popularity penalty
@register("reranker", "popularity_penalty")
class PopularityPenalty(Reranker):
    """Popularity-penalised re-scoring: value = rel − w·pen(φ(i)), top-k by value.

    With ``normalize=True`` (default) rel is the per-user min-max normalised base score and
    pen = log(1+φ)/log(1+max φ), both in [0, 1], so ``weight`` is on the same scale for every base policy;
    with ``normalize=False`` it is the raw score minus w·log(1+φ). φ(i) (distinct users who interacted with
    i) comes from, in order: the training log passed to :meth:`fit`; the platform view's ``popularity``;
    the ``history`` object (``to_coo()``, recomputed each call); otherwise 0 (no penalty). Items beyond the
    known φ count as φ = 0.
    """

    class Params(Params):
        weight: float = Field(0.25, ge=0.0, description="penalty weight w")
        normalize: bool = True

    def __init__(self, params: Params | None = None):
        super().__init__(params)
        self.popularity: np.ndarray | None = None

    def fit(self, data, world, *, step: int = 0, rng=None, warm_start: bool = False) -> None:
        self.popularity = np.asarray(data.popularity(), dtype=np.float64)

    def _phi(self, world, history) -> np.ndarray:
        if self.popularity is not None:
            return self.popularity
        if isinstance(world, PlatformView):
            return np.asarray(world.popularity, dtype=np.float64)
        if history is not None and hasattr(history, "to_coo"):
            u, i = history.to_coo()
            if len(u):
                n_items = int(max(int(i.max()) + 1, world.items.n))
                key = np.unique(np.asarray(u, np.int64) * n_items + np.asarray(i, np.int64))
                return np.bincount(key % n_items, minlength=n_items).astype(np.float64)
        return np.zeros(int(world.items.n), dtype=np.float64)

    def rerank(self, users, candidates, scores, k, world, *, step=0, history=None):
        cand, s, valid = _prepare(candidates, scores)
        phi = self._phi(world, history)
        safe = np.maximum(cand, 0)
        phi_c = np.zeros(cand.shape)
        if len(phi):
            phi_c = np.where(safe < len(phi), phi[np.minimum(safe, len(phi) - 1)], 0.0)
        pen = np.log1p(np.maximum(phi_c, 0.0))
        if self.params.normalize:
            top = np.log1p(phi.max()) if len(phi) and phi.max() > 0 else 1.0
            rel, pen = minmax_rows(s, valid), pen / top
        else:
            rel = s
        value = np.where(valid, rel - self.params.weight * pen, NEG)
        return topk_by_value(cand, value, valid, int(k))

    def state_dict(self) -> dict[str, Any]:
        return {"popularity": None if self.popularity is None else self.popularity.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pop = state.get("popularity")
        self.popularity = None if pop is None else np.asarray(pop, dtype=np.float64).copy()
