"""The probe set of ``recloop llm calibrate`` (:mod:`.calibrate`): stratified users, probe prompts and
payloads, asking a backend in batches, and measuring the figures the surrogate is fitted to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recloop.analysis import llm_metrics as L
from recloop.analysis.metrics import short_head_mask

from .matching import TitleMatcher
from .parsing import parse_ranking, parse_title_list
from .profile_claims import parse_profile_claims
from .profile_text import GENRE_ALIASES, _describe_user, _gender_key, _item_genre_names, _side_info, demographic_groups
from .role_augment import LLMAugmented
from .role_profile import LLMProfiler
from .role_rank import LLMRank
from .types import GenerationParams, LLMRequest

__all__ = ["Probe", "ProbeSet", "build_probes", "run_probes", "measure", "cluster_se"]

NAN = float("nan")


@dataclass
class Probe:
    kind: str  # recommend | profile | rank
    user: int
    request: LLMRequest
    split: str = "fit"  # fit | heldout
    info: dict[str, Any] = field(default_factory=dict)  # what measuring needs (candidates, shares, ...)


@dataclass
class ProbeSet:
    probes: list[Probe]
    world: Any
    popularity: np.ndarray
    head: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def of(self, kind: str, split: str | None = None) -> list[Probe]:
        return [p for p in self.probes if p.kind == kind and (split is None or p.split == split)]


def _zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.size < 2:
        return np.zeros_like(x)
    s = x.std()
    return (x - x.mean()) / (s if s > 0 else 1.0)


def stratified_users(world, hist_ptr: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct users spread evenly over strata of activity tercile x gender (when known)."""
    lens = np.diff(hist_ptr)[: world.users.n]
    eligible = np.flatnonzero(lens >= 3)
    if len(eligible) == 0:
        return eligible
    q = np.quantile(lens[eligible], [1 / 3, 2 / 3])
    act = np.searchsorted(q, lens[eligible], side="right")
    strata = act.astype(np.int64)
    gender = (world.users.attributes or {}).get("gender")
    if gender is not None:

        g = np.array(
            [{"female": 0, "male": 1}.get(_gender_key(v) or "", 2) for v in np.asarray(gender)[eligible]]
        )
        strata = strata * 3 + g
    groups = [eligible[strata == s] for s in np.unique(strata)]
    groups = [rng.permutation(gr) for gr in groups]
    out: list[int] = []
    k = 0
    while len(out) < min(n, len(eligible)):  # round robin over strata
        gr = groups[k % len(groups)]
        j = k // len(groups)
        if j < len(gr):
            out.append(int(gr[j]))
        k += 1
        if k > len(groups) * (len(eligible) + 1):
            break
    return np.asarray(out, np.int64)


def probe_kinds(count: int, shares: tuple[float, float, float]) -> list[str]:
    """The kind of each probe k = 0..count-1: a fixed interleaving with the given shares (largest
    deficit first), so the first m probes of a larger set are exactly the probes of a set of m."""
    kinds = ("recommend", "profile", "rank")
    w = np.asarray(shares, np.float64) / float(sum(shares))
    done = np.zeros(3)
    out = []
    for k in range(count):
        j = int(np.argmax(w * (k + 1) - done))
        done[j] += 1
        out.append(kinds[j])
    return out


