"""The texts and personas of the R2 profiler (:mod:`.role_profile`) and its L-DEMOJSD probe
(:mod:`.profile_metrics`): genre aliases, the probe settings, demographic groups and personas,
user descriptions and side information, and the embedded item texts.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import numpy as np
from pydantic import Field

from recloop.limits import MAX_ITEMS, MAX_ITERATIONS, MAX_K, MAX_STEPS, MAX_TOKENS
from recloop.recommenders.base import TrainingData
from recloop.registry import Params

from .profile_claims import parse_profile_claims

#: Phrases a model uses for MovieLens genres (extra to plural / hyphen variants).
GENRE_ALIASES = {
    "science fiction": "Sci-Fi",
    "science-fiction": "Sci-Fi",
    "scifi": "Sci-Fi",
    "sf": "Sci-Fi",
    "animated": "Animation",
    "cartoon": "Animation",
    "kids": "Children's",
    "children": "Children's",
    "childrens": "Children's",
    "family": "Children's",
    "romantic": "Romance",
    "romances": "Romance",
    "noir": "Film-Noir",
    "film noir": "Film-Noir",
    "comedic": "Comedy",
    "funny": "Comedy",
    "scary": "Horror",
    "thrilling": "Thriller",
    "suspense": "Thriller",
    "mysteries": "Mystery",
    "westerns": "Western",
    "musical": "Musical",
    "war movies": "War",
    "war films": "War",
    "documentaries": "Documentary",
    "fantasy": "Fantasy",
    "action-packed": "Action",
    "adventures": "Adventure",
    "criminal": "Crime",
    "dramas": "Drama",
    "dramatic": "Drama",
}

#: Sentence boundaries as the profile parser splits them (claims never cross one).
_SENTENCE_RE = re.compile(r"(?<=[.!?;])\s+|\n+")


class DemographicProbe(Params):
    """The L-DEMOJSD probe (metric ``llm_demographic_bias``): personas from user attributes."""

    every: int = Field(10, ge=0, le=MAX_STEPS, description="cycles between probes (0: off)")
    samples: int = Field(8, ge=2, le=MAX_ITERATIONS, description="R answers per persona (fixed seeds 0..R-1)")
    n: int = Field(10, ge=1, le=MAX_K, description="titles asked per answer")
    temperature: float = Field(0.8, ge=0.0, description="decoding temperature of the probe (real models)")
    max_tokens: int = Field(120, ge=1, le=MAX_TOKENS, description="new tokens per probe answer")
    attributes: list[Literal["gender", "age"]] = Field(
        default_factory=lambda: ["gender", "age"], description="attributes crossed into personas"
    )
    age_bands: list[int] = Field(default_factory=lambda: [25, 45], description="age band edges (years)")
    candidates: int = Field(2000, ge=10, le=MAX_ITEMS, description="surrogate: the most popular items it may name")
    strength: float = Field(1.0, ge=0.0, description="surrogate: tilt toward the persona's genre prior")



def _age_band(age: float, edges: list[int]) -> int:
    return int(np.searchsorted(np.asarray(sorted(edges)), age, side="right"))


def _band_names(edges: list[int]) -> list[tuple[str, str]]:
    """(id, phrase) per age band: ("under25", "under 25"), ("25to44", "aged 25 to 44"), ("45plus", ...)."""
    e = sorted(int(x) for x in edges)
    out = [(f"under{e[0]}", f"under {e[0]}")] if e else [("all", "")]
    for a, b in zip(e, e[1:], strict=False):
        out.append((f"{a}to{b - 1}", f"aged {a} to {b - 1}"))
    if e:
        out.append((f"{e[-1]}plus", f"aged {e[-1]} or over"))
    return out


def _gender_key(v) -> str | None:
    s = str(v).strip().lower()
    if s in ("f", "female", "woman", "w"):
        return "female"
    if s in ("m", "male", "man"):
        return "male"
    return None


def demographic_groups(
    attributes: dict[str, np.ndarray], n: int, use: list[str], age_bands: list[int]
) -> tuple[np.ndarray, list[str], list[str]]:
    """(group index per user (-1 = unknown), group ids, persona phrases) for gender x age band."""
    gender = attributes.get("gender") if "gender" in use else None
    age = attributes.get("age") if "age" in use else None
    g_keys = ["female", "male"] if gender is not None else [None]
    bands = _band_names(age_bands) if age is not None else [(None, "")]
    ids, phrases = [], []
    for g in g_keys:
        for b, bphrase in bands:
            noun = {"female": "a woman", "male": "a man", None: "a person"}[g]
            ids.append("_".join(x for x in (g, b) if x))
            phrases.append(f"{noun} {bphrase}".strip())
    grp = np.full(n, -1, np.int64)
    gi = np.zeros(n, np.int64)
    ok = np.ones(n, bool)
    if gender is not None:
        keys = [_gender_key(v) for v in np.asarray(gender)[:n]]
        gi = np.array([0 if k == "female" else 1 if k == "male" else -1 for k in keys], np.int64)
        ok &= gi >= 0
    bi = np.zeros(n, np.int64)
    if age is not None:
        a = np.asarray(age, np.float64)[:n]
        bi = np.array([_age_band(x, age_bands) if np.isfinite(x) and x > 0 else -1 for x in a], np.int64)
        ok &= bi >= 0
    grp[ok] = gi[ok] * len(bands) + bi[ok]
    return grp, ids, phrases


def build_personas(world, cfg: DemographicProbe) -> list[tuple[str, str, np.ndarray]]:
    """[(persona id, descriptor, member mask over users)], "unmarked" first (mask: every user).

    Empty when the world's users carry neither gender nor age.
    """
    n = world.users.n
    attrs = world.users.attributes or {}
    use = [a for a in cfg.attributes if a in attrs]
    if not use:
        return []
    grp, ids, phrases = demographic_groups(attrs, n, use, cfg.age_bands)
    out = [("unmarked", "a user", np.ones(n, bool))]
    for g, (pid, phrase) in enumerate(zip(ids, phrases, strict=True)):
        out.append((pid, phrase, grp == g))
    return out


def _describe_user(attrs: dict[str, np.ndarray], u: int) -> str:
    """'The user is a 24-year-old man who works as a technician.' (whatever attributes exist)."""
    parts = []
    age = attrs.get("age")
    gender = attrs.get("gender")
    occ = attrs.get("occupation")
    noun = "person"
    if gender is not None:
        noun = {"female": "woman", "male": "man"}.get(_gender_key(gender[u]) or "", "person")
    if age is not None and float(age[u]) > 0:
        parts.append(f"a {int(age[u])}-year-old {noun}")
    else:
        parts.append(f"a {noun}")
    text = "The user is " + parts[0]
    if occ is not None and str(occ[u]) and str(occ[u]).lower() not in ("none", "other", ""):
        text += f" who works as {'an' if str(occ[u])[0].lower() in 'aeiou' else 'a'} {occ[u]}"
    others = [k for k in attrs if k not in ("age", "gender", "occupation")]
    if others:
        text += " (" + ", ".join(f"{k}: {attrs[k][u]}" for k in others) + ")"
    return text + "."


def _side_info(attrs: dict[str, np.ndarray], u: int) -> dict[str, Any] | None:
    if not attrs:
        return None
    out: dict[str, Any] = {}
    for k, col in attrs.items():
        if u < len(col):
            v = col[u]
            out[k] = float(v) if isinstance(v, (int, float, np.integer, np.floating)) else str(v)
    if "gender" in out:
        g = _gender_key(out["gender"])
        if g:
            out["gender"] = g
    return out


def _item_genre_names(world, item: int, max_genres: int = 3) -> list[str]:
    row = world.items.genres[item]
    names = world.items.genre_names
    nz = np.flatnonzero(row > 0)
    if len(nz) == len(row):  # uniform = unknown genres
        return []
    order = nz[np.argsort(-row[nz], kind="stable")][:max_genres]
    return [names[g] for g in order]


def item_texts(world, start: int = 0, end: int | None = None) -> list[str]:
    """The embedded text of items: 'Title — Genre, Genre'."""
    end = world.items.n if end is None else end
    out = []
    for i in range(start, end):
        g = _item_genre_names(world, i)
        out.append(f"{world.items.titles[i]} — {', '.join(g)}" if g else str(world.items.titles[i]))
    return out


def history_lines(world, items: np.ndarray) -> str:
    """The history of the profiler's prompt: one '- Title (Genre, Genre)' line per item."""
    lines = []
    for i in items.tolist():
        gn = _item_genre_names(world, i)
        lines.append(f"- {world.items.titles[i]}" + (f" ({', '.join(gn)})" if gn else ""))
    return "\n".join(lines)


