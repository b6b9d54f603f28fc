"""LAFB familiarity debiasing as a post-ranking re-ranker (reference E-LAFB, GROUNDING §3).

Users rate familiar content higher (U-FAMILIARITY), so a model trained on their feedback scores familiar
items higher and slates repeat what users already know. LAFB divides each candidate's score by a
debiasing factor of its familiarity bucket, s^deb = s/Adj_b, and re-ranks by s^deb, without retraining
the base model. What is ours [O] (the paper's method section was not readable): the features and bucket
edges, the normaliser Adj_b = mean(s|b)/mean(s), the positive transform of the scores, the shrinkage and
the estimation from the previous cycle's candidates. All are documented on :class:`LAFB`.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from recloop.contracts import PROVENANCE
from recloop.recommenders.rerankers import Reranker, _by_score, _prepare, topk_by_value
from recloop.registry import Params, register

Feature = Literal["creator_count", "creator_recency", "genre_count", "genre_recency"]

#: count buckets {0, 1–2, 3–9, ≥10}: level = number of edges ≤ n (the LAFB-style discrete buckets)
COUNT_EDGES = np.array([1, 3, 10])
#: recency buckets on Δ = cycles since the last consumption: {never, 1, 2–7, ≥8} (≤ a day, a week, older)
RECENCY_EDGES = np.array([2, 8])
LEVELS = 4
NEVER = np.iinfo(np.int32).min
_SATURATE = np.iinfo(np.uint16).max


# ------------------------------------------------------------------------------------------- the maths
def debias(s_pos: np.ndarray, adj: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """E-LAFB: s^deb = s_pos / Adj_b^α (α = ``strength``; α = 1 is the reference: 0.8 / 2 → 0.4)."""
    return np.asarray(s_pos, np.float64) / np.power(np.asarray(adj, np.float64), strength)


def standardized_scores(s: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-user z = (s − mean) / sd over the valid candidates (0 where the sd is 0; 0 where invalid)."""
    cnt = np.maximum(valid.sum(axis=1, keepdims=True), 1)
    x = np.where(valid, s, 0.0)
    mu = x.sum(axis=1, keepdims=True) / cnt
    dev = np.where(valid, s - mu, 0.0)
    sd = np.sqrt((dev * dev).sum(axis=1, keepdims=True) / cnt)
    return np.where(sd > 0, dev / np.where(sd > 0, sd, 1.0), 0.0)


def bucket_log_factors(log_sum: np.ndarray, count: np.ndarray, prior: float, max_factor: float) -> np.ndarray:
    """log Adj_b with Adj_b = mean(s|b)/mean(s), each bucket's mean shrunk toward the overall mean m by
    ``prior`` pseudo-candidates ((S_b + λm)/(n_b + λ)), clipped to [1/max_factor, max_factor].

    ``log_sum`` holds log Σ_{b} s (−inf for an empty bucket), ``count`` the candidates per bucket. Buckets
    with neither data nor prior, and every bucket when nothing was seen, get Adj = 1."""
    n = float(count.sum())
    out = np.zeros(len(count))
    if n <= 0:
        return out
    total = np.logaddexp.reduce(log_sum)
    log_m = total - np.log(n)
    num = np.logaddexp(log_sum, np.log(prior) + log_m) if prior > 0 else log_sum
    den = count + prior
    ok = den > 0
    out[ok] = num[ok] - np.log(den[ok]) - log_m
    cap = float(np.log(max_factor))
    return np.clip(np.nan_to_num(out, nan=0.0, neginf=-cap, posinf=cap), -cap, cap)


def catalog_keys(kind: str, view, lo: int, hi: int) -> np.ndarray:
    """Items lo..hi-1: their creator (``kind="creator"``) or dominant genre argmax p(g|i); -1 for none."""
    if kind == "creator":
        return np.asarray(view.items.creator)[lo:hi].astype(np.int64)
    g = np.asarray(view.items.genres)[lo:hi]
    return np.where(g.max(axis=1, initial=0) > 0, np.argmax(g, axis=1) if g.shape[1] else 0, -1).astype(np.int64)


