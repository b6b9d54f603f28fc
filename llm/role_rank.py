"""LLM role inside the loop (reference F-ROLES): R3 re-ranker.


R3 ``llm_rank`` (F-RANK, Hou et al. 2024), a pipeline re-ranker::

    policy:
      type: pipeline
      retrieval: {type: bpr}
      candidates: 50
      reranker: {type: llm_rank, mode: generate, max_candidates: 20, shuffles: 0, users_per_cycle: 200}

For up to ``users_per_cycle`` users per cycle (a seeded sample; the others keep the base order), the
top ``max_candidates`` candidates of the earlier stage are presented to the LLM, which re-orders them
(``mode: generate``: it answers a ranking, parsed with :func:`~.parsing.parse_ranking`; ``mode:
loglik``: each candidate title is scored by its log-likelihood after a prompt with the user's history,
in batches). ``shuffles: B`` (>= 1) presents B random permutations and aggregates the B rankings by
Borda count (Hou et al.'s bootstrapping against position bias); 0 presents the base order once. The
surrogate backend has no log-likelihoods: in ``loglik`` mode it answers the equivalent structured
``rank`` request. Fallback on a malformed answer: that permutation is ignored; with none usable, the
user keeps the base order. Positions chosen first, candidate popularity and assigned ranks are kept
per cycle for the risk metrics (:mod:`recloop.llm.collectors`).


The role uses the run's :class:`~.service.LLMService` (cache, budget, accounting, failure log).
"""

from __future__ import annotations

import copy
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
from pydantic import Field

from recloop.contracts import PlatformView
from recloop.limits import MAX_ITERATIONS, MAX_K, MAX_USERS
from recloop.recommenders.rerankers import Reranker
from recloop.registry import Params, register
from recloop.rng import derive_key, hash_u64

from .parsing import parse_ranking
from .reports import RankerReport
from .roles import _history_items, _titles_line, _topk_lex, _zscore_rows
from .service import get_service
from .types import LLMRequest

__all__ = ["LLMRank"]


