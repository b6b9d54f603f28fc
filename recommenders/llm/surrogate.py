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

Calibration helpers (F-SURR "Calibration against the real model"): :func:`fit_beta`,
:func:`fit_rho`, :func:`expected_lpd_fn`, :func:`calibrate`, :func:`validate_surrogate`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from recloop.limits import Seed

from .matching import TitleMatcher, normalise_title, ratio, split_year
from .types import GenerationParams, LLMBackend, LLMRequest, LLMResponse, as_requests

try:  # the registry is part of recloop; keep this module importable on its own all the same
    from recloop.registry import Params as _ParamsBase
    from recloop.registry import register as _register
except ImportError:  # pragma: no cover - only outside a recloop checkout

    class _ParamsBase(BaseModel):  # type: ignore[no-redef]
        model_config = ConfigDict(extra="forbid", frozen=True)

    def _register(kind: str, name: str):  # type: ignore[no-redef]
        return lambda cls: cls


__all__ = [
    "SurrogateParams",
    "SurrogateLLM",
    "fit_beta",
    "fit_rho",
    "fit_monotone",
    "expected_lpd_fn",
    "calibrate",
    "calibrate_surrogate",
    "validate_surrogate",
]

_MASK64 = (1 << 64) - 1
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


# --------------------------------------------------------------------------------------------
# hallucination material
# --------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"[^\W\d_][\w']*", re.UNICODE)
_FILLER = (
    "Zephyr",
    "Marrow",
    "Quill",
    "Vantor",
    "Obsidian",
    "Lantern",
    "Kestrel",
    "Umber",
    "Solace",
    "Brimwood",
    "Harrow",
    "Juniper",
    "Cobalt",
    "Whisper",
    "Ferrule",
    "Tamarind",
    "Glimmer",
    "Orrery",
    "Pallor",
    "Thistle",
)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


_SYLLABLES = (
    "ka",
    "zor",
    "vel",
    "thi",
    "mur",
    "dax",
    "quo",
    "ren",
    "sil",
    "bra",
    "nox",
    "lum",
    "tev",
    "gri",
    "osh",
    "pra",
    "yel",
    "fen",
    "wix",
    "dro",
    "sam",
    "ulk",
    "ith",
    "vor",
    "jan",
    "ek",
)


def _pseudo_word(rng: np.random.Generator) -> str:
    k = int(rng.integers(2, 4))
    return "".join(_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), size=k)).capitalize()


