"""LLM roles inside the loop (reference F-ROLES): R1 augmenter (a policy wrapper).

R1 ``llm_augmented`` (F-AUG, LLMRec-style edge augmentation)::

    policy:
      type: llm_augmented
      base: {type: bpr, factors: 32}   # the policy trained on the augmented log
      users_per_cycle: 100             # users asked per retrain (seeded by (seed, step))
      n: 10                            # titles asked per user
      candidates: 40                   # candidate pool shown (unconsumed items; cold items first)
      cold_share: 0.3                  # share of the pool drawn from cold items (no interactions)
      unmatched: drop                  # or phantom: hallucinated titles become phantom catalog items

Before each ``base.fit`` the augmenter asks the LLM, for ``users_per_cycle`` sampled users, for ``n``
titles the user would like, given the user's history titles and a candidate pool. Titles are parsed
(:func:`~.parsing.parse_title_list`) and matched to the catalog (:class:`~.matching.TitleMatcher`,
tau = ``threshold``). Matched items enter the training log as pseudo-interactions with provenance
``llm_augmented`` (code 2): training data, not consumption (users' histories are unchanged).
Unmatched titles are dropped, or with ``unmatched: phantom`` appended to the catalog as *phantom*
items (attributes and genres = the mean of the user's history, creator -1, group 0) that the base
policy can then recommend; :attr:`LLMAugmented.phantom` flags them. Fallback on a malformed answer

The role uses the run's :class:`~.service.LLMService` (cache, budget, accounting, failure log).
"""

from __future__ import annotations

import copy
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
from pydantic import Field

from recloop import registry
from recloop.component import Child
from recloop.contracts import CatalogReport, InteractionReport
from recloop.limits import MAX_ITEMS, MAX_K, MAX_STEPS, MAX_USERS
from recloop.recommenders.base import PROVENANCE, Policy, TrainingData
from recloop.registry import Params, register
from recloop.rng import component_rng, derive_key, hash_u64

from .augment_candidates import candidate_pools, pool_relevance
from .augment_stats import generation_stats
from .matching import TitleMatcher, normalise_title
from .parsing import parse_title_list_checked
from .reports import AugmenterReport
from .roles import _history_items, _pad, _titles_line, match_titles
from .service import get_service
from .types import LLMRequest

__all__ = ["LLMAugmented"]


