"""Calibrated surrogate LLM (reference F-SURR) for the F-ROLES (augment, recommend, rank, profile).

:class:`SurrogateLLM` implements the same ``generate(requests, params)`` interface as the real
backends, but reads each request's structured ``payload`` instead of the prompt, and writes text in
the format a real model would produce, so the same parsers (:mod:`.parsing`) and matcher
(:mod:`.matching`) measure it.

Tasks and payloads (arrays may be lists or numpy arrays):

``"augment"`` / ``"recommend"`` (F-AUG, generative F-RANK)
    ``candidates`` (item ids the LLM may pick from, usually unconsumed items), ``relevance``
    (aligned floats, default 0), ``popularity`` (aligned phi, default 0), ``n`` (slots, default 10),
    ``titles`` (the catalog title list, or a callable id -> title together with ``n_items``; default:
    the ``titles`` given to the constructor), optional ``candidate_titles`` (aligned strings: the titles
    the prompt shows for the candidates), optional ``exclude`` (item ids never to output) and
    ``seed`` (per-(step, user) int). Output: ``"1. Title\\n2. Title\\n..."``. Per slot: with prob h a
    hallucination - with prob eps_near a near-miss (a real candidate's title with 1-2 character edits,
    difflib ratio >= 0.7 to it, never an exact catalog title), else a fabricated title (token
    recombination, checked to be < 0.7 to every title); otherwise the next item of a Plackett-Luce
    draw without replacement with weights exp(rel/tau_s) * (1+phi)^beta.
    Unknown items: the model knows the catalog it was built with (ids ``0 .. len(catalog)-1``); a
    candidate outside it (an item a creator added later) is weighted like any other, and when picked
    its title is read from ``candidate_titles``, as a real model reads a title it has never seen off
    the prompt (near-misses then edit that title). Without ``candidate_titles`` such a candidate
    cannot be named and is never picked (as if excluded); the catalog is never indexed past its end.
``"rank"`` (F-RANK reranking)
    ``relevance``, ``popularity`` (aligned with the candidates as presented, position 1 first),
    optional ``n`` (how many to output, default all), ``seed``. score_j = rel_j/tau_s + rho*log(1/pos_j)
    + beta*log(1+phi_j); Plackett-Luce sample; output ``"3, 1, 2, ..."`` (1-based positions). No title
    or item id is read, so candidates unknown to the catalog are ranked like any other.
``"profile"`` (F-PROFILE)
    ``history_genre_shares``, ``genre_prior`` (arrays over genres), ``genres`` (names),
    ``n_claims`` (default 3), ``seed``. Each claim is drawn from the user's shares with prob 1-h_p,
    else from the prior (distinct genres). Output ``"The user likes X. The user likes Y."``.

Task aliases: ``"generate"`` = augment, ``"rerank"`` = rank (the names used in :mod:`.types`).

Determinism: each request uses ``default_rng(SeedSequence([params.seed, payload seed, task id]))``
(task id = crc32 of the task name, so the augment and profile draws of the same (step, user) are
independent); requests without a payload seed use crc32 of the prompt. Output therefore never
depends on batching or request order. Cost: the fabricated-title pool is built once per catalog
(seeded by ``params.seed``; ~0.1 s for 2,000 titles, ~2.5 s for 50,000 on 2 cores; a grown
catalog only re-checks the pool against the new titles) and near-misses are cached per title (up to
4 variants, seeded by the model seed and the title), so the hot path has no fuzzy matching:
~3 ms per 100 requests with n=10 slots over 200 candidates. A near-miss that cannot be made (titles
of 1-2 characters) falls back to the real title. In very dense catalogs the fabricated titles mix
in invented pseudo-words, because few pure recombinations are far from every title there.

Calibration helpers: :mod:`.surrogate_fit`.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import Field

from recloop.limits import Seed
from recloop.registry import Params as _ParamsBase
from recloop.registry import register as _register

from .surrogate_pool import _MASK64, _CatalogPool, _fingerprint
from .surrogate_tasks import logits_batch, profile_claims_text, rank_text, recommend_batch
from .types import GenerationParams, LLMBackend, LLMRequest, LLMResponse, as_requests

__all__ = ["SurrogateLLM", "SurrogateParams"]

_PAYLOAD_ERRORS = (ValueError, KeyError, TypeError, IndexError)


class SurrogateParams(_ParamsBase):
    """Parameters of the F-SURR generative model (defaults are uncalibrated placeholders: our choice).

    h: item-hallucination probability per slot; beta: popularity tilt (1+phi)^beta; tau_s:
    relevance temperature; rho: position-bias strength in rerank mode; h_p: probability that a
    profile claim comes from the population prior instead of the user's history; eps_near:
    fraction of hallucinations that are near-misses (they match, ratio >= 0.7); seed: model seed.
    """

    h: float = Field(0.1, ge=0.0, le=1.0)
    beta: float = 0.5
    tau_s: float = Field(1.0, gt=0.0)
    rho: float = 0.3
    h_p: float = Field(0.2, ge=0.0, le=1.0)
    eps_near: float = Field(0.3, ge=0.0, le=1.0)
    seed: Seed = 0



_TASK_ALIASES = {
    "augment": "augment",
    "recommend": "augment",
    "generate": "augment",
    "rank": "rank",
    "rerank": "rank",
    "profile": "profile",
}


@_register("llm_backend", "surrogate")
class SurrogateLLM(LLMBackend):
    """F-SURR surrogate backend: cheap, seeded, and parsed through the same path as a real model.

    Parameters
    ----------
    params: the generative parameters (:class:`SurrogateParams`).
    titles: default catalog titles (used when a payload carries none, and to enumerate a
        callable ``titles`` payload for the fabricated pool).
    pool_size: number of fabricated titles precomputed per catalog.
    threshold: the L-HALL tau used to certify near-misses and fabricated titles.

    ``GenerationParams`` are accepted for interface compatibility; temperature/top_p do not apply
    (randomness is governed by tau_s) and the text is not truncated to ``max_tokens``. Token counts
    in the responses are approximate (characters / 4). ``loglik`` is not available.
    """

    name = "surrogate"
    uses_payload = True
    supports_loglik = False
    Params = SurrogateParams

    def __init__(
        self,
        params: SurrogateParams | Mapping[str, Any] | None = None,
        titles: Sequence[str] | None = None,
        pool_size: int = 512,
        threshold: float = 0.7,
        **fields: Any,
    ) -> None:
        self._take_params(params, fields)
        self.titles = list(titles) if titles is not None else None
        self.pool_size = int(pool_size)
        self.threshold = float(threshold)
        self._pools: OrderedDict[tuple[Any, ...], _CatalogPool] = OrderedDict()
        self._callable_catalogs: dict[int, tuple[Any, list[str]]] = {}
        self._last: tuple[Any, ...] | None = None  # (titles object, len, title_of, params, pool)

    def on_bind(self, context) -> None:
        """Bound without a catalog: take the titles of the run's catalog as it is now."""
        if self.titles is None and context.view is not None:
            self.titles = list(context.view.items.titles)

    @property
    def model_id(self) -> str:
        """``surrogate-v1:<hash of the parameters>`` (enters cache keys)."""
        blob = json.dumps(self.params.model_dump(), sort_keys=True).encode()
        return f"surrogate-v1:{hashlib.sha256(blob).hexdigest()[:16]}"

    # -- catalog handling ------------------------------------------------------------------
    def pool_for(self, titles: Sequence[str]) -> _CatalogPool:
        """The cached per-catalog pool (built on first use; keyed by a cheap content fingerprint)."""
        cfg = (self.params.seed, self.pool_size, self.threshold)
        key = (_fingerprint(titles), *cfg)
        pool = self._pools.get(key)
        if pool is not None:
            self._pools.move_to_end(key)
            return pool
        # a grown catalog (old titles are a prefix): extend the newest matching pool incrementally
        for old_key in reversed(list(self._pools)):
            old = self._pools[old_key]
            n_old = len(old.titles)
            if old_key[1:] == cfg and n_old < len(titles) and _fingerprint(titles, n_old) == old.fingerprint:
                del self._pools[old_key]
                old.extend(list(titles[n_old:]))
                self._pools[key] = old
                return old
        pool = _CatalogPool(titles, self.pool_size, self.params.seed, self.threshold)
        self._pools[key] = pool
        while len(self._pools) > 4:
            self._pools.popitem(last=False)
        return pool

    # -- catalog binding and checkpoints ------------------------------------------------------
    def bind_catalog(self, titles: Sequence[str]) -> None:
        """Take the constructor catalog from ``titles`` (a resumed run's world), keeping its size.

        The model knows the catalog it was built with, not the phantom or creator items appended to
        the world later; a resumed world starts with the same titles, so the model keeps exactly the
        catalog an uninterrupted run has (binding the grown list would change every later answer).
        """
        n = len(titles) if self.titles is None else min(len(self.titles), len(titles))
        self.titles = [str(t) for t in titles[:n]]
        self._last = None

    @staticmethod
    def _digest(titles: Sequence[str]) -> str:
        h = hashlib.sha256()
        for t in titles:
            h.update(str(t).encode("utf-8", "replace") + b"\x00")
        return h.hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """The constructor catalog (size and digest, to verify) and its fabricated-title pools.

        A pool depends on the sizes its catalog had when it was used (each growth filters and tops it
        up), which a rebuild from a resumed catalog cannot reproduce; so each pool of a prefix of
        ``titles`` is saved as that prefix's length and its fabricated titles. Pools of other
        catalogs (payload title lists) are not saved: they are rebuilt on use.
        """
        titles = self.titles if self.titles is not None and not callable(self.titles) else None
        pools = []
        if titles is not None:
            for pool in self._pools.values():
                n = len(pool.titles)
                if n <= len(titles) and all(a == str(b) for a, b in zip(pool.titles, titles[:n], strict=True)):
                    pools.append({"n_titles": n, "fabricated": list(pool.fabricated)})
        return {
            "n_titles": None if titles is None else len(titles),
            "digest": None if titles is None else self._digest(titles),
            "pools": pools,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` over the bound catalog (bind it first); ValueError if it differs."""
        titles = self.titles if self.titles is not None and not callable(self.titles) else None
        n_saved = state.get("n_titles")
        if n_saved is not None and (
            titles is None or len(titles) != int(n_saved) or self._digest(titles) != state.get("digest")
        ):
            raise ValueError("SurrogateLLM: the checkpoint's catalog differs from this run's")
        self._pools.clear()
        self._callable_catalogs.clear()
        self._last = None
        for st in state.get("pools") or []:
            n = int(st["n_titles"])
            if titles is None or n > len(titles):
                raise ValueError(f"SurrogateLLM: a saved title pool covers {n} titles, the catalog has fewer")
            pool = _CatalogPool(
                titles[:n], self.pool_size, self.params.seed, self.threshold, fabricated=st["fabricated"]
            )
            self._pools[(pool.fingerprint, self.params.seed, self.pool_size, self.threshold)] = pool

    def _catalog(self, payload: Mapping[str, Any]) -> tuple[Callable[[int], str], _CatalogPool, int]:
        """``(title_of, pool, n_known)``: the title lookup, the catalog's pool, and how many items the
        model knows (ids ``0 .. n_known-1``; ``title_of`` is only called on those)."""
        t = payload.get("titles", None)
        if t is None:
            if self.titles is None:
                raise ValueError("SurrogateLLM: payload has no 'titles' and no catalog was given")
            t = self.titles
        last = self._last
        if last is not None and last[0] is t and last[1] == len(t) and last[3] is self.params:
            return last[2], last[4], last[1]
        if callable(t):
            fn = t
            if self.titles is not None:
                catalog = self.titles
            else:
                n_items = payload.get("n_items")
                if n_items is None:
                    raise ValueError(
                        "SurrogateLLM: a callable 'titles' needs 'n_items' or constructor titles"
                    )
                hit = self._callable_catalogs.get(id(fn))
                if hit is None or hit[0] is not fn or len(hit[1]) != int(n_items):
                    hit = (fn, [str(fn(i)) for i in range(int(n_items))])
                    self._callable_catalogs[id(fn)] = hit
                catalog = hit[1]
            pool = self.pool_for(catalog)

            def title_of(i: int) -> str:
                return str(fn(int(i)))

            self._last = None  # the callable's catalog size can change: no fast path
            return title_of, pool, len(catalog)
        pool = self.pool_for(t)
        title_of = pool.titles.__getitem__
        self._last = (t, len(t), title_of, self.params, pool)
        return title_of, pool, len(t)

    # -- seeding -----------------------------------------------------------------------------
    def request_rng(self, request: LLMRequest) -> np.random.Generator:
        """The request's generator: ``SeedSequence([params.seed, seed, crc32(task)])``.

        ``seed`` is ``payload["seed"]``, or crc32 of the prompt when the payload has none.
        """
        payload = request.payload or {}
        s = payload.get("seed")
        if s is None:
            s = zlib.crc32(str(request.prompt).encode())
        task_id = zlib.crc32(str(request.task).encode())
        return np.random.default_rng(
            np.random.SeedSequence([int(self.params.seed) & _MASK64, int(s) & _MASK64, task_id])
        )

    # -- tasks -----------------------------------------------------------------------------
    def _recommend(self, payload: Mapping[str, Any], rng: np.random.Generator) -> str:
        return self._recommend_batch([payload], [rng])[0]

    def _recommend_batch(
        self, payloads: Sequence[Mapping[str, Any]], rngs: Sequence[np.random.Generator]
    ) -> list[str]:
        """Augment/recommend texts for payloads sharing the candidate count, ``n`` and the catalog
        (:func:`.surrogate_tasks.recommend_batch`)."""
        return recommend_batch(self, payloads, rngs)

    def _logits_batch(self, payloads: Sequence[Mapping[str, Any]], m: int) -> np.ndarray:
        return logits_batch(self.params, payloads, m)

    def _rank(self, payload: Mapping[str, Any], rng: np.random.Generator) -> str:
        return rank_text(self.params, payload, rng)

    def _profile(self, payload: Mapping[str, Any], rng: np.random.Generator) -> str:
        return profile_claims_text(self.params, payload, rng)

    def generate_text(self, request: LLMRequest) -> str:
        """The text for one request (see the module docstring for tasks and payloads)."""
        payload = request.payload or {}
        rng = self.request_rng(request)
        task = _TASK_ALIASES.get(str(request.task).lower())
        if task == "augment":
            return self._recommend(payload, rng)
        if task == "rank":
            return self._rank(payload, rng)
        if task == "profile":
            return self._profile(payload, rng)
        raise ValueError(
            f"SurrogateLLM: unknown task {request.task!r} (augment/recommend/generate, rank/rerank, profile)"
        )

    def generate(
        self, requests: Sequence[LLMRequest], params: GenerationParams | None = None
    ) -> list[LLMResponse]:
        """One response per request; bad payloads give failed responses (``error`` says why).

        Augment/recommend requests with the same candidate count, ``n`` and catalog object are
        processed as one vectorised batch; the texts do not depend on the grouping.
        """
        requests = as_requests(requests)
        n_req = len(requests)
        texts: list[str] = [""] * n_req
        errors: list[str | None] = [None] * n_req
        walls = [0.0] * n_req
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, req in enumerate(requests):
            if _TASK_ALIASES.get(str(req.task).lower()) == "augment":
                pl = req.payload or {}
                try:
                    key = (
                        np.asarray(pl.get("candidates", ())).size,
                        int(pl.get("n", 10)),
                        id(pl.get("titles")),
                    )
                except (ValueError, TypeError) as e:
                    errors[i] = f"surrogate: {type(e).__name__}: {e}"
                    continue
                groups.setdefault(key, []).append(i)
                continue
            t0 = time.perf_counter()
            try:
                texts[i] = self.generate_text(req)
            except _PAYLOAD_ERRORS as e:
                errors[i] = f"surrogate: {type(e).__name__}: {e}"
            walls[i] = time.perf_counter() - t0
        for idx in groups.values():
            t0 = time.perf_counter()
            try:
                batch = self._recommend_batch(
                    [requests[i].payload or {} for i in idx], [self.request_rng(requests[i]) for i in idx]
                )
                for i, t in zip(idx, batch, strict=True):
                    texts[i] = t
                    walls[i] = (time.perf_counter() - t0) / len(idx)
            except _PAYLOAD_ERRORS:
                for i in idx:  # isolate the bad payload(s)
                    t1 = time.perf_counter()
                    try:
                        texts[i] = self.generate_text(requests[i])
                    except _PAYLOAD_ERRORS as e:
                        errors[i] = f"surrogate: {type(e).__name__}: {e}"
                    walls[i] = time.perf_counter() - t1
        return [
            LLMResponse(
                text=texts[i],
                prompt_tokens=len(str(req.prompt)) // 4,
                completion_tokens=len(texts[i]) // 4,
                failed=errors[i] is not None,
                error=errors[i] or "",
                cached=False,
                wall_s=walls[i],
            )
            for i, req in enumerate(requests)
        ]

    def loglik(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Not available: the surrogate has no token likelihoods (use ``rank`` requests instead)."""
        raise NotImplementedError("SurrogateLLM has no token log-likelihoods; use task='rank'")