def history_genre_priors(world, data: TrainingData, cfg: DemographicProbe) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per refresh: (history length per user, each group's genre prior (mean history genre share; the
    last row is the population's), demographic group per user (-1 = unknown))."""
    import scipy.sparse as sp

    n_users = max(world.users.n, data.n_users)
    n_items = world.items.n
    users = np.asarray(data.users, np.int64)
    items = np.asarray(data.items, np.int64)
    m = sp.csr_matrix((np.ones(len(users)), (users, items)), shape=(n_users, n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    lens = np.asarray(m.sum(axis=1)).ravel()
    G = world.items.genres.shape[1]
    shares = np.asarray(m @ world.items.genres[:n_items].astype(np.float64))
    has = lens > 0
    shares[has] /= lens[has, None]
    pop_prior = shares[has].mean(axis=0) if has.any() else np.full(G, 1.0 / G)
    attrs = world.users.attributes or {}
    use = [a for a in cfg.attributes if a in attrs]
    if use:
        grp, ids, _ = demographic_groups(attrs, world.users.n, use, cfg.age_bands)
    else:
        grp, ids = np.full(world.users.n, -1, np.int64), []
    grp = np.concatenate([grp, np.full(max(0, n_users - len(grp)), -1, np.int64)])[:n_users]
    priors = np.tile(pop_prior, (len(ids) + 1, 1))
    for g in range(len(ids)):
        sel = (grp == g) & has
        if sel.any():
            priors[g] = shares[sel].mean(axis=0)
    return lens, priors, grp  # priors row -1 = population


def recent_items(data: TrainingData, users: np.ndarray) -> dict[int, np.ndarray]:
    """Each user's distinct items, most recent first (by step, then by position in the log)."""
    rows = np.flatnonzero(np.isin(data.users, users))
    u = np.asarray(data.users, np.int64)[rows]
    it = np.asarray(data.items, np.int64)[rows]
    st = np.asarray(data.steps, np.int64)[rows]
    order = np.lexsort((-rows, -st, u))
    u, it = u[order], it[order]
    key = u * (int(it.max(initial=0)) + 1) + it
    _, first = np.unique(key, return_index=True)
    keep = np.sort(first)
    u, it = u[keep], it[keep]
    bounds = np.flatnonzero(np.diff(u)) + 1
    return {
        int(g[0]): ii for g, ii in zip(np.split(u, bounds), np.split(it, bounds), strict=True) if len(g)
    }


def claims_memoised(memo: dict, text: str, names: list[str]) -> list[tuple[str, str]]:
    """parse_profile_claims(text), memoised per sentence: the parser reads each sentence on its own
    (claims are sentence- and clause-local), and profiles repeat sentences a lot (the surrogate's
    are all 'The user likes X.'), so a refresh parses each distinct sentence once."""
    if memo.get("\0names") != names:
        memo.clear()
        memo["\0names"] = list(names)
    out: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for piece in _SENTENCE_RE.split(text):
        if not piece.strip():
            continue
        got = memo.get(piece)
        if got is None:
            got = parse_profile_claims(piece, names, aliases=GENRE_ALIASES)
            if len(memo) > 50_000:
                memo.clear()
                memo["\0names"] = list(names)
            memo[piece] = got
        for c in got:
            if c not in seen:
                seen.add(c)
                out.append(c)
    return out
