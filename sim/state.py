"""World state as struct-of-arrays: users, items and creators are columns, not Python objects.

Arrays are preallocated with spare capacity and grow by doubling, so new users and items are appended
without per-cycle copies. All shapes are (capacity, ...) with a live count ``n``; use the ``view``
helpers (``users.prefs_view``) to see only live rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recloop.sim import kernels
from recloop.sim.checkpoint import pack_strings, unpack_strings


def _grow(arr: np.ndarray, need: int) -> np.ndarray:
    if arr.shape[0] >= need:
        return arr
    cap = max(need, 2 * arr.shape[0], 16)
    out = np.zeros((cap, *arr.shape[1:]), dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


@dataclass
class Users:
    """User population. ``prefs`` are the true preference vectors x_u (known only to the simulator)."""

    prefs: np.ndarray  # (cap, d) float32, true x_u^t
    prefs0: np.ndarray  # (cap, d) float32, x_u^0
    active: np.ndarray  # (cap,) bool
    joined_at: np.ndarray  # (cap,) int32
    n: int
    attributes: dict[str, np.ndarray] = field(default_factory=dict)  # demographics etc., (cap,) each

    @classmethod
    def create(cls, prefs: np.ndarray, attributes: dict[str, np.ndarray] | None = None) -> Users:
        prefs = np.ascontiguousarray(prefs, dtype=np.float32)
        n = prefs.shape[0]
        return cls(
            prefs=prefs.copy(),
            prefs0=prefs.copy(),
            active=np.ones(n, dtype=bool),
            joined_at=np.zeros(n, dtype=np.int32),
            n=n,
            attributes={k: np.asarray(v) for k, v in (attributes or {}).items()},
        )

    @property
    def dim(self) -> int:
        return self.prefs.shape[1]

    @property
    def capacity(self) -> int:
        """Rows allocated (ids below it are valid indices into the arrays)."""
        return self.prefs.shape[0]

    def active_ids(self) -> np.ndarray:
        return np.flatnonzero(self.active[: self.n]).astype(np.int64)

    def append(self, prefs: np.ndarray, step: int, attributes: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Add users; returns their ids."""
        m = prefs.shape[0]
        lo, hi = self.n, self.n + m
        self.prefs = _grow(self.prefs, hi)
        self.prefs0 = _grow(self.prefs0, hi)
        self.active = _grow(self.active, hi)
        self.joined_at = _grow(self.joined_at, hi)
        self.prefs[lo:hi] = prefs
        self.prefs0[lo:hi] = prefs
        self.active[lo:hi] = True
        self.joined_at[lo:hi] = step
        for key, col in self.attributes.items():
            self.attributes[key] = _grow(col, hi)
            if attributes and key in attributes:
                self.attributes[key][lo:hi] = attributes[key]
        self.n = hi
        return np.arange(lo, hi, dtype=np.int64)


@dataclass
class Items:
    """Item catalog: latent attributes a_i, genre distribution p(g|i), creator, group, arrival, title."""

    attrs: np.ndarray  # (cap, d) float32
    genres: np.ndarray  # (cap, G) float32, rows sum to 1
    creator: np.ndarray  # (cap,) int32 (-1 when no creator model)
    group: np.ndarray  # (cap,) int8 (1 = protected group for exposure fairness)
    created_at: np.ndarray  # (cap,) int32
    titles: list[str]
    n: int
    genre_names: list[str] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        attrs: np.ndarray,
        genres: np.ndarray,
        titles: list[str],
        creator: np.ndarray | None = None,
        group: np.ndarray | None = None,
        genre_names: list[str] | None = None,
    ) -> Items:
        n = attrs.shape[0]
        return cls(
            attrs=np.ascontiguousarray(attrs, dtype=np.float32),
            genres=np.ascontiguousarray(genres, dtype=np.float32),
            creator=np.full(n, -1, np.int32) if creator is None else np.asarray(creator, np.int32),
            group=np.zeros(n, np.int8) if group is None else np.asarray(group, np.int8),
            created_at=np.zeros(n, np.int32),
            titles=list(titles),
            n=n,
            genre_names=list(genre_names or [f"genre_{g}" for g in range(genres.shape[1])]),
        )

    @property
    def dim(self) -> int:
        return self.attrs.shape[1]

    def append(self, attrs, genres, titles, creator, group, step: int) -> np.ndarray:
        m = attrs.shape[0]
        lo, hi = self.n, self.n + m
        for name in ("attrs", "genres", "creator", "group", "created_at"):
            setattr(self, name, _grow(getattr(self, name), hi))
        self.attrs[lo:hi] = attrs
        self.genres[lo:hi] = genres
        self.creator[lo:hi] = creator
        self.group[lo:hi] = group
        self.created_at[lo:hi] = step
        self.titles.extend(titles)
        self.n = hi
        return np.arange(lo, hi, dtype=np.int64)