@register("reranker", "llm_rank")
class LLMRank(Reranker):
    """R3 LLM re-ranker (F-RANK): the LLM re-orders the top ``max_candidates`` candidates of an earlier
    stage for up to ``users_per_cycle`` users (by generation + parsing, or by title log-likelihood),
    optionally over ``shuffles`` permutations aggregated by Borda count; others keep the base order."""

    llm_role = "ranker"

    class Params(Params):
        mode: Literal["generate", "loglik"] = Field(
            "generate", description="generate a ranking and parse it, or score each title's log-likelihood"
        )
        max_candidates: int = Field(20, ge=2, le=MAX_K, description="candidates presented to the LLM")
        users_per_cycle: int | None = Field(
            200, ge=0, le=MAX_USERS, description="users re-ranked per cycle (null: all)")
        shuffles: int = Field(
            0,
            ge=0,
            le=MAX_ITERATIONS,
            description="B random candidate permutations aggregated by Borda (0: the base order, once)",
        )
        history_len: int = Field(10, ge=0, le=MAX_K, description="history titles in the prompt")
        prompt: str | None = Field(None, description="template with {history}, {candidates}, {m}")

    DEFAULT_PROMPT = (
        "A user has enjoyed these titles:\n{history}\n\n"
        "Rank the following {m} candidates by how likely the user is to enjoy them next:\n{candidates}\n\n"
        "Answer with the candidate numbers only, best first, separated by commas."
    )
    LOGLIK_PROMPT = (
        "A user has enjoyed these titles:\n{history}\n\nCandidates:\n{candidates}\n\n"
        "The title this user will enjoy most next is:"
    )

    def __init__(self, params=None):
        super().__init__(params)
        self.service = None
        self.cycle: dict[str, Any] = self._new_cycle(-1)
        self._sel_step = -2
        self._sel_users = np.zeros(0, np.int64)
        self.served_total = 0
        self.fallbacks_total = 0

    def on_bind(self, context) -> None:
        self.service = get_service(context)

    def stage_report(self) -> RankerReport:
        return RankerReport(self.llm_role, self.registry_name, MappingProxyType(copy.deepcopy(self.cycle)),
                            self.served_total, self.fallbacks_total)

    @staticmethod
    def _new_cycle(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "users": [],
            "first_pos": [],
            "n_presented": [],
            "cand_pops": [],
            "ranks": [],
            "served": 0,
            "fallbacks": 0,
            "requests": 0,
            "failed": 0,
            "base_topk": [],
            "llm_topk": [],
        }

    def _selected(self, users: np.ndarray, world, step: int) -> np.ndarray:
        """The users of this chunk that the LLM serves: per cycle, the ``users_per_cycle`` active users
        with the smallest hash of (seed, step, user) - an exact, seeded sample, independent of chunking."""
        cap = self.params.users_per_cycle
        if cap is None:
            return np.ones(len(users), bool)
        if self._sel_step != step:
            active = world.users.active_ids()
            if cap < len(active):
                h = hash_u64(derive_key(self.context.seed, "llm_rank.users", step), active)
                self._sel_users = (
                    np.sort(active[np.argpartition(h, cap - 1)[:cap]]) if cap > 0 else active[:0]
                )
            else:
                self._sel_users = active
            self._sel_step = step
        return np.isin(users, self._sel_users)

    def rerank(self, users, candidates, scores, k, world, *, step=0, history=None):
        if self.cycle["step"] != step:
            self.cycle = self._new_cycle(step)
        cand = np.asarray(candidates, np.int64)
        s = np.asarray(scores)
        if cand.ndim != 2 or s.shape != cand.shape:
            raise ValueError(
                f"llm_rank: candidates {cand.shape} and scores {s.shape} must be equal 2-D shapes"
            )
        valid = (cand >= 0) & (s > -np.inf)  # NaN compares False: invalid too
        # base order: descending score, ties to the lower item id (as the pipeline without a re-ranker),
        # so users the LLM does not serve get exactly the slates they would get without this stage
        n, m = cand.shape
        out = np.full((n, k), -1, np.int64)
        kk = min(k, m)
        if n == 0 or m == 0:
            return out
        key = np.where(valid, -s, np.inf)
        top = _topk_lex(key, cand, kk)
        out[:, :kk] = np.where(
            np.take_along_axis(valid, top, axis=1), np.take_along_axis(cand, top, axis=1), -1
        )
        users = np.asarray(users, np.int64)
        sel = self._selected(users, world, step)
        rows = np.flatnonzero(sel & (valid.sum(axis=1) >= 2))
        if len(rows) == 0:
            return out
        # full base order only for the served rows
        o = np.lexsort((cand[rows], key[rows]), axis=-1)
        cand = np.take_along_axis(cand[rows], o, axis=1)
        s = np.take_along_axis(s[rows], o, axis=1)
        valid = np.take_along_axis(valid[rows], o, axis=1)
        self.cycle["served"] += len(rows)
        self.served_total += len(rows)
        p = self.params
        svc = self.service
        svc.bind_world(world)
        in_loop = isinstance(world, PlatformView)
        hist_src = history if history is not None and hasattr(history, "csr") else (
            world.history if in_loop else None)
        ptr, hist = _history_items(hist_src, users[rows])
        n_items = world.items.n
        pop = np.zeros(n_items)
        if in_loop:
            pop[:] = world.popularity
        titles = world.items.titles
        B = max(1, p.shuffles)
        key = derive_key(self.context.seed, "llm_rank.perm", step)
        seeds = hash_u64(
            derive_key(self.context.seed, "llm_rank.seed", step), users[rows][:, None], np.arange(B)[None, :]
        ).tolist()
        catalog = svc.catalog_fingerprint() if svc.uses_payload else None
        use_rank_task = p.mode == "generate" or not svc.supports_loglik
        Ms = np.minimum(p.max_candidates, valid.sum(axis=1))
        W = int(Ms.max())
        rel_all = _zscore_rows(s[:, :W], np.arange(W)[None, :] < Ms[:, None])
        pop_all = pop[np.maximum(cand[:, :W], 0)]
        reqs: list[LLMRequest] = []
        ll_prompts: list[str] = []
        ll_conts: list[str] = []
        meta: list[tuple[int, int, np.ndarray, int]] = []  # (served row j, b, perm, n presented)
        template = p.prompt or self.DEFAULT_PROMPT
        user_l = users[rows].tolist()
        for j in range(len(rows)):
            M = int(Ms[j])
            u = user_l[j]
            h = hist[ptr[j] : ptr[j + 1]]
            if len(h) > p.history_len:
                hh = hash_u64(key, u, h)
                h = h[np.argsort(hh)[: p.history_len]]
            htxt = _titles_line([titles[i] for i in h.tolist()]) or "(no history yet)"
            row_items = cand[j, :M]
            for b in range(B):
                if p.shuffles > 0:
                    perm = np.argsort(hash_u64(key, u * 131 + b, np.arange(M)))
                else:
                    perm = np.arange(M)
                items = row_items[perm].tolist()
                meta.append((j, b, perm, M))
                if use_rank_task:
                    ctext = "\n".join(f"[{q + 1}] {titles[i]}" for q, i in enumerate(items))
                    prompt = template.format(history=htxt, candidates=ctext, m=M)
                    payload: dict[str, Any] = {}
                    if svc.uses_payload:
                        payload = {
                            "relevance": rel_all[j, perm],
                            "popularity": pop_all[j, perm],
                            "n": M,
                            "seed": seeds[j][b],
                            "user": u,
                            "catalog": catalog,
                        }
                    reqs.append(LLMRequest(prompt, "rank", payload))
                else:
                    ctext = "\n".join(f"- {titles[i]}" for i in items)
                    prompt = self.LOGLIK_PROMPT.format(history=htxt, candidates=ctext)
                    ll_prompts.extend([prompt] * M)
                    ll_conts.extend(f" {titles[i]}" for i in items)
        self.cycle["requests"] += len(meta)
        rankings = self._rankings(svc, use_rank_task, meta, reqs, ll_prompts, ll_conts, cand, titles, user_l, step)
        self._apply_borda(meta, rankings, rows, cand, valid, pop, out, users, kk, svc)
        return out

    def _rankings(self, svc, use_rank_task, meta, reqs, ll_prompts, ll_conts, cand, titles, user_l, step) -> list:
        """One ranking (presented positions, best first) per presented permutation, None where unusable."""
        rankings: list[list[int] | None] = []
        if use_rank_task:
            responses = svc.generate(reqs, "ranker", step=step)
            for (j, _b, perm, M), req, resp in zip(meta, reqs, responses, strict=True):
                if resp.failed:
                    rankings.append(None)
                    continue
                ranked = parse_ranking(resp.text, M, titles=[titles[i] for i in cand[j, perm]])
                if not ranked:
                    svc.log_failure("ranker", "unparsable", req.prompt, resp.text, user=user_l[j])
                    rankings.append(None)
                    continue
                rankings.append(ranked)
        else:
            vals = svc.loglik(ll_prompts, ll_conts, "ranker", step=step)
            off = 0
            for _j, _b, _perm, M in meta:
                v = vals[off : off + M]
                off += M
                if not np.all(np.isfinite(v)):
                    rankings.append(None)
                    continue
                rankings.append(np.argsort(-v, kind="stable").tolist())
        return rankings

    def _apply_borda(self, meta, rankings, rows, cand, valid, pop, out, users, kk, svc) -> None:
        """Borda-aggregate each served user's rankings and write the re-ranked slates into ``out``."""
        # Borda aggregation per user (points in base-candidate space), then write the slates
        borda: dict[int, np.ndarray] = {}
        for (j, _b, perm, M), ranked in zip(meta, rankings, strict=True):
            if ranked is None:
                self.cycle["failed"] += 1
                continue
            got = set(ranked)
            full = list(ranked) + [q for q in range(M) if q not in got]  # unranked: presented order
            pts = borda.setdefault(j, np.zeros(M))
            base_idx = perm[np.asarray(full, np.int64)]  # presented position -> base column
            pts[base_idx] += M - np.arange(M)
            # first pick (as presented, 1-based) for the position-bias slope; popularity vs assigned rank
            self.cycle["first_pos"].append(int(ranked[0]) + 1)
            self.cycle["n_presented"].append(M)
            assigned = np.empty(M)
            assigned[np.asarray(full, np.int64)] = np.arange(1, M + 1)
            self.cycle["cand_pops"].append(pop[cand[j, perm]])
            self.cycle["ranks"].append(assigned)
        n_fb = 0
        for j, r in enumerate(rows.tolist()):
            pts = borda.get(j)
            if pts is None:
                n_fb += 1
                continue
            M = len(pts)
            order = np.lexsort((np.arange(M), -pts))  # ties: base order
            new = np.concatenate([cand[j, :M][order], cand[j, M:]])
            vv = np.concatenate([valid[j, :M][order], valid[j, M:]])
            self.cycle["base_topk"].append(out[r].copy())
            out[r, :kk] = np.where(vv[:kk], new[:kk], -1)
            self.cycle["llm_topk"].append(out[r].copy())
            self.cycle["users"].append(int(users[r]))
        if n_fb:
            self.cycle["fallbacks"] += n_fb
            self.fallbacks_total += n_fb
            svc.count_fallback("ranker", n_fb)

    def state_dict(self) -> dict[str, Any]:
        return {
            "cycle": copy.deepcopy(self.cycle),
            "served_total": self.served_total,
            "fallbacks_total": self.fallbacks_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cycle = copy.deepcopy(state["cycle"])
        self.served_total = state["served_total"]
        self.fallbacks_total = state["fallbacks_total"]
        self._sel_step = -2
