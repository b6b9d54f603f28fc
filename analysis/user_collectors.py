"""User-side metric components (registered as ``metric``): calibration, diversity, homogenization,
polarization, drift and utility (with regret).

They follow the protocol of :class:`recloop.analysis.collectors.MetricComponent`; pair and user-history
metrics work on the suite's fixed samples (``metrics.pairs``, ``metrics.user_sample``).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from recloop.analysis import metric_kernels as MK
from recloop.analysis import user_metrics as UM
from recloop.analysis.collectors import MetricComponent
from recloop.limits import MAX_SAMPLE
from recloop.registry import Params, register
from recloop.rng import component_rng
from recloop.sim import kernels
from recloop.sim.pool import default_workers, parallel_rows


def _mean_pair_jaccard(indptr, items, pairs) -> float:
    """UM.mean_pair_jaccard for a CSR whose rows are sorted and duplicate-free (History.csr), by a merge
    per pair instead of sorting every (pair, item) key."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    if not kernels.HAVE_NUMBA or len(pairs) == 0:
        return UM.mean_pair_jaccard(indptr, items, pairs)
    out = np.empty(len(pairs), np.float64)
    kernels.pair_jaccard(np.asarray(indptr, np.int64), np.asarray(items, np.int64), pairs, out)
    return float(out.mean())


def _history_pair_jaccard(history, pairs: np.ndarray) -> float:
    """Mean Jaccard of the pairs' histories: one CSR row per pair member (no unique/search step)."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    if not kernels.HAVE_NUMBA:
        users = np.unique(pairs)
        indptr, items = history.csr(users)
        return _mean_pair_jaccard(indptr, items, np.searchsorted(users, pairs))
    indptr, items = history.csr(pairs.ravel())
    return _mean_pair_jaccard(indptr, items, np.arange(pairs.size, dtype=np.int64).reshape(-1, 2))


def _slate_pair_jaccard(slates: np.ndarray, pos: np.ndarray) -> float:
    """Mean Jaccard of the slates of row pairs ``pos`` (empty slots, -1, skipped)."""
    if MK.HAVE_NUMBA and len(pos):
        out = np.empty(len(pos), np.float64)
        MK.slate_pair_jaccard(np.ascontiguousarray(slates, np.int64), np.ascontiguousarray(pos, np.int64), out)
        return float(out.mean())
    need, local = np.unique(pos, return_inverse=True)  # only the paired users' slates
    sl = np.sort(slates[need], axis=1)  # sorted rows (empty slots -1 first, skipped): a CSR
    ip = np.arange(0, sl.size + 1, max(sl.shape[1], 1), dtype=np.int64)[: len(sl) + 1]
    return _mean_pair_jaccard(ip, sl.ravel(), local.reshape(-1, 2))


@register("metric", "calibration")
class Calibration(MetricComponent):
    """M-CALKL: Steck miscalibration of slates against each user's history genre mix (sampled users)."""

    METRICS = {"miscalibration": "M-CALKL mean C_KL(p‖q̃), α=0.01, uniform weights (sampled users)"}

    def compute(self, rec):
        w = rec.world
        sample = rec.user_sample
        if len(sample) == 0:
            return []
        idx = np.searchsorted(rec.users, sample)
        indptr, items = rec.history.csr(sample)
        lens = np.diff(indptr)
        owner = np.repeat(np.arange(len(sample)), lens)
        G = w.items.genres.shape[1]
        target = np.zeros((len(sample), G))
        np.add.at(target, owner, w.items.genres[items])
        ok = lens > 0
        if not ok.any():
            return []
        target = target[ok] / lens[ok, None]
        realised = UM.genre_distribution(rec.slates[idx][ok], w.items.genres[: w.items.n])
        return [("miscalibration", "", float(np.nanmean(UM.miscalibration(target, realised))))]


@register("metric", "diversity")
class Diversity(MetricComponent):
    """M-ILD (cosine on true attributes) and T-RECS AFSR, over sampled users."""

    METRICS = {"ild": "M-ILD mean intra-list cosine distance", "afsr": "AFSR mean attribute score range"}

    def compute(self, rec):
        sample = rec.user_sample
        if len(sample) == 0:
            return []
        sl = rec.slates[np.searchsorted(rec.users, sample)]
        attrs = rec.world.items.attrs[: rec.world.items.n]
        return [("ild", "", float(np.nanmean(UM.intra_list_diversity(sl, attrs)))), ("afsr", "", UM.afsr(sl, attrs))]