@dataclass
class Creators:
    """Creator profiles c_j on the simplex (CR-TRECS) and their item-group membership."""

    profiles: np.ndarray  # (n_creators, d) float32
    group: np.ndarray  # (n_creators,) int8

    @property
    def n(self) -> int:
        return self.profiles.shape[0]


@dataclass
class World:
    users: Users
    items: Items
    creators: Creators | None = None
    meta: dict = field(default_factory=dict)  # generator facts (e.g. data set name), JSON-able

    # -- checkpoints (plain values and arrays only: see recloop.sim.checkpoint) -------------------------
    def state_dict(self) -> dict:
        """The world as nested dicts of arrays and plain values (titles packed as UTF-8 bytes)."""

        u, it, cr = self.users, self.items, self.creators
        return {
            "users": {"prefs": u.prefs, "prefs0": u.prefs0, "active": u.active, "joined_at": u.joined_at, "n": int(u.n),
                      "attributes": dict(u.attributes)},
            "items": {"attrs": it.attrs, "genres": it.genres, "creator": it.creator, "group": it.group,
                      "created_at": it.created_at, "titles": pack_strings(it.titles), "n": int(it.n),
                      "genre_names": list(it.genre_names)},
            "creators": None if cr is None else {"profiles": cr.profiles, "group": cr.group},
            "meta": self.meta,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> World:
        """The world :meth:`state_dict` described (arrays copied: the world mutates them in place)."""

        u, it, cr = state["users"], state["items"], state["creators"]
        users = Users(prefs=u["prefs"].copy(), prefs0=u["prefs0"].copy(), active=u["active"].copy(),
                      joined_at=u["joined_at"].copy(), n=int(u["n"]),
                      attributes={k: v.copy() for k, v in u["attributes"].items()})
        items = Items(attrs=it["attrs"].copy(), genres=it["genres"].copy(), creator=it["creator"].copy(),
                      group=it["group"].copy(), created_at=it["created_at"].copy(),
                      titles=unpack_strings(it["titles"]), n=int(it["n"]), genre_names=list(it["genre_names"]))
        creators = None if cr is None else Creators(profiles=cr["profiles"].copy(), group=cr["group"].copy())
        return cls(users=users, items=items, creators=creators, meta=state["meta"])

    def true_utility(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """V_ui = <x_u, a_i> for aligned arrays ``users`` (n,) and ``items`` (n, k) → (n, k)."""

        users = np.asarray(users)
        items = np.asarray(items)
        x, a = self.users.prefs, self.items.attrs
        if (kernels.HAVE_NUMBA and items.ndim == 2 and users.ndim == 1 and len(users) == len(items)
                and x.dtype == np.float32 and a.dtype == np.float32
                and x.flags.c_contiguous and a.flags.c_contiguous
                and (users.size == 0 or (users.min() >= 0 and users.max() < len(x)))
                and (items.size == 0 or items.max() < len(a))):
            out = np.empty(items.shape, np.float32)  # fused gather + dot (float64 accumulation)
            return kernels.gather_dot(x, users.astype(np.int64, copy=False), a,
                                      items.astype(np.int64, copy=False), out)
        return np.einsum("nkd,nd->nk", a[np.maximum(items, 0)], x[users], optimize=False)


class History:
    """Per-user consumed-item sets as a log-structured CSR: segments append, and merge when many.

    Appending a cycle adds one small CSR segment (O(interactions)); lookups for a chunk of users gather
    from every segment; a new segment merges into the previous one while it is at least half its size
    (a log-structured merge: O(log) amortised work per pair, about log2(cycles) segments).
    No dense users x items structure is ever built.
    """

    def __init__(self, n_users: int, max_segments: int = 8):
        self.n_users = n_users
        self.max_segments = max_segments
        self.segments: list[tuple[np.ndarray, np.ndarray]] = []
        self.nnz = 0

    def state_dict(self) -> dict:
        """The segments as (indptr, items) array pairs, for a checkpoint."""
        return {"n_users": int(self.n_users), "max_segments": int(self.max_segments), "nnz": int(self.nnz),
                "segments": [(ip, ix) for ip, ix in self.segments]}

    @classmethod
    def from_state_dict(cls, state: dict) -> History:
        h = cls(int(state["n_users"]), int(state["max_segments"]))
        h.segments = [(ip, ix) for ip, ix in state["segments"]]
        h.nnz = int(state["nnz"])
        return h

    def _segment(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(users) > 1 and not bool(np.all(users[1:] > users[:-1])):  # one pair per sorted user: no sort
            order = np.lexsort((items, users))
            users, items = users[order], items[order]
        counts = np.bincount(users, minlength=self.n_users)
        indptr = np.zeros(self.n_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return indptr, items.astype(np.int32)

    def ensure_users(self, n_users: int) -> None:
        if n_users <= self.n_users:
            return
        pad = n_users - self.n_users
        self.segments = [(np.concatenate([ip, np.full(pad, ip[-1], ip.dtype)]), ix) for ip, ix in self.segments]
        self.n_users = n_users

    def add(self, users: np.ndarray, items: np.ndarray) -> None:
        if len(users) == 0:
            return
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        self.ensure_users(int(users.max()) + 1)
        self.segments.append(self._segment(users, items))
        self.nnz += len(users)
        # log-structured merge: fold the newest segment into the previous one while it is at least half
        # its size (amortised O(log) work per pair instead of re-sorting everything every few cycles)
        segs = self.segments
        while len(segs) > 1 and (2 * len(segs[-1][1]) >= len(segs[-2][1])
                                 or len(segs) > 4 * self.max_segments):
            b = segs.pop()
            segs.append(self._merge(segs.pop(), b))
        self.nnz = sum(len(ix) for _, ix in segs)

    def _merge(self, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]):
        """Row-wise union of two segments (rows sorted, duplicates removed)."""

        if kernels.HAVE_NUMBA:
            ptr, idx = kernels.merge_csr(a[0], a[1], b[0], b[1])
            return ptr, idx.astype(np.int32, copy=False)
        rows = np.arange(self.n_users, dtype=np.int64)
        u = np.concatenate([np.repeat(rows, np.diff(p)) for p, _ in (a, b)])
        i = np.concatenate([a[1], b[1]]).astype(np.int64)
        width = int(i.max()) + 1 if len(i) else 1
        key = np.unique(u * width + i)
        return self._segment(key // width, key % width)

    def compact(self) -> None:
        if len(self.segments) <= 1:
            return
        segs = self.segments
        while len(segs) > 1:
            b = segs.pop()
            segs.append(self._merge(segs.pop(), b))
        self.nnz = len(segs[0][1])

    def to_coo(self) -> tuple[np.ndarray, np.ndarray]:
        us, its = [], []
        for indptr, idx in self.segments:
            us.append(np.repeat(np.arange(self.n_users, dtype=np.int64), np.diff(indptr)))
            its.append(idx.astype(np.int64))
        if not us:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(us), np.concatenate(its)

    def pairs(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, item) pairs for the given users; row indexes into ``users``. May contain repeats."""
        rows, cols = [], []
        users = np.asarray(users, dtype=np.int64)
        inside = users < self.n_users
        for indptr, idx in self.segments:
            starts = np.where(inside, indptr[np.minimum(users, self.n_users - 1)], 0)
            ends = np.where(inside, indptr[np.minimum(users, self.n_users - 1) + 1], 0)
            lens = ends - starts
            total = int(lens.sum())
            if total == 0:
                continue
            r = np.repeat(np.arange(len(users), dtype=np.int64), lens)
            offs = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
            rows.append(r)
            cols.append(idx[np.repeat(starts, lens) + offs].astype(np.int64))
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(rows), np.concatenate(cols)

    def rows_csr(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-row items for the given users as CSR ``(indptr, items)``, rows in ``users`` order; items
        within a row are grouped by segment (sorted per segment) and may repeat across segments."""
        users = np.asarray(users, dtype=np.int64)
        n = len(users)
        inside = users < self.n_users
        uu = np.where(inside, users, 0)
        parts = []
        lens_all = np.zeros(n, np.int64)
        for indptr, idx in self.segments:
            starts = indptr[uu]
            lens = np.where(inside, indptr[uu + 1] - starts, 0)
            parts.append((starts, lens, idx))
            lens_all += lens
        ptr = np.zeros(n + 1, np.int64)
        np.cumsum(lens_all, out=ptr[1:])
        out = np.empty(int(ptr[-1]), np.int64)
        off = ptr[:-1].copy()
        for starts, lens, idx in parts:
            total = int(lens.sum())
            if total == 0:
                continue
            within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
            out[np.repeat(off, lens) + within] = idx[np.repeat(starts, lens) + within]
            off += lens
        return ptr, out

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Whether each (users[j], items[j]) pair is in the history (binary search per pair)."""

        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        out = np.zeros(len(users), dtype=bool)
        if kernels.HAVE_NUMBA:
            for indptr, idx in self.segments:
                kernels.csr_contains(indptr, idx, users, items.astype(idx.dtype), out)
            return out
        ulist, inv = np.unique(users, return_inverse=True)
        r, c = self.pairs(ulist)
        width = int(max(items.max(initial=0), c.max(initial=0))) + 1
        return np.isin(inv * width + items, r * width + c)

    def _merged(self) -> tuple[np.ndarray, np.ndarray]:
        """Every segment merged into one CSR (rows sorted, no duplicates), kept until the segments change
        (several metrics ask for most users' histories in one cycle: one merge serves them all)."""
        segs = list(self.segments)
        cache = getattr(self, "_merged_cache", None)
        if cache is not None and len(cache[0]) == len(segs) and all(a is b for a, b in zip(cache[0], segs)):
            return cache[1]
        ptr, idx = segs[0]
        for seg in segs[1:]:
            ptr, idx = kernels.merge_csr(ptr, idx, *seg)
        self._merged_cache = (segs, (ptr, idx))
        return ptr, idx

    def csr(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A deduplicated CSR (indptr, indices) over the given users (in that order), rows sorted."""

        if kernels.HAVE_NUMBA:  # each segment's rows are sorted: gather them, then merge (no sort)
            users = np.asarray(users, dtype=np.int64)
            segs = self.segments
            if not segs:
                return np.zeros(len(users) + 1, np.int64), np.zeros(0, np.int64)
            if len(segs) > 1 and 4 * len(users) >= self.n_users:  # a large share of users: merge all once
                return kernels.csr_gather_unique(*self._merged(), users)
            ptr, items = kernels.csr_gather_unique(*segs[0], users)
            for seg in segs[1:]:
                ptr, items = kernels.merge_csr(ptr, items, *kernels.csr_gather_unique(*seg, users))
            return ptr, items
        r, c = self.pairs(users)
        if len(r):
            key = np.unique(r * (int(c.max()) + 1) + c)
            width = int(c.max()) + 1
            r, c = key // width, key % width
        indptr = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(np.bincount(r, minlength=len(users)), out=indptr[1:])
        return indptr, c