def _levels(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.searchsorted(edges, values, side="right")


# -------------------------------------------------------------------------------------- the features
class FamiliarityFeatures:
    """Per-user consumption counts and last-consumption steps by creator and by dominant genre.

    Dense (users x creators) and (users x genres) arrays (as U-FAMILIARITY keeps its counts), updated
    incrementally from batches of consumed (user, item, step) rows: O(rows) per batch, never a log scan.
    Only the arrays the selected features need are kept. Counts saturate at 65,535."""

    def __init__(self, features: tuple[str, ...]):
        self.features = tuple(features)
        self.arrays: dict[str, np.ndarray] = {}
        self._keys: dict[str, np.ndarray] = {}  # per-item creator / dominant genre (derived, not state)
        for kind in ("creator", "genre"):
            if f"{kind}_count" in features:
                self.arrays[f"{kind}_count"] = np.zeros((0, 0), np.uint16)
            if f"{kind}_recency" in features or f"{kind}_count" in features:
                self.arrays[f"{kind}_last"] = np.full((0, 0), NEVER, np.int32)

    def keys(self, kind: str, items: np.ndarray, view) -> np.ndarray:
        """The item's creator, or its dominant genre (argmax p(g|i)); -1 when it has none. The per-item
        keys of the catalog are computed once and extended as items arrive (items never change)."""
        n = int(view.items.n)
        known = self._keys.get(kind, np.zeros(0, np.int64))
        if len(known) < n:
            self._keys[kind] = known = np.concatenate([known, catalog_keys(kind, view, len(known), n)])
        items = np.asarray(items, np.int64)
        if len(known) == 0:
            return np.full(items.shape, -1, np.int64)
        ok = (items >= 0) & (items < len(known))
        return np.where(ok, known[np.where(ok, items, 0)], -1)

    def width(self, kind: str, view) -> int:
        """Columns needed for ``kind``: one past the largest creator / genre id in the catalog."""
        self.keys(kind, np.zeros(0, np.int64), view)  # refresh the catalog's keys
        return max(1, int(self._keys[kind].max(initial=-1)) + 1)

    def ensure(self, n_users: int, view) -> None:
        """Grow the arrays to ``n_users`` rows and the current number of creators / genres."""
        for name, arr in list(self.arrays.items()):
            kind = name.split("_")[0]
            rows, cols = max(arr.shape[0], n_users), max(arr.shape[1], self.width(kind, view))
            if (rows, cols) != arr.shape:
                grown = np.full((rows, cols), NEVER if name.endswith("_last") else 0, arr.dtype)
                grown[: arr.shape[0], : arr.shape[1]] = arr
                self.arrays[name] = grown

    def add(self, users: np.ndarray, items: np.ndarray, steps: np.ndarray, view) -> None:
        """Record consumed (user, item) rows at ``steps`` (vectorised: one unique over the batch)."""
        users = np.asarray(users, np.int64)
        if len(users) == 0:
            return
        self.ensure(int(users.max()) + 1, view)
        steps = np.broadcast_to(np.asarray(steps, np.int64), users.shape)
        for kind in ("creator", "genre"):
            last = self.arrays.get(f"{kind}_last")
            if last is None:
                continue
            key = self.keys(kind, items, view)
            ok = key >= 0
            flat = users[ok] * last.shape[1] + key[ok]
            uniq, inv, n = np.unique(flat, return_inverse=True, return_counts=True)
            newest = np.full(len(uniq), NEVER, np.int64)
            np.maximum.at(newest, inv, steps[ok])
            r, c = np.divmod(uniq, last.shape[1])
            last[r, c] = np.maximum(last[r, c], newest).astype(np.int32)
            cnt = self.arrays.get(f"{kind}_count")
            if cnt is not None:
                cnt[r, c] = np.minimum(cnt[r, c].astype(np.int64) + n, _SATURATE).astype(np.uint16)

    def buckets(self, users: np.ndarray, cand: np.ndarray, step: int, view) -> np.ndarray:
        """The joint bucket b = Σ_f level_f · 4^f of each (user, candidate), over the selected features."""
        users = np.asarray(users, np.int64)
        self.ensure(int(users.max(initial=-1)) + 1, view)
        b = np.zeros(cand.shape, np.int64)
        cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for f, feature in enumerate(self.features):
            kind, what = feature.split("_")
            if kind not in cache:
                key = self.keys(kind, cand, view)
                cache[kind] = (key >= 0, np.maximum(key, 0))
            has, key = cache[kind]
            rows = users[:, None]
            if what == "count":
                n = np.where(has, self.arrays[f"{kind}_count"][rows, key], 0)
                level = _levels(n, COUNT_EDGES)
            else:
                last = np.where(has, self.arrays[f"{kind}_last"][rows, key], NEVER).astype(np.int64)
                level = np.where(last == NEVER, 0, 1 + _levels(step - last, RECENCY_EDGES))
            b += level * LEVELS**f
        return b

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.arrays.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.arrays:
            dtype = np.int32 if name.endswith("_last") else np.uint16
            self.arrays[name] = np.array(state[name], dtype)


# ------------------------------------------------------------------------------------------ the stage
@register("reranker", "lafb")
class LAFB(Reranker):
    """E-LAFB familiarity debiasing: re-rank the candidates by s^deb = s_pos / Adj_b^α, b = familiarity bucket.

    * **Features** (discrete and continuous, per (user, item)): ``creator_count`` / ``genre_count`` = how
      often the user consumed the item's creator / dominant genre (argmax p(g|i)), bucketed {0, 1–2, 3–9,
      ≥10}; ``creator_recency`` / ``genre_recency`` = Δ, cycles since the last such consumption (continuous,
      bucketed {never, 1, 2–7, ≥8}). The bucket b is the joint level of the selected ``features`` (4^F
      buckets). Items without a creator fall in the "0 / never" levels. Consumption is every logged
      organic or recommended row (never LLM-augmented ones), taken from the training log at each retrain
      (``fit``), from the cycle's feedback when the pipeline is online (``update``), and otherwise caught
      up once per cycle from the view's log (rows newer than the last step seen). With ``retrain.data:
      initial`` and an offline pipeline the features stay at the initial log.
    * **Positive transform**: s_pos = exp(z/T), z the user's candidate scores standardised over its
      valid candidates. It is positive for every candidate (ALS scores can be negative, where a ratio means
      nothing), the same for any per-user positive affine rescaling of the base scores (other policies,
      retrains), and monotone, so equal factors leave the ranking unchanged. Division becomes a shift:
      ranking by s_pos/Adj_b^α is ranking by z/T − α·log Adj_b, which is what is computed (no overflow).
    * **Factors**: Adj_b = mean(s_pos | b) / mean(s_pos) over every (user, candidate) the stage saw in the
      previous cycle it served, each bucket's mean shrunk toward the overall mean by ``prior``
      pseudo-candidates and clipped to [1/``max_factor``, ``max_factor``]. Before any cycle is seen
      Adj ≡ 1 (no change). The sums are kept in log space and checkpointed.
    * Ties after debiasing go to the higher base score, then to the earlier candidate.
    """

    example_params = {"features": ["creator_count", "creator_recency", "genre_count"]}

    class Params(Params):
        features: tuple[Feature, ...] = Field(
            ("creator_count", "creator_recency"), min_length=1, max_length=4,
            description="familiarity features whose joint level is the bucket b")
        strength: float = Field(1.0, ge=0.0, le=10.0, description="α in s_pos / Adj_b^α (1 = E-LAFB)")
        temperature: float = Field(1.0, ge=0.1, le=100.0, description="T in s_pos = exp(z/T)")
        prior: float = Field(20.0, ge=0.0, le=1e9, description="pseudo-candidates shrinking mean(s|b) to mean(s)")
        max_factor: float = Field(10.0, ge=1.0, le=1e6, description="Adj_b is clipped to [1/max, max]")

        @field_validator("features")
        @classmethod
        def _distinct(cls, v: tuple[str, ...]) -> tuple[str, ...]:
            if len(set(v)) != len(v):
                raise ValueError("features must be distinct")
            return v

    def __init__(self, params: Params | None = None):
        super().__init__(params)
        nb = LEVELS ** len(self.params.features)
        self.features = FamiliarityFeatures(self.params.features)
        self.log_factors = np.zeros(nb)  # log Adj_b used this cycle
        self.acc_log_sum = np.full(nb, -np.inf)  # log Σ s_pos per bucket, this cycle
        self.acc_count = np.zeros(nb)
        self.acc_step = -1  # the cycle being accumulated (-1: none yet)
        self.watermark = -(2**31)  # the newest log step whose consumption is in the features

    @property
    def factors(self) -> np.ndarray:
        """Adj_b per bucket (the factors used this cycle)."""
        return np.exp(self.log_factors)

    # -- consumption features ------------------------------------------------------------------------
    def fit(self, data, world, *, step: int = 0, rng=None, warm_start: bool = False) -> None:
        self._add_log(data, world)

    def update(self, feedback, world) -> None:
        if feedback.step != self.watermark + 1:
            return  # already seen, or a gap the next rerank catches up from the log
        if feedback.consumed is not None:
            users, items = feedback.consumed
        else:
            hit = feedback.chosen_item >= 0
            users, items = feedback.users[hit], feedback.chosen_item[hit]
        self.features.add(users, items, feedback.step, world)
        self.watermark = int(feedback.step)

    def _add_log(self, data, world) -> None:
        """Add the consumption rows of a training log newer than the watermark."""
        keep = (data.steps > self.watermark) & (data.provenance != PROVENANCE["llm_augmented"])
        if keep.any():
            self.features.add(data.users[keep], data.items[keep], data.steps[keep], world)
            self.watermark = int(data.steps[keep].max())

    def _start_cycle(self, world, step: int) -> None:
        """First call of a cycle: last cycle's sums become the factors; the features catch up to step-1."""
        if self.acc_step >= 0:
            self.log_factors = bucket_log_factors(self.acc_log_sum, self.acc_count, self.params.prior,
                                                  self.params.max_factor)
        self.acc_log_sum[:] = -np.inf
        self.acc_count[:] = 0.0
        self.acc_step = int(step)
        if self.watermark < step - 1 and hasattr(world, "training_data"):
            self._add_log(world.training_data(), world)
            self.watermark = max(self.watermark, int(step) - 1)

    def _accumulate(self, b: np.ndarray, log_s: np.ndarray, valid: np.ndarray) -> None:
        lp, bb = log_s[valid], b[valid]
        if len(lp) == 0:
            return
        top = float(lp.max())
        sums = np.bincount(bb, weights=np.exp(lp - top), minlength=len(self.acc_count))
        with np.errstate(divide="ignore"):
            self.acc_log_sum = np.logaddexp(self.acc_log_sum, np.log(sums) + top)
        self.acc_count += np.bincount(bb, minlength=len(self.acc_count))

    # -- re-ranking ------------------------------------------------------------------------------------
    def rerank(self, users, candidates, scores, k, world, *, step=0, history=None):
        cand, s, valid = _by_score(*_prepare(candidates, scores))
        users = np.asarray(users, np.int64)
        if self.acc_step != int(step):
            self._start_cycle(world, int(step))
        if cand.size == 0:
            return topk_by_value(cand, s, valid, int(k))
        b = self.features.buckets(users, cand, int(step), world)
        log_s = standardized_scores(s, valid) / self.params.temperature  # log s_pos
        self._accumulate(b, log_s, valid)
        value = np.where(valid, log_s - self.params.strength * self.log_factors[b], -np.inf)
        return topk_by_value(cand, value, valid, int(k))

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"features": self.features.state_dict(), "log_factors": self.log_factors.copy(),
                "acc_log_sum": self.acc_log_sum.copy(), "acc_count": self.acc_count.copy(),
                "acc_step": int(self.acc_step), "watermark": int(self.watermark)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.features.load_state_dict(state["features"])
        self.log_factors = np.array(state["log_factors"], np.float64)
        self.acc_log_sum = np.array(state["acc_log_sum"], np.float64)
        self.acc_count = np.array(state["acc_count"], np.float64)
        self.acc_step = int(state["acc_step"])
        self.watermark = int(state["watermark"])