@register("metric", "homogenization")
class Homogenization(MetricComponent):
    """M-HOMOG: mean Jaccard of histories (and of slates) over fixed random user pairs, and over
    similar-user pairs (each sampled user with its most cosine-similar user under the policy's user
    factors). Report the similar-pair value relative to the ideal policy with
    :func:`recloop.analysis.compare.relative_to`."""

    METRICS = {
        "homogenization": "M-HOMOG mean Jaccard of histories over fixed random user pairs",
        "rec_similarity": "M-HOMOG mean Jaccard of this cycle's slates over the same pairs",
        "homogenization_similar": "M-HOMOG mean Jaccard of histories over similar-user pairs (policy factors; "
                                  "above 512 users the partner is the most similar in a random pool of 4,096)",
    }

    class Params(Params):
        pairs: int | None = Field(None, gt=0, le=MAX_SAMPLE,
                                  description="fixed random user pairs (default: the metrics block's pairs)")

    def setup(self, world, seed, config):
        rng = component_rng(seed, "metric.pairs")
        n = world.users.n
        p = self.params.pairs or config.pairs
        a = rng.integers(0, n, size=p)
        b = (a + rng.integers(1, max(n, 2), size=p)) % max(n, 1)
        self.pairs = np.stack([a, b], axis=1).astype(np.int64)
        self.sim_users = rng.choice(n, size=min(n, p), replace=False).astype(np.int64)

    def cycle_table(self) -> dict[str, dict[str, np.ndarray]]:
        """This cycle's similar-user pairs, kept by the run store (``similar_pairs.parquet``) so that the
        cross-run comparison with ideal measures the same pairs in both runs (M-HOMOG (ii))."""
        pairs = getattr(self, "_last_pairs", None)
        self._last_pairs = None
        if pairs is None:
            return {}
        return {"similar_pairs": {"user": pairs[:, 0], "partner": pairs[:, 1]}}

    def _similar_pairs(self, rec) -> np.ndarray:
        """Each sampled user with its most cosine-similar user under the policy's user factors; ties
        (and policies without user factors, whose users are all alike) are broken at random."""
        n = rec.world.users.n
        q = self.sim_users[self.sim_users < n]
        rng = component_rng(rec.seed, "metric.similar_pairs", rec.step)
        U = rec.policy.user_factors()
        if U is None:
            partner = (q + rng.integers(1, max(n, 2), size=len(q))) % n
        elif n <= SIMILAR_DENSE_USERS:
            U = U[:n].astype(np.float64)
            norms = np.linalg.norm(U, axis=1)
            Un = U / np.where(norms > 0, norms, 1)[:, None]
            sims = Un[q] @ Un.T
            sims[np.arange(len(q)), q] = -np.inf
            sims += rng.random(sims.shape) * 1e-9  # random tie-breaking
            partner = np.argmax(sims, axis=1)
        else:
            partner = _most_similar(U, q, n, rng)
        return np.stack([q, partner], axis=1)

    def compute(self, rec):
        rows = [("homogenization", "", _history_pair_jaccard(rec.history, self.pairs))]
        pos = np.searchsorted(rec.users, self.pairs)
        pos = np.minimum(pos, len(rec.users) - 1)
        both = (rec.users[pos] == self.pairs).all(axis=1)
        if both.any():
            rows.append(("rec_similarity", "", _slate_pair_jaccard(rec.slates, pos[both])))
        pairs = self._similar_pairs(rec)
        self._last_pairs = pairs
        rows.append(("homogenization_similar", "", _history_pair_jaccard(rec.history, pairs)))
        return rows


#: homogenization_similar: exact dense search up to this many users; beyond, each sampled user's
#: partner is the most similar among a random pool of at most SIMILAR_POOL users, streamed in blocks
SIMILAR_DENSE_USERS = 512
SIMILAR_POOL = 4096
_SIMILAR_BLOCK = 4096