def build_probes(
    world,
    initial,
    *,
    probes: int = 200,
    seed: int = 0,
    n: int = 5,
    candidates: int = 20,
    rank_candidates: int = 10,
    history_len: int = 10,
    heldout: float = 0.3,
    shares: tuple[float, float, float] = (0.5, 0.25, 0.25),
) -> ProbeSet:
    """The probe set over stratified users of ``world`` whose histories are ``initial`` (TrainingData).

    ``probes`` prompts in all, interleaved by ``shares`` into recommend / profile / rank probes, one
    user each (stratified round robin); each recommend probe is held out for validation with
    probability ``heldout``. Every probe draws from its own generator (seed, k), so the probe set is
    prefix-stable: growing ``--probes`` keeps the earlier prompts, and their cached answers.
    """

    n_users, n_items = world.users.n, world.items.n
    u_all = np.asarray(initial.users, np.int64)
    i_all = np.asarray(initial.items, np.int64)
    order = np.lexsort((i_all, u_all))
    u_all, i_all = u_all[order], i_all[order]
    ptr = np.zeros(n_users + 1, np.int64)
    np.cumsum(np.bincount(u_all, minlength=n_users), out=ptr[1:])
    pop = np.bincount(np.unique(u_all * n_items + i_all) % n_items, minlength=n_items).astype(np.float64)

    head = short_head_mask(pop)
    genres = world.items.genres[:n_items].astype(np.float64)
    names = list(world.items.genre_names)
    titles = world.items.titles
    users = stratified_users(
        world, ptr, probes, np.random.default_rng(np.random.SeedSequence([int(seed), 0x57A7]))
    )
    kinds = probe_kinds(len(users), shares)
    attrs = world.users.attributes or {}
    grp, _ids, _ = (
        demographic_groups(attrs, n_users, [a for a in ("gender", "age") if a in attrs], [25, 45])
        if any(a in attrs for a in ("gender", "age"))
        else (np.full(n_users, -1), [], [])
    )
    # genre priors per demographic group (for the stereotyped-claim rate and the surrogate's prior)
    lens = np.diff(ptr)
    sh_all = np.zeros((n_users, genres.shape[1]))
    np.add.at(sh_all, np.repeat(np.arange(n_users), lens), genres[i_all])
    has = lens > 0
    sh_all[has] /= lens[has, None]
    pop_prior = sh_all[has].mean(axis=0)

    def prior_of(u: int) -> np.ndarray:
        g = int(grp[u])
        sel = (grp == g) & has if g >= 0 else has
        return sh_all[sel].mean(axis=0) if sel.any() else pop_prior

    def hist(u: int) -> np.ndarray:
        return i_all[ptr[u] : ptr[u + 1]]

    def shown_history(u: int, rng: np.random.Generator) -> str:
        h = hist(u)
        if len(h) > history_len:
            h = rng.choice(h, size=history_len, replace=False)
        return "\n".join(f"- {titles[i]}" for i in h.tolist()) or "(no history yet)"

    def relevance(pool: np.ndarray, share: np.ndarray) -> np.ndarray:
        # what an LLM can read off titles: genre similarity to the history (z-scored), as R1 and R3 do
        g = genres[pool]
        return _zscore(g @ share / (np.linalg.norm(g, axis=1) * (np.linalg.norm(share) or 1.0) + 1e-12))

    out: list[Probe] = []
    for k, (u, kind) in enumerate(zip(users.tolist(), kinds, strict=True)):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xCA1B, k]))
        h = hist(u)
        share = genres[h].mean(axis=0)
        if kind == "recommend":
            held = bool(rng.random() < heldout)
            pool = np.setdiff1d(np.arange(n_items), h)
            pool = rng.choice(pool, size=min(candidates, len(pool)), replace=False)
            prompt = LLMAugmented.DEFAULT_PROMPT.format(
                history=shown_history(u, rng),
                candidates="\n".join(f"- {titles[i]}" for i in pool.tolist()),
                n=n,
            )
            payload = {
                "candidates": pool.tolist(),
                "relevance": relevance(pool, share).tolist(),
                "popularity": pop[pool].tolist(),
                "n": n,
                "seed": int(rng.integers(2**31)),
                "user": u,
            }
            out.append(
                Probe(
                    "recommend",
                    u,
                    LLMRequest(prompt, "augment", payload),
                    "heldout" if held else "fit",
                    {"candidates": pool, "ref_pops": pop[h], "n": n},
                )
            )
        elif kind == "profile":
            lines = []
            for i in h[:15].tolist():
                gn = _item_genre_names(world, i)
                lines.append(f"- {titles[i]}" + (f" ({', '.join(gn)})" if gn else ""))
            prompt = LLMProfiler.DEFAULT_PROMPT.format(
                history="\n".join(lines), demographics="", noun="movies"
            )
            payload = {
                "history_genre_shares": share.tolist(),
                "genre_prior": pop_prior.tolist(),
                "genres": names,
                "n_claims": 3,
                "seed": int(rng.integers(2**31)),
                "user": u,
            }
            out.append(
                Probe(
                    "profile",
                    u,
                    LLMRequest(prompt, "profile", payload),
                    "fit",
                    {
                        "shares": share,
                        "prior": prior_of(u),
                        "side": _side_info(attrs, u),
                        "demographics": _describe_user(attrs, u) if attrs else "",
                    },
                )
            )
        else:
            pool = np.setdiff1d(np.arange(n_items), h)
            pool = rng.choice(pool, size=min(rank_candidates, len(pool)), replace=False)  # a random order
            ctext = "\n".join(f"[{q + 1}] {titles[i]}" for q, i in enumerate(pool.tolist()))
            prompt = LLMRank.DEFAULT_PROMPT.format(
                history=shown_history(u, rng), candidates=ctext, m=len(pool)
            )
            payload = {
                "relevance": relevance(pool, share).tolist(),
                "popularity": pop[pool].tolist(),
                "n": len(pool),
                "seed": int(rng.integers(2**31)),
                "user": u,
            }
            out.append(
                Probe(
                    "rank",
                    u,
                    LLMRequest(prompt, "rank", payload),
                    "fit",
                    {"candidates": pool, "titles": [titles[i] for i in pool.tolist()]},
                )
            )
    count = {kd: sum(1 for p in out if p.kind == kd) for kd in ("recommend", "profile", "rank")}
    meta = {
        "probes": len(out),
        **count,
        "heldout": sum(1 for p in out if p.split == "heldout"),
        "n": n,
        "candidates": candidates,
        "rank_candidates": rank_candidates,
        "seed": seed,
    }
    return ProbeSet(out, world, pop, head, meta)