@register("policy", "llm_augmented")
class LLMAugmented(Policy):
    """R1 augmenter (F-AUG): before each retrain, LLM-generated pseudo-interactions for sampled users
    (provenance ``llm_augmented``) are added to the training log of a ``base`` policy; unmatched titles
    are dropped or become phantom items (``unmatched: phantom``)."""

    llm_role = "augmenter"
    example_params = {"base": {"type": "popularity"}, "users_per_cycle": 5, "n": 3, "candidates": 10}

    class Params(Params):
        base: Child("policy") = Field(
            default_factory=lambda: {"type": "bpr"},
            validate_default=True,
            description="the policy trained on the augmented log ({type: ..., ...})",
        )
        users_per_cycle: int = Field(
            100, ge=0, le=MAX_USERS, description="users asked per retrain (seeded by (seed, step))"
        )
        n: int = Field(10, ge=1, le=MAX_K, description="titles asked per user")
        candidates: int = Field(40, ge=1, le=MAX_K, description="candidate pool shown per user (unconsumed items)")
        candidates_from: Literal["base", "random"] = Field(
            "base", description="base: the base policy's top unconsumed items, in its order (LLMRec); random: a "
                                "random draw of unconsumed items with cold_share cold ones")
        cold_share: float = Field(0.3, ge=0.0, le=1.0, description="share of a random pool drawn from cold items")
        history_len: int = Field(10, ge=0, le=MAX_K, description="history titles shown per user (a seeded sample)")
        unmatched: Literal["drop", "phantom"] = Field(
            "drop", description="unmatched titles: dropped, or entered as phantom catalog items"
        )
        threshold: float = Field(0.7, gt=0.0, le=1.0, description="L-HALL tau for title matching")
        every: int = Field(1, ge=1, le=MAX_STEPS, description="augment at every n-th retrain")
        max_phantoms: int = Field(100_000, ge=0, le=MAX_ITEMS, description="cap on phantom items created in a run")
        prompt: str | None = Field(None, description="prompt template with {history}, {candidates}, {n}")

    DEFAULT_PROMPT = (
        "A user has enjoyed these titles:\n{history}\n\n"
        "From the candidate titles below, recommend {n} that this user would also enjoy.\n"
        "Candidates:\n{candidates}\n\n"
        "Answer with a numbered list of {n} titles only."
    )

    def __init__(self, params=None):
        super().__init__(params)
        self.base = registry.build("policy", self.params.base)
        self.online = self.base.online
        self.uses_ground_truth = self.base.uses_ground_truth
        self.service = None
        self.phantom = np.zeros(0, bool)  # phantom[i]: item i is a phantom (hallucinated) item
        self.aug_counts = np.zeros(0, np.int64)  # augmented interactions per item (cumulative)
        self.n_augmented = 0
        self.n_fits = 0
        self.seq = 0  # generation rounds done (the metric collector reports each round once)
        self.last: dict[str, Any] = {}  # the last round's outputs and generation-phase statistics
        self._matcher: TitleMatcher | None = None
        self._phantom_by_title: dict[str, int] = {}
        self._reports: list = []  # this round's reports, handed to the loop by produce()

    # -- delegation ----------------------------------------------------------------------------------
    def on_bind(self, context) -> None:
        self.service = get_service(context)

    def children(self) -> list:
        return [self.base]

    def stage_report(self) -> AugmenterReport:
        return AugmenterReport(self.llm_role, self.registry_name, MappingProxyType(copy.deepcopy(self.last)),
                               self.phantom.copy())

    def factors(self, world):
        return self.base.factors(world)

    def score(self, users, world, step=0):
        return self.base.score(users, world, step)

    def score_pairs(self, users, items, world, step=0):
        return self.base.score_pairs(users, items, world, step)

    def recommend(self, users, k, world, *, exclude=None, step=0, engine=None, on_chunk=None):
        return self.base.recommend(
            users, k, world, exclude=exclude, step=step, engine=engine, on_chunk=on_chunk
        )

    def update(self, feedback, world):
        if self.base.online:
            self.base.update(feedback, world)

    # -- training -------------------------------------------------------------------------------------
    def produce(self, view, *, step: int) -> list:
        """One generation round when due (every ``every``-th retrain): the phantom items as a
        CatalogReport, then the pseudo-interactions as an InteractionReport (provenance llm_augmented).
        The loop commits both, so the training data of the following :meth:`fit` holds them."""
        out = super().produce(view, step=step)
        if self.n_fits % self.params.every == 0 and self.params.users_per_cycle > 0:
            self._reports = []
            self.augment(view, step)
            out.extend(self._reports)
            self._reports = []
        return out

    def fit(self, data: TrainingData, world, *, step: int, rng, warm_start: bool) -> None:
        self.n_fits += 1
        self.base.fit(data, world, step=step, rng=rng, warm_start=warm_start)

    def _pools(self, view, users, real_ids, cold_pool, rng, step: int) -> list[np.ndarray]:
        """Each asked user's candidate pool. ``base`` (LLMRec): the base policy's top ``candidates``
        unconsumed real items, ranked (before the first fit the base is first trained on the log as it
        stands); ``random``: :func:`candidate_pools`."""
        p = self.params
        if p.candidates_from == "random":
            return candidate_pools(users, view.history, real_ids, cold_pool, rng, p.candidates, p.cold_share)
        if self.n_fits == 0:
            self.base.fit(view.training_data(), view, step=step, warm_start=False,
                          rng=component_rng(self.context.seed, "llm_augment.prefit", step))
        slates, _ = self.base.recommend(users, p.candidates, view, exclude=view.history, step=step)
        real = ~self.phantom[: view.items.n]
        return [row[(row >= 0) & real[np.maximum(row, 0)]] for row in slates]

    def _matcher_for(self, world) -> TitleMatcher:
        titles = world.items.titles
        m = self._matcher
        if m is None or len(m.titles) > len(titles) or m.titles[:1] != titles[:1]:
            m = self._matcher = TitleMatcher(list(titles), threshold=self.params.threshold)
        elif len(m.titles) < len(titles):
            m.extend(list(titles[len(m.titles) :]))
        return m

    def _grow(self, n: int) -> None:
        self.phantom = _pad(self.phantom, n, False)
        self.aug_counts = _pad(self.aug_counts, n, 0)

    def augment(self, world, step: int) -> tuple[np.ndarray, np.ndarray] | None:
        """One generation round: ask, parse, match; the data to add is left as reports in ``_reports``.
        Returns the augmented (users, items) or None. ``world`` is the platform view."""
        p = self.params
        svc = self.service
        svc.bind_world(world)
        history = world.history
        n_items = world.items.n
        self._grow(n_items)
        pop = np.array(world.popularity, np.float64)
        rng = component_rng(self.context.seed, "llm_augment", step)
        active = world.users.active_ids()
        if len(active) == 0:
            return None
        users = np.sort(rng.choice(active, size=min(p.users_per_cycle, len(active)), replace=False))
        ptr, hist = _history_items(history, users)
        real = ~self.phantom[:n_items]
        cold_pool = np.flatnonzero((pop + self.aug_counts[:n_items] == 0) & real)
        real_ids = np.flatnonzero(real)
        titles = world.items.titles
        genres = world.items.genres
        seed_key = derive_key(self.context.seed, "llm_augment.seed", step)
        seeds = hash_u64(seed_key, users)
        catalog = svc.catalog_fingerprint() if svc.uses_payload else None
        pools = self._pools(world, users, real_ids, cold_pool, rng, step)
        # relevance an LLM can read off titles: genre similarity to the user's history (z-scored per user)
        rel_all = pool_relevance(pools, ptr, hist, genres)
        template = p.prompt or self.DEFAULT_PROMPT
        reqs: list[LLMRequest] = []
        for r, u in enumerate(users.tolist()):
            h = hist[ptr[r] : ptr[r + 1]]
            pool = pools[r]
            shown = h if len(h) <= p.history_len else rng.choice(h, size=p.history_len, replace=False)
            pool_titles = [titles[i] for i in pool.tolist()]
            prompt = template.format(
                history=_titles_line([titles[i] for i in shown.tolist()]) or "(no history yet)",
                candidates=_titles_line(pool_titles),
                n=p.n,
            )
            payload: dict[str, Any] = {}
            if svc.uses_payload:
                payload = {
                    "candidates": pool,
                    "candidate_titles": pool_titles,  # as in the prompt: the surrogate names items it never saw
                    "relevance": rel_all[r, : len(pool)],
                    "popularity": pop[pool],
                    "n": p.n,
                    "seed": int(seeds[r]),
                    "user": u,
                    "catalog": catalog,
                }
            reqs.append(LLMRequest(prompt, "augment", payload))
        responses = svc.generate(reqs, "augmenter", step=step)

        col = self._collect(world, svc, reqs, responses, users, hist, ptr, pools, pop)
        aug_u, aug_i = col["aug_u"], col["aug_i"]
        n_new = self._add_phantoms(world, step, col["new_phantoms"], users, hist, ptr, aug_u, aug_i)

        au = np.asarray(aug_u, np.int64)
        ai = np.asarray(aug_i, np.int64)
        if len(au):
            order = np.lexsort((ai, au))
            au, ai = au[order], ai[order]
            self._grow(world.items.n)
            np.add.at(self.aug_counts, ai, 1)
            self.n_augmented += len(au)
            self._reports.append(InteractionReport(au, ai, PROVENANCE["llm_augmented"], max(step - 1, -1),
                                                   initial=step == 0, source=self.registry_name))
        self.seq += 1
        stats = generation_stats(col, pop, self.phantom, len(users), len(au), n_new)
        self.last = {"seq": self.seq, "step": step, "stats": stats}
        if not len(au):
            return None
        return au, ai

    def _parse_answers(self, svc, reqs, responses, users) -> tuple[dict[int, list[str]], int]:
        """The parsed title lists per answered row, and the number of fallbacks (failed or unparsable)."""
        p = self.params
        n_fallback = 0
        parsed: dict[int, list[str]] = {}
        for r, (req, resp) in enumerate(zip(reqs, responses, strict=True)):
            if resp.failed:  # empty, too long, timeout, budget, backend error (counted by the service)
                n_fallback += 1
                continue
            items_txt, reason = parse_title_list_checked(resp.text, max_items=p.n)
            if not items_txt:
                svc.log_failure(
                    "augmenter",
                    "unparsable" if reason is None else reason.value,
                    req.prompt,
                    resp.text,
                    user=int(users[r]),
                )
                n_fallback += 1
                continue
            parsed[r] = items_txt
        return parsed, n_fallback

    def _collect(self, world, svc, reqs, responses, users, hist, ptr, pools, pop) -> dict[str, Any]:
        """Parse and match the answers: the augmented (user, item) pairs, the hallucinated titles (phantom
        candidates) and the generation-phase material of the metrics."""
        p = self.params
        matcher = self._matcher_for(world)
        aug_u: list[int] = []
        aug_i: list[int] = []
        hall_matches: list[list[tuple[int, float, bool]]] = []
        cands_used: list[np.ndarray] = []
        out_pops: list[np.ndarray] = []
        ref_pops: list[np.ndarray] = []
        matched_items: list[int] = []
        new_phantoms: list[tuple[int, str]] = []  # (row, title)
        n_cold_out = 0
        parsed, n_fallback = self._parse_answers(svc, reqs, responses, users)
        flat = [t for ts in parsed.values() for t in ts]
        flat_m = match_titles(matcher, flat)
        matches_by_row: dict[int, list] = {}
        off = 0
        for r, ts in parsed.items():
            matches_by_row[r] = flat_m[off : off + len(ts)]
            off += len(ts)
        for r, items_txt in parsed.items():
            u = int(users[r])
            h = hist[ptr[r] : ptr[r + 1]]
            hset = set(h.tolist())
            got: list[int] = []
            row_matches = []
            for title, mt in zip(items_txt, matches_by_row[r], strict=True):
                item = int(mt.item)
                if item >= 0 and item < len(self.phantom) and self.phantom[item]:
                    row_matches.append((-1, float(mt.score), False))  # a phantom is still a hallucination
                else:
                    row_matches.append((item, float(mt.score), bool(mt.exact)))
                if item < 0:
                    if p.unmatched == "phantom":
                        key = title.strip()
                        if key:
                            new_phantoms.append((r, key))
                    continue
                if item in hset or item in got:
                    continue
                got.append(item)
            hall_matches.append(row_matches)
            cands_used.append(pools[r])
            real_got = [i for i in got if not (i < len(self.phantom) and self.phantom[i])]
            matched_items.extend(real_got)
            n_cold_out += int(sum(1 for i in real_got if pop[i] + self.aug_counts[i] == 0))
            out_pops.append(pop[np.asarray(real_got, np.int64)])
            ref_pops.append(pop[h])
            aug_u.extend([u] * len(got))
            aug_i.extend(got)
        if n_fallback:
            svc.count_fallback("augmenter", n_fallback)
        return {
            "aug_u": aug_u,
            "aug_i": aug_i,
            "hall_matches": hall_matches,
            "cands_used": cands_used,
            "out_pops": out_pops,
            "ref_pops": ref_pops,
            "matched_items": matched_items,
            "new_phantoms": new_phantoms,
            "n_fallback": n_fallback,
            "n_cold_out": n_cold_out,
        }

    def _add_phantoms(self, world, step, new_phantoms, users, hist, ptr, aug_u, aug_i) -> int:
        """Phantom items for the hallucinated titles (``unmatched: phantom``); their pairs are appended to
        ``aug_u``/``aug_i``. Returns the number of new phantom items."""
        p = self.params
        phantom_rows: dict[int, list[int]] = {}
        # phantom items: one per distinct hallucinated title (a later match of it reuses the item)
        n_new = 0
        if new_phantoms:

            rows_by_key: dict[str, list[int]] = {}
            title_by_key: dict[str, str] = {}
            for r, t in new_phantoms:
                k = normalise_title(t)
                if not k:
                    continue
                rows_by_key.setdefault(k, []).append(r)
                title_by_key.setdefault(k, t)
            fresh = [k for k in rows_by_key if k not in self._phantom_by_title]
            room = max(0, p.max_phantoms - int(self.phantom.sum()))
            fresh = fresh[:room]
            if fresh:
                d, G = world.items.dim, world.items.genres.shape[1]
                attrs = np.zeros((len(fresh), d), np.float32)
                gen = np.full((len(fresh), G), 1.0 / G, np.float32)
                for j, k in enumerate(fresh):
                    r = rows_by_key[k][0]
                    h = hist[ptr[r] : ptr[r + 1]]
                    if len(h):
                        attrs[j] = world.items.attrs[h].mean(axis=0)
                        gv = world.items.genres[h].mean(axis=0)
                        gen[j] = gv / max(float(gv.sum()), 1e-12)
                added = CatalogReport(world.items.n, attrs, gen, tuple(title_by_key[k] for k in fresh),
                                      np.full(len(fresh), -1, np.int32), np.zeros(len(fresh), np.int8), step,
                                      source=self.registry_name)
                self._reports.append(added)  # committed by the loop before the interactions below
                new_ids = added.ids
                self._grow(int(new_ids[-1]) + 1)
                self.phantom[new_ids] = True
                for k, i in zip(fresh, new_ids.tolist(), strict=True):
                    self._phantom_by_title[k] = i
                n_new = len(fresh)
            for k, rows in rows_by_key.items():
                item = self._phantom_by_title.get(k)
                if item is None:
                    continue
                for r in rows:
                    u = int(users[r])
                    phantom_rows.setdefault(u, [])
                    if item not in phantom_rows[u]:
                        phantom_rows[u].append(item)
            for u, its in phantom_rows.items():
                aug_u.extend([u] * len(its))
                aug_i.extend(its)
        return n_new

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.state_dict(),
            "phantom": self.phantom.copy(),
            "aug_counts": self.aug_counts.copy(),
            "n_augmented": self.n_augmented,
            "n_fits": self.n_fits,
            "seq": self.seq,
            "last": copy.deepcopy(self.last),
            "phantom_by_title": dict(self._phantom_by_title),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])
        self.phantom = state["phantom"].copy()
        self.aug_counts = state["aug_counts"].copy()
        self.n_augmented = state["n_augmented"]
        self.n_fits = state["n_fits"]
        self.seq = state["seq"]
        self.last = copy.deepcopy(state["last"])
        self._phantom_by_title = dict(state["phantom_by_title"])
        self._matcher = None

    def run_report(self) -> dict[str, Any]:
        return {
            "llm_augmented": {"interactions": int(self.n_augmented), "phantom_items": int(self.phantom.sum())}
        }
