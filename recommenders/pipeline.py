"""Staged pipeline: candidate retrieval → ranker → re-ranker, declared in YAML.

```yaml
policy:
  type: pipeline
  retrieval: {type: als, factors: 32}
  candidates: 100
  ranker: {type: popularity}        # optional: rescore the candidates
  reranker: {type: mmr, lambda: 0.5} # optional: reorder/diversify (registered "reranker" kind)
```
Each chunk of users is retrieved, rescored and re-ranked before the next chunk, so memory stays
bounded by the chunk. Later stages (LLM rankers, conformal set outputs) are re-rankers too.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from recloop import registry
from recloop.component import Child
from recloop.limits import MAX_ITEMS
from recloop.recommenders.base import Policy
from recloop.registry import Params, register


@register("policy", "pipeline")
class Pipeline(Policy):
    """Retrieval → optional ranker → optional re-ranker over the top ``candidates`` items."""

    example_params = {"retrieval": {"type": "content"}, "candidates": 20, "ranker": {"type": "popularity"},
                      "reranker": {"type": "mmr"}}

    class Params(Params):
        retrieval: Child("policy") = Field(description="a policy producing candidates ({type: ..., ...})")
        candidates: int = Field(100, gt=0, le=MAX_ITEMS, description="candidates kept per user after retrieval")
        ranker: Child("policy") | None = Field(None, description="a policy that rescores the candidates")
        reranker: Child("reranker") | None = Field(None, description="a re-ranker ({type: mmr|calibrated|fair|...})")

    def __init__(self, params=None):
        super().__init__(params)
        p = self.params
        self.retrieval = registry.build("policy", p.retrieval)
        self.ranker = registry.build("policy", p.ranker) if p.ranker else None
        self.reranker = registry.build("reranker", p.reranker) if p.reranker else None
        self.online = self.retrieval.online or bool(self.ranker and self.ranker.online)
        self.uses_ground_truth = self.retrieval.uses_ground_truth or bool(self.ranker and self.ranker.uses_ground_truth)

    def children(self) -> list:
        return [s for s in (self.retrieval, self.ranker, self.reranker) if s is not None]

    def fit(self, data, world, *, step, rng, warm_start):
        for pol in (self.retrieval, self.ranker):
            if pol is not None:
                pol.fit(data, world, step=step, rng=rng, warm_start=warm_start)
        if self.reranker is not None:
            self.reranker.fit(data, world, step=step, rng=rng, warm_start=warm_start)

    def update(self, feedback, world):
        for pol in (self.retrieval, self.ranker):
            if pol is not None and pol.online:
                pol.update(feedback, world)
        if self.reranker is not None:
            self.reranker.update(feedback, world)

    def factors(self, world):
        return None

    def score(self, users, world, step=0):
        return self.retrieval.score(users, world, step)

    def recommend(self, users, k, world, *, exclude=None, step=0, engine=None, on_chunk=None):
        engine = engine or self.engine
        users = np.asarray(users, dtype=np.int64)
        m = max(k, self.params.candidates)
        out_i = np.full((len(users), k), -1, np.int64)
        out_s = np.full((len(users), k), -np.inf, np.float32)
        history = exclude if exclude is not None else getattr(self, "history", None)

        def stage(sl, cand, cand_scores):
            ids = users[sl]
            scores = cand_scores
            if self.ranker is not None:
                scores = self.ranker.score_pairs(ids, cand, world, step)
            if self.reranker is not None:
                items = self.reranker.rerank(ids, cand, scores, k, world, step=step, history=history)
                pos = np.argmax(cand[:, None, :] == items[:, :, None], axis=2)
                sc = np.where(items >= 0, np.take_along_axis(scores, pos, axis=1), -np.inf)
            else:
                order = np.lexsort((cand, -scores), axis=-1)[:, :k]
                items = np.take_along_axis(cand, order, axis=1)
                sc = np.take_along_axis(scores, order, axis=1)
                items = np.where(np.isneginf(sc), -1, items)
            kk = items.shape[1]
            out_i[sl, :kk] = items
            out_s[sl, :kk] = sc
            if on_chunk is not None:
                on_chunk(sl, out_i[sl], out_s[sl])

        self.retrieval.recommend(users, m, world, exclude=exclude, step=step, engine=engine, on_chunk=stage)
        return out_i, out_s

    def state_dict(self):
        return {
            "retrieval": self.retrieval.state_dict(),
            "ranker": self.ranker.state_dict() if self.ranker else None,
            "reranker": self.reranker.state_dict() if self.reranker else None,
        }

    def load_state_dict(self, state):
        self.retrieval.load_state_dict(state["retrieval"])
        if self.ranker is not None:
            self.ranker.load_state_dict(state["ranker"])
        if self.reranker is not None and state.get("reranker") is not None:
            self.reranker.load_state_dict(state["reranker"])