def _unit_rows(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    norms = np.linalg.norm(X, axis=1)
    return X / np.where(norms > 0, norms, 1)[:, None]


def _most_similar(U: np.ndarray, q: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Most cosine-similar partner of each user in ``q`` among a random candidate pool (bounded
    memory and time: |q| x block float32 products). Candidates come in random order and the first
    maximum wins, so ties break at random."""
    cand = rng.permutation(n) if n <= SIMILAR_POOL else rng.choice(n, size=SIMILAR_POOL, replace=False)
    whole = len(cand) >= n  # every user is a candidate: normalise each row once (row-wise, same values)
    unit = _unit_rows(U[:n]).astype(np.float32) if whole else None
    Q = unit[q] if whole else _unit_rows(U[q]).astype(np.float32)
    slot = np.full(n, -1, np.int64)
    slot[cand] = np.arange(len(cand))
    self_slot = slot[q]  # where each sampled user sits in the pool (-1: not in it)
    best = np.full(len(q), -np.inf, np.float32)
    partner = np.zeros(len(q), np.int64)
    rows = np.arange(len(q))
    for lo in range(0, len(cand), _SIMILAR_BLOCK):
        c = cand[lo:lo + _SIMILAR_BLOCK]
        sims = Q @ (unit[c] if whole else _unit_rows(U[c]).astype(np.float32)).T
        mine = (self_slot >= lo) & (self_slot < lo + len(c))
        sims[rows[mine], self_slot[mine] - lo] = -np.inf  # not oneself
        j = np.argmax(sims, axis=1)
        v = sims[rows, j]
        better = v > best
        best[better] = v[better]
        partner[better] = c[j[better]]
    return partner


@register("metric", "polarization")
class Polarization(MetricComponent):
    """M-POLAR on opinions z_u = projection of true preferences on a fixed axis: the first principal
    component of the initial preferences (our choice). Variance, Esteban–Ray (10 bins, a=1.6... a=1),
    bimodality coefficient, and the multi-dimensional dispersion (trace of the covariance)."""

    METRICS = {
        "polarization_var": "M-POLVAR Var(z) of opinions on the fixed axis",
        "polarization_er": "M-ER Esteban–Ray index (10 bins, a=1, K=1)",
        "bimodality": "M-BC bimodality coefficient (>0.556 suggests two camps)",
        "preference_dispersion": "trace of the covariance of true preference vectors",
    }

    def setup(self, world, seed, config):
        x0 = world.users.prefs0[: world.users.n].astype(np.float64)
        x0 = x0 - x0.mean(axis=0)
        _, _, vt = np.linalg.svd(x0[: min(len(x0), 20000)], full_matrices=False)
        self.axis = vt[0]

    def compute(self, rec):
        x = rec.world.users.prefs[rec.users].astype(np.float64)
        z = x @ self.axis
        _, var = UM.polarization_variance(z)
        return [
            ("polarization_var", "", var),
            ("polarization_er", "", UM.esteban_ray(z, bins=10, a=1.0, K=1.0)),
            ("bimodality", "", UM.bimodality_coefficient(z)),
            ("preference_dispersion", "", float(np.trace(np.cov(x.T))) if len(x) > 1 else 0.0),
        ]


@register("metric", "drift")
class DriftMetric(MetricComponent):
    """M-DRIFT: cosine distance of x_u^t from x_u^0 (mean, p90), angle, L2; bubble tightness."""

    METRICS = {
        "drift_mean": "M-DRIFT mean cosine distance 1−cos(x_t, x_0)",
        "drift_p90": "M-DRIFT 90th percentile of the cosine distance",
        "drift_angle": "M-DRIFT mean angle (radians)",
        "drift_l2": "M-DRIFT mean ‖x_t − x_0‖",
        "bubble_tightness": "mean cosine distance between x_t and the consumed item's attributes",
    }

    def compute(self, rec):
        u = rec.users
        w = rec.world
        d = _drift_rows(w.users.prefs, u, w.users.prefs0, u)
        rows = [
            ("drift_mean", "", float(np.mean(d["cosine_distance"]))),
            ("drift_p90", "", float(np.percentile(d["cosine_distance"], 90))),
            ("drift_angle", "", float(np.mean(d["angle"]))),
            ("drift_l2", "", float(np.mean(d["l2"]))),
        ]
        hit = rec.chosen_item >= 0
        if hit.any():
            bt = _drift_rows(w.items.attrs, rec.chosen_item[hit], w.users.prefs, u[hit])["cosine_distance"]
            rows.append(("bubble_tightness", "", float(np.mean(bt))))
        return rows


def _drift_rows(A, ia, B, ib) -> dict[str, np.ndarray]:
    """:func:`recloop.analysis.metrics.drift` of rows A[ia] vs B[ib], fused (no gathered copies)."""
    if not kernels.HAVE_NUMBA or len(ia) == 0:
        return UM.drift(A[ia], B[ib])
    n = len(ia)
    out = {name: np.empty(n, np.float64) for name in ("cosine_distance", "angle", "l2")}
    A, B = np.ascontiguousarray(A), np.ascontiguousarray(B)
    ia, ib = np.asarray(ia, np.int64), np.asarray(ib, np.int64)
    cd, an, l2 = out["cosine_distance"], out["angle"], out["l2"]

    def rows(lo, hi):
        kernels.row_drift(A, ia[lo:hi], B, ib[lo:hi], cd[lo:hi], an[lo:hi], l2[lo:hi])

    parallel_rows(n, rows, default_workers(), min_rows=4096)
    return out


@register("metric", "utility")
class Utility(MetricComponent):
    """M-UTIL: mean realised utility (no-click = 0), CTR, no-click rate, and oracle regret on a fixed
    user sample (best unconsumed item by true utility vs the realised one). The ratio to the ideal
    policy comes from :func:`recloop.analysis.compare.relative_to`."""

    METRICS = {
        "utility": "M-UTIL mean realised true utility per active user (no-click = 0)",
        "ctr": "M-UTIL clicks / slots shown",
        "no_click_rate": "M-UTIL share of users who clicked nothing",
        "regret": "M-UTIL mean regret V(best unconsumed) − V(chosen) over sampled users",
        "active_users": "users served this cycle",
        "catalog_size": "items in the catalog",
    }

    class Params(Params):
        regret_sample: int | None = Field(
            None, ge=0, le=MAX_SAMPLE, description="users sampled for the oracle regret (default: the metrics "
                                                   "block's regret_sample; 0: off)")

    def setup(self, world, seed, config):
        rng = component_rng(seed, "metric.regret")
        n = config.regret_sample if self.params.regret_sample is None else self.params.regret_sample
        self.regret_users = np.sort(rng.choice(world.users.n, size=min(n, world.users.n), replace=False))

    def compute(self, rec):
        n = len(rec.users)
        clicks = int((rec.chosen_item >= 0).sum())
        slots = int((rec.slates >= 0).sum())
        st = UM.utility_stats(rec.utility, n, clicks, slots)
        rows = [("utility", "", st["mean_utility"]), ("ctr", "", st["ctr"]), ("no_click_rate", "", st["no_click_rate"]),
                ("active_users", "", float(n)), ("catalog_size", "", float(rec.world.items.n))]
        if len(self.regret_users):
            pos = np.searchsorted(rec.users, self.regret_users)
            pos = np.minimum(pos, max(n - 1, 0))
            here = rec.users[pos] == self.regret_users
            if here.any():
                users = self.regret_users[here]
                w = rec.world
                exclude = None if rec.repeat_consumption else _Before(rec.history, rec)
                _, best = rec.engine.topk_factors(users, 1, w.users.prefs, w.items.attrs[: w.items.n],
                                                    exclude=exclude)
                best = np.where(np.isfinite(best[:, 0]), best[:, 0], 0.0)
                rows.append(("regret", "", UM.regret(best, rec.utility[pos[here]]) / len(users)))
        return rows


class _Before:
    """History as it was before this cycle's consumption (M-UTIL: the oracle's best item is among the
    items unconsumed *before* the cycle, so a user who picked the best item has zero regret).

    "This cycle's consumption" is every pair consumed in it (``Feedback.consumed``: the picks from
    slates, extra accepts of multi-accept choice models, organic picks), else the chosen items. One
    definition for any number of users or pairs (it used to keep this cycle's pairs, and so change the
    regret, once a chunk of users held 50,000 history pairs or more)."""

    def __init__(self, history, rec):
        self.history = history
        if rec.consumed is not None:
            users, items = (np.asarray(a, np.int64) for a in rec.consumed)
        else:
            hit = rec.chosen_item >= 0
            users, items = np.asarray(rec.users[hit], np.int64), np.asarray(rec.chosen_item[hit], np.int64)
        self.stride = int(items.max()) + 2 if len(items) else 1
        self.keys = np.unique(users * self.stride + items)  # sorted (user, item) keys of this cycle

    def pairs(self, users):
        """History (row, item) pairs of ``users`` without the pairs consumed this cycle."""
        users = np.asarray(users, np.int64)
        r, c = self.history.pairs(users)
        if not len(r) or not len(self.keys):
            return r, c
        inside = c < self.stride - 1  # items beyond this cycle's largest id were not consumed in it
        keys = users[r] * self.stride + np.where(inside, c, 0)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        keep = ~(inside & (self.keys[pos] == keys))
        return r[keep], c[keep]