def _fingerprint(titles: Sequence[str], n: int | None = None) -> tuple[Any, ...]:
    """Cheap content key of the first ``n`` titles (length plus a few sampled titles)."""
    n = len(titles) if n is None else n
    if n == 0:
        return (0,)
    picks = {0, n - 1, n // 2, n // 3, (2 * n) // 3, n // 7}
    return (n, *(str(titles[i]) for i in sorted(picks)))


class _CatalogPool:
    """Per-catalog material: the matcher (exact lookup, far-check) and a pool of fabricated titles.

    The pool depends on how the catalog grew (:meth:`extend` filters and tops it up), not only on the
    titles, so a checkpoint keeps it: ``fabricated`` restores a saved pool instead of building one.
    """

    def __init__(
        self,
        titles: Sequence[str],
        size: int,
        seed: int,
        threshold: float,
        fabricated: Sequence[str] | None = None,
    ) -> None:
        self.titles = [str(t) for t in titles]
        self.size = int(size)
        self.seed = int(seed)
        self.threshold = threshold
        self.fingerprint = _fingerprint(self.titles)
        self.matcher = TitleMatcher(self.titles, threshold=threshold)
        self._near: dict[str, tuple[str, ...]] = {}
        self.fabricated: list[str] = []
        if fabricated is not None:
            self.fabricated = [str(f) for f in fabricated]
        else:
            self._fabricate(self.size, round_offset=0)

    def extend(self, new_titles: Sequence[str]) -> None:
        """Append titles (a growing catalog): re-check the fabricated pool against the new titles only."""
        new = [str(t) for t in new_titles]
        if not new:
            return
        self.titles.extend(new)
        self.fingerprint = _fingerprint(self.titles)
        self.matcher.extend(new)
        self._near.clear()
        bound = TitleMatcher(new, threshold=self.threshold).max_possible_scores(self.fabricated)
        self.fabricated = [f for f, b in zip(self.fabricated, bound, strict=True) if b < self.threshold]
        if len(self.fabricated) < (3 * self.size) // 4:  # top up only when many were lost
            self._fabricate(self.size, round_offset=len(self.titles))

    def _fabricate(self, size: int, round_offset: int) -> None:
        """Fill the pool with token recombinations certified far (< threshold) from every title.

        Candidates join 2-4 tokens drawn from the catalog's title vocabulary (by frequency). In dense
        catalogs, where few recombinations are far from every title, later rounds replace a growing
        number of tokens by invented pseudo-words, so the pool always fills within a few rounds.
        """
        rng = np.random.default_rng(np.random.SeedSequence([self.seed & _MASK64, 0xFAB, round_offset]))
        vocab: list[str] = []
        for t in self.titles:
            vocab.extend(w for w in _WORD_RE.findall(split_year(t)[0]) if len(w) >= 2)
        if len(set(vocab)) < 8:
            vocab.extend(_FILLER)
        vocab_arr = np.array(vocab, dtype=object)
        pool = self.fabricated
        seen: set[str] = {normalise_title(f) for f in pool}
        invented = 0  # how many tokens per candidate are invented pseudo-words
        for _round in range(8):
            need = size - len(pool)
            if need <= 0:
                break
            m = min((5 * need) // 4 + 16, 4096) if invented == 0 else min(2 * need + 16, 4096)
            lens = rng.integers(2, 5, size=m)
            words = vocab_arr[rng.integers(0, len(vocab_arr), size=int(lens.sum()))]
            cands: list[str] = []
            pos = 0
            for L in lens.tolist():
                ws = [w[:1].upper() + w[1:] for w in words[pos : pos + L]]
                pos += L
                for k in range(min(invented, L)):
                    ws[(k * 2 + 1) % L] = _pseudo_word(rng)
                if len({w.lower() for w in ws}) < L:  # no "The The"
                    continue
                cand = " ".join(ws)
                key = normalise_title(cand)
                if key and key not in seen:
                    seen.add(key)
                    cands.append(cand)
            if not cands:
                invented += 1
                continue
            bound = self.matcher.max_possible_scores(cands)
            passed = 0
            for c, b in zip(cands, bound, strict=True):
                if b < self.threshold:
                    passed += 1
                    if len(pool) < size:
                        pool.append(c)
            if passed < 0.5 * len(cands):
                invented += 1
        if not pool:  # pragma: no cover - essentially impossible with invented words
            raise RuntimeError("SurrogateLLM: could not fabricate titles far from the catalog")

    def near_misses(self, title: str, k: int = 4) -> tuple[str, ...]:
        """Up to ``k`` cached near-miss variants of ``title`` (seeded by the model seed and the title)."""
        hit = self._near.get(title)
        if hit is None:
            rng = np.random.default_rng(
                np.random.SeedSequence([self.seed & _MASK64, 0x4E4D, zlib.crc32(title.encode())])
            )
            out: list[str] = []
            for _ in range(k):
                v = self.near_miss(title, rng)
                if v is not None and v not in out:
                    out.append(v)
            hit = tuple(out)
            if len(self._near) > 500_000:
                self._near.clear()
            self._near[title] = hit
        return hit

    def near_miss(self, title: str, rng: np.random.Generator) -> str | None:
        """A 1-2 character edit of ``title`` with difflib ratio >= threshold, not an exact catalog title."""
        base, _ = split_year(title)
        suffix = title[len(base) :]
        orig = normalise_title(title)
        if not orig:
            return None
        for attempt in range(10):
            n_edits = int(rng.integers(1, 3)) if attempt < 5 else 1
            chars = list(base)
            for _ in range(n_edits):
                alnum = [k for k, c in enumerate(chars) if c.isalnum()]
                if not alnum:
                    break
                k = alnum[int(rng.integers(0, len(alnum)))]
                op = int(rng.integers(0, 4)) if attempt < 8 else 2  # late attempts: insertions only
                letter = _LETTERS[int(rng.integers(0, 26))]
                if op == 0:
                    chars[k] = letter if chars[k].lower() != letter else _LETTERS[(ord(letter) - 96) % 26]
                elif op == 1 and len(alnum) > 3:
                    del chars[k]
                elif op == 3 and k + 1 < len(chars) and chars[k + 1].isalnum() and chars[k + 1] != chars[k]:
                    chars[k], chars[k + 1] = chars[k + 1], chars[k]
                else:
                    chars.insert(k + 1, letter)
            cand = "".join(chars) + suffix
            key = normalise_title(cand)
            if key == orig or self.matcher.exact_item(key) >= 0:
                continue
            if ratio(key, orig) >= self.threshold:
                return cand
        return None


# --------------------------------------------------------------------------------------------
# the surrogate backend
# --------------------------------------------------------------------------------------------


def _as_float(x: Any, n: int, default: float = 0.0) -> np.ndarray:
    if x is None:
        return np.full(n, default, dtype=float)
    a = np.asarray(x, dtype=float)
    if a.ndim != 1:
        a = a.ravel()
    if a.size != n:
        raise ValueError(f"SurrogateLLM: payload array has {a.size} entries, expected {n}")
    return a


def _top_order(keys: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest keys, largest first (Gumbel top-k = Plackett-Luce without replacement)."""
    k = min(k, keys.size)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k < keys.size:
        top = np.argpartition(-keys, k - 1)[:k]
        return top[np.argsort(-keys[top], kind="stable")]
    return np.argsort(-keys, kind="stable")


def _gumbel_order(logits: np.ndarray, rng: np.random.Generator, k: int) -> np.ndarray:
    """Indices of a Plackett-Luce sample without replacement (first k), via Gumbel top-k."""
    return _top_order(logits + rng.gumbel(size=logits.size), k)


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
    Params = SurrogateParams

    def __init__(
        self,
        params: SurrogateParams | Mapping[str, Any] | None = None,
        titles: Sequence[str] | None = None,
        pool_size: int = 512,
        threshold: float = 0.7,
        **context: Any,
    ) -> None:
        own = {k: context.pop(k) for k in list(context) if k in SurrogateParams.model_fields}
        if params is None:
            params = SurrogateParams(**own)
        elif not isinstance(params, SurrogateParams):
            params = SurrogateParams(**{**dict(params), **own})
        elif own:
            params = params.model_copy(update=own)
        self.params = params
        self.context = context
        self.titles = list(titles) if titles is not None else None
        self.pool_size = int(pool_size)
        self.threshold = float(threshold)
        self._pools: OrderedDict[tuple[Any, ...], _CatalogPool] = OrderedDict()
        self._callable_catalogs: dict[int, tuple[Any, list[str]]] = {}
        self._last: tuple[Any, ...] | None = None  # (titles object, len, title_of, params, pool)

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
        """Augment/recommend texts for payloads sharing the candidate count, ``n`` and the catalog.

        Vectorised over the batch; each row uses only its own generator, so a request's text is the
        same whatever batch it is in. Candidates outside the known catalog take their title from the
        row's ``candidate_titles``, or are masked out without it (module docstring, "Unknown items").
        """
        p = self.params
        b = len(payloads)
        m = int(np.asarray(payloads[0].get("candidates", ())).size)
        n = int(payloads[0].get("n", 10))
        title_of, pool, n_known = self._catalog(payloads[0])
        # one draw per request, in a fixed layout -> the stream never depends on branch outcomes
        u = np.empty((b, 4 * n + m))
        for r, g in enumerate(rngs):
            u[r] = g.random(4 * n + m)
        hall = u[:, :n] < p.h
        fabricated = hall & (u[:, n : 2 * n] >= p.eps_near)
        n_items = n - fabricated.sum(axis=1)
        kmax = int(n_items.max()) if b else 0
        picked: list[list[int]] = [[] for _ in range(b)]
        named: list[list[str] | None] = [None] * b  # picked titles of rows with unknown candidates
        if m and kmax > 0:
            cands = np.empty((b, m), dtype=np.int64)
            for r, pl in enumerate(payloads):
                cands[r] = np.asarray(pl.get("candidates", ()), dtype=np.int64).ravel()
            logits = self._logits_batch(payloads, m)
            unknown = (cands < 0) | (cands >= n_known)
            shown: dict[int, list[str]] = {}  # row -> candidate_titles, for rows with unknown candidates
            for r in np.flatnonzero(unknown.any(axis=1)).tolist():
                ct = payloads[r].get("candidate_titles")
                if ct is None:
                    logits[r, unknown[r]] = -np.inf  # cannot be named: never picked
                    continue
                ct = [str(x) for x in ct]
                if len(ct) != m:
                    raise ValueError(f"SurrogateLLM: 'candidate_titles' has {len(ct)} entries, expected {m}")
                shown[r] = ct
            excl = [pl.get("exclude") for pl in payloads]
            for r, ex in enumerate(excl):
                if ex is not None:
                    logits[r] = np.where(
                        np.isin(cands[r], np.asarray(ex, dtype=np.int64)), -np.inf, logits[r]
                    )
            # Gumbel(0,1) = -log(-log U); U = 0 (probability 2**-53) is clipped
            keys = logits - np.log(-np.log(np.maximum(u[:, 4 * n :], 1e-300)))
            k = min(kmax, m)
            if k < m:
                top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
            else:
                top = np.broadcast_to(np.arange(m), (b, m))
            order = np.take_along_axis(
                top, np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind="stable"), axis=1
            )
            chosen = np.take_along_axis(cands, order, axis=1)
            ok = np.isfinite(np.take_along_axis(logits, order, axis=1))
            chosen_l, ok_l = chosen.tolist(), ok.tolist()
            for r in range(b):
                row = chosen_l[r][: int(n_items[r])]
                picked[r] = (
                    row if all(ok_l[r][: len(row)]) else [c for c, o in zip(row, ok_l[r], strict=False) if o]
                )
            for r, ct in shown.items():
                pos = [q for q, o in zip(order[r, : int(n_items[r])].tolist(), ok_l[r], strict=False) if o]
                named[r] = [ct[q] if unknown[r, q] else title_of(int(cands[r, q])) for q in pos]
        hall_l, fab_l, extra_l = hall.tolist(), fabricated.tolist(), u[:, 2 * n : 4 * n].tolist()
        n_fab = len(pool.fabricated)
        texts = []
        for r in range(b):
            lines: list[str] = []
            nxt = 0
            hall_r, fab_r, extra, pk, nm = hall_l[r], fab_l[r], extra_l[r], picked[r], named[r]
            for s in range(n):
                if fab_r[s]:
                    title = pool.fabricated[int(extra[s] * n_fab)]
                else:
                    if nxt >= len(pk):
                        continue  # candidates exhausted
                    title = title_of(pk[nxt]) if nm is None else nm[nxt]
                    nxt += 1
                    if hall_r[s]:
                        variants = pool.near_misses(title)
                        if variants:
                            title = variants[int(extra[n + s] * len(variants))]
                lines.append(f"{len(lines) + 1}. {title}")
            texts.append("\n".join(lines))
        return texts

    def _logits_batch(self, payloads: Sequence[Mapping[str, Any]], m: int) -> np.ndarray:
        p = self.params
        b = len(payloads)
        logits = np.zeros((b, m))
        if any(pl.get("relevance") is not None for pl in payloads):
            for r, pl in enumerate(payloads):
                rel = pl.get("relevance")
                if rel is not None:
                    logits[r] = _as_float(rel, m)
            logits *= 1.0 / p.tau_s
        if p.beta != 0.0 and any(pl.get("popularity") is not None for pl in payloads):
            pop = np.zeros((b, m))
            for r, pl in enumerate(payloads):
                ph = pl.get("popularity")
                if ph is not None:
                    pop[r] = _as_float(ph, m)
            logits += p.beta * np.log1p(np.maximum(pop, 0.0))
        return logits

    def _rank(self, payload: Mapping[str, Any], rng: np.random.Generator) -> str:
        p = self.params
        rel = payload.get("relevance")
        if rel is None:
            k = len(payload.get("candidates", []))
            rel = np.zeros(k)
        rel = np.asarray(rel, dtype=float).ravel()
        k = rel.size
        pop = _as_float(payload.get("popularity"), k)
        pos = np.arange(1, k + 1, dtype=float)
        score = rel / p.tau_s - p.rho * np.log(pos) + p.beta * np.log1p(np.maximum(pop, 0.0))
        n = int(payload.get("n", k) or k)
        order = _gumbel_order(score, rng, n)
        return ", ".join(str(int(i) + 1) for i in order)

    def _profile(self, payload: Mapping[str, Any], rng: np.random.Generator) -> str:
        p = self.params
        genres = [str(g) for g in payload["genres"]]
        g = len(genres)
        shares = _as_float(payload.get("history_genre_shares"), g)
        prior = _as_float(payload.get("genre_prior"), g, default=1.0)
        n_claims = int(payload.get("n_claims", 3))
        u_src = rng.random(n_claims)
        u_pick = rng.random(n_claims)
        avail = np.ones(g, dtype=bool)
        out: list[str] = []
        for c in range(n_claims):
            first, second = (prior, shares) if u_src[c] < p.h_p else (shares, prior)
            w = np.where(avail, np.maximum(first, 0.0), 0.0)
            if w.sum() <= 0:
                w = np.where(avail, np.maximum(second, 0.0), 0.0)
            if w.sum() <= 0:
                break
            cdf = np.cumsum(w)
            k = min(int(np.searchsorted(cdf, u_pick[c] * cdf[-1], side="right")), g - 1)
            while not avail[k] or w[k] <= 0:  # guard against float edge cases
                k = int(np.flatnonzero(w > 0)[-1])
            avail[k] = False
            out.append(f"The user likes {genres[k]}.")
        return " ".join(out)

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


# --------------------------------------------------------------------------------------------
# calibration (F-SURR "Calibration against the real model")
# --------------------------------------------------------------------------------------------


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
    from recloop.analysis.llm_metrics import position_bias_slope

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