def run_probes(
    generate: Callable[[list[LLMRequest], GenerationParams], list[Any]],
    probes: Sequence[Probe],
    params: dict[str, GenerationParams],
    batch: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> list[str | None]:
    """Texts of ``generate`` for every probe (None for failed answers), kind by kind in batches."""
    texts: list[str | None] = [None] * len(probes)
    done = 0
    for kind in ("recommend", "profile", "rank"):
        idx = [j for j, p in enumerate(probes) if p.kind == kind]
        for s in range(0, len(idx), batch):
            chunk = idx[s : s + batch]
            resps = generate([probes[j].request for j in chunk], params[kind])
            for j, r in zip(chunk, resps, strict=True):
                texts[j] = None if getattr(r, "failed", False) else r.text
            done += len(chunk)
            if progress is not None:
                progress(done, len(probes))
    return texts


def measure(
    ps: ProbeSet, probes: Sequence[Probe], texts: Sequence[str | None], matcher: TitleMatcher | None = None
) -> dict[str, Any]:
    """L-HALL / L-POPBIAS / L-PROFHALL / position figures of answers ``texts`` to ``probes``."""


    world = ps.world
    matcher = matcher or TitleMatcher(list(world.items.titles[: world.items.n]))
    names = list(world.items.genre_names)
    gen = near = hall = dup = 0
    out_pops, ref_pops, items_all = [], [], []
    ph, st, claims_n = [], [], []
    first_pos, n_pres = [], []
    per_probe: list[tuple[int, int, int, int]] = []  # (generated, hallucinated, matched, in head)
    failed = {"recommend": 0, "profile": 0, "rank": 0}
    unparsable = {"recommend": 0, "profile": 0, "rank": 0}
    for p, t in zip(probes, texts, strict=True):
        if t is None or not str(t).strip():
            failed[p.kind] += 1
            continue
        if p.kind == "recommend":
            titles = parse_title_list(t, max_items=2 * p.info["n"])
            if not titles:
                unparsable["recommend"] += 1
                continue
            seen: set[int] = set()
            got = []
            g0, h0 = gen, hall
            for m in matcher.match(titles):
                gen += 1
                if m.item < 0:
                    hall += 1
                    continue
                if not m.exact:
                    near += 1
                if m.item in seen:
                    dup += 1
                seen.add(m.item)
                got.append(m.item)
            items_all.extend(got)
            per_probe.append((gen - g0, hall - h0, len(got), int(ps.head[np.asarray(got, np.int64)].sum())))
            out_pops.append(ps.popularity[np.asarray(got, np.int64)])
            ref_pops.append(np.asarray(p.info["ref_pops"], np.float64))
        elif p.kind == "profile":
            claims = parse_profile_claims(t, names, aliases=GENRE_ALIASES)
            r = L.profile_hallucination(
                claims, p.info["shares"], names, side_info=p.info.get("side"), prior=p.info.get("prior")
            )
            claims_n.append(r["n_claims"])
            if math.isfinite(r["prof_hall"]):
                ph.append(r["prof_hall"])
            if math.isfinite(r["stereotyped_rate"]):
                st.append(r["stereotyped_rate"])
        elif p.kind == "rank":
            ranked = parse_ranking(t, len(p.info["candidates"]), titles=p.info["titles"])
            if not ranked:
                unparsable["rank"] += 1
                continue
            first_pos.append(int(ranked[0]) + 1)
            n_pres.append(len(p.info["candidates"]))
    items = np.asarray(items_all, np.int64)
    res: dict[str, Any] = {
        "n_generated": gen,
        "n_matched": int(items.size),
        "hall_rate": hall / gen if gen else NAN,
        "near_miss_rate": near / gen if gen else NAN,
        "duplicate_rate": dup / gen if gen else NAN,
        "lpd": L.lpd(out_pops, ref_pops) if out_pops else NAN,
        "head_share": float(ps.head[items].mean()) if items.size else NAN,
        "percentiles": L.popularity_percentiles(items, ps.popularity).tolist() if items.size else [],
        "prof_hall": float(np.mean(ph)) if ph else NAN,
        "stereotyped_rate": float(np.mean(st)) if st else NAN,
        "claims_per_profile": float(np.mean(claims_n)) if claims_n else NAN,
        "no_claim_share": float(np.mean([c == 0 for c in claims_n])) if claims_n else NAN,
        "first_positions": first_pos,
        "n_presented": n_pres,
        "rho": L.position_bias_slope(first_pos, n_pres) if first_pos else NAN,
        "failed": failed,
        "unparsable": unparsable,
        "per_probe": per_probe,
    }
    return res


def cluster_se(per_probe: Sequence[tuple[int, int, int, int]], num: int, den: int) -> float:
    """Standard error of a ratio sum(num)/sum(den) over probes (cluster-robust: the titles of one answer
    are not independent, e.g. a degenerate answer repeats one hallucination five times)."""
    a = np.asarray(per_probe, np.float64)
    if a.ndim != 2 or len(a) < 2 or a[:, den].sum() <= 0:
        return NAN
    x, y = a[:, num], a[:, den]
    r = x.sum() / y.sum()
    n = len(a)
    return float(math.sqrt(n / (n - 1) * np.sum((x - r * y) ** 2)) / y.sum())
