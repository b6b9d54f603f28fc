"""What the F-SURR surrogate (:mod:`.surrogate`) writes per task: numbered title lists (augment /
recommend), rankings (rank) and genre profiles (profile), from a request's payload and generator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


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


def recommend_batch(
    sur: Any, payloads: Sequence[Mapping[str, Any]], rngs: Sequence[np.random.Generator]
) -> list[str]:
    """Augment/recommend texts for payloads sharing the candidate count, ``n`` and the catalog.

    Vectorised over the batch; each row uses only its own generator, so a request's text is the
    same whatever batch it is in. Candidates outside the known catalog take their title from the
    row's ``candidate_titles``, or are masked out without it (module docstring, "Unknown items").
    """
    p = sur.params
    b = len(payloads)
    m = int(np.asarray(payloads[0].get("candidates", ())).size)
    n = int(payloads[0].get("n", 10))
    title_of, pool, n_known = sur._catalog(payloads[0])
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
        _pick_candidates(p, payloads, u, n, m, kmax, n_items, n_known, title_of, picked, named)
    return _write_lists(pool, title_of, u, n, hall, fabricated, picked, named)


def _pick_candidates(p, payloads, u, n, m, kmax, n_items, n_known, title_of, picked, named) -> None:
    """Fill ``picked`` (item ids per row, in Plackett-Luce order) and ``named`` (their titles, for rows
    with candidates unknown to the catalog) from the rows' Gumbel draws ``u[:, 4n:]``."""
    b = len(payloads)
    cands = np.empty((b, m), dtype=np.int64)
    for r, pl in enumerate(payloads):
        cands[r] = np.asarray(pl.get("candidates", ()), dtype=np.int64).ravel()
    logits = logits_batch(p, payloads, m)
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


def _write_lists(pool, title_of, u, n, hall, fabricated, picked, named) -> list[str]:
    """The numbered title lists: per slot a fabricated title, or the next picked item (a near-miss of
    its title when the slot hallucinates); rows stop when their candidates run out."""
    b = len(picked)
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


def logits_batch(p: Any, payloads: Sequence[Mapping[str, Any]], m: int) -> np.ndarray:
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

def rank_text(p: Any, payload: Mapping[str, Any], rng: np.random.Generator) -> str:
    """A ranking of the presented candidates: ``"3, 1, 2, ..."`` (1-based positions)."""
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

def profile_claims_text(p: Any, payload: Mapping[str, Any], rng: np.random.Generator) -> str:
    """A genre profile: ``"The user likes X. The user likes Y."``."""
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
