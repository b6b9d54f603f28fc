"""Compact conformal subgraphs (reference C-COMPRESS; GROUNDING §4, Gollapudi, Kollias, Munagala &
Vijayaraghavan 2026, arXiv 2602.07530).

Structured outputs (routes, next-k sessions) are hyperedges over atomic elements (graph edges, items), each
with a mass. A subgraph K covers an output when it contains all of its elements. This module gives:

- ``mincut_chain``: the nested chain ∅ = S_0 ⊂ … ⊂ S_k of minimisers of Φ(K, λ) = c(K) − λ·W_ind(K) over all
  λ (GROUNDING §4.3; Picard 1976 closure network s → u_e (λw_e), u_e → n_v (∞), n_v → t (c_v)). Breakpoints
  are found exactly by Eisner–Severance splitting with integer capacities; every cut is the *minimal*
  source side (nodes reachable from s in the residual graph), so the chain is nested even at LP ties (the
  §4.3 caveat). Max flow: scipy's Dinic (``backend="scipy"``, default: measured ~10× faster than
  networkx's preflow-push here, see ``bench/bench_conformal_compress.py``) or networkx.
- the fixed-context procedure (§4.4(c)): chain from the first half, smallest chain set reaching coverage φ on
  the second half, then fixed-order (ascending id) deletion of its last increment — ``lp_fixed``;
- the edge-level baselines of §4.5: ``forward_greedy`` and ``reverse_greedy`` (Charikar-style peeling);
- the variable-context two-split calibration (§4.4(a)): Stage 1 on D1 gives d*, Stage 2 on D2 gives τ*,
  coverage ≥ φ − δ — ``two_split_calibrate`` / ``two_split_predict``;
- ``run_trial(task, phi, method, rng)`` → (size, coverage), one trial of a task from
  ``conformal_compress_tasks``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import networkx as nx
import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

from recloop.analysis.conformal_compress_tasks import TASKS, Context
from recloop.sim.conformal import conformal_quantile

__all__ = [
    "Chain",
    "Context",
    "Hypergraph",
    "bag",
    "coverage",
    "forward_greedy",
    "incidence",
    "lp_fixed",
    "mincut_chain",
    "path_greedy",
    "reverse_greedy",
    "run_trial",
    "select_kappa",
    "two_split_calibrate",
    "two_split_predict",
]

_RES = 2**20  # integer resolution of the normalised masses inside the flow network


@dataclass(frozen=True)
class Hypergraph:
    """Outputs as hyperedges: ``edges[j]`` the element ids of output j, ``weights[j]`` its mass (> 0),
    ``costs`` integer element costs c_v (unit when None; the paper uses unit costs, GROUNDING §4.3 [O])."""

    n_vertices: int
    edges: tuple[np.ndarray, ...]
    weights: np.ndarray
    costs: np.ndarray | None = None

    def cost_vector(self) -> np.ndarray:
        return np.ones(self.n_vertices, np.int64) if self.costs is None else np.asarray(self.costs, np.int64)


@dataclass(frozen=True)
class Chain:
    """Nested minimisers ``sets[0] = ∅ ⊂ … ⊂ sets[-1]`` (boolean masks over vertices), ``lost[i]`` the
    normalised mass not covered by sets[i], and ``breakpoints[i]`` the λ (paper convention: λ on the masses,
    W normalised to 1) at which sets[i] gives way to sets[i+1]."""

    sets: list[np.ndarray]
    lost: np.ndarray
    breakpoints: np.ndarray


def bag(outputs: Sequence[Sequence[int]], n_vertices: int, costs=None) -> Hypergraph:
    """A "bag of M outputs" (§4.4): duplicates merged, mass = count / M."""
    counts: dict[tuple[int, ...], int] = {}
    for out in outputs:
        key = tuple(sorted({int(v) for v in out}))
        counts[key] = counts.get(key, 0) + 1
    keys = sorted(counts)
    w = np.array([counts[k] for k in keys], dtype=np.float64) / max(len(outputs), 1)
    return Hypergraph(n_vertices, tuple(np.array(k, np.int64) for k in keys), w, costs)


def incidence(outputs: Sequence[Sequence[int]], n_vertices: int) -> np.ndarray:
    """Boolean (outputs × vertices) incidence matrix."""
    inc = np.zeros((len(outputs), n_vertices), dtype=bool)
    for j, out in enumerate(outputs):
        inc[j, np.asarray(out, np.int64)] = True
    return inc


def coverage(mask: np.ndarray, inc: np.ndarray) -> float:
    """Fraction of outputs (rows of ``inc``) whose elements all lie in ``mask``."""
    if inc.shape[0] == 0:
        return float("nan")
    return float((~(inc & ~mask[None, :]).any(axis=1)).mean())


# ------------------------------------------------------------------------------------------ max flow
def _integer_weights(w: np.ndarray) -> np.ndarray:
    """Masses as integers with the same ratios: exact when they are fractions with a small common
    denominator (a bag's count / M, or 0.4, 0.3, 0.3), else rounded to the 2^-20 resolution."""
    fr = [Fraction(float(x)).limit_denominator(1000) for x in w / w.max()]
    den = math.lcm(*(f.denominator for f in fr))
    exact = all(abs(float(f) - x) < 1e-12 for f, x in zip(fr, w / w.max())) and den <= _RES
    if exact:
        return np.array([f.numerator * (den // f.denominator) for f in fr], dtype=np.int64)
    return np.maximum(np.rint(w / w.sum() * _RES).astype(np.int64), 1)


class _Network:
    """Closure network for one hypergraph; ``source_side(p, q)`` is the minimal minimiser at λ = p/q."""

    def __init__(self, hg: Hypergraph, backend: str):
        self.hg, self.backend = hg, backend
        self.w = _integer_weights(np.asarray(hg.weights, np.float64))
        self.c = hg.cost_vector()
        m, n = len(hg.edges), hg.n_vertices
        self.m, self.n, self.s, self.t = m, n, m + n, m + n + 1
        self.tails = np.concatenate([np.full(len(e), j) for j, e in enumerate(hg.edges)]).astype(np.int64)
        self.heads = np.concatenate(hg.edges).astype(np.int64) + m
        self.inc = np.zeros((m, n), dtype=bool)
        self.inc[self.tails, self.heads - m] = True

    def induced(self, mask: np.ndarray) -> int:
        """Integer induced mass W_ind(K)."""
        return int(self.w[~(self.inc & ~mask[None, :]).any(axis=1)].sum())

    def cost(self, mask: np.ndarray) -> int:
        return int(self.c[mask].sum())

    def source_side(self, p: int, q: int) -> np.ndarray:
        """Vertex mask of the minimal min cut with capacities s→u_e = p·w_e, n_v→t = q·c_v."""
        if self.backend == "networkx":
            return self._nx(p, q)
        return self._scipy(p, q)

    def _scipy(self, p: int, q: int) -> np.ndarray:
        m, n, s, t = self.m, self.n, self.s, self.t
        src_cap = p * self.w
        big = int(src_cap.sum()) + 1
        if big > 2**31 - 1 or int((q * self.c).max()) > 2**31 - 1:
            return self._nx(p, q)  # scipy's capacities are int32
        rows = np.concatenate([np.full(m, s), self.tails, np.arange(m, m + n)])
        cols = np.concatenate([np.arange(m), self.heads, np.full(n, t)])
        cap = np.concatenate([src_cap, np.full(self.tails.size, big), q * self.c]).astype(np.int32)
        graph = csr_array((cap, (rows, cols)), shape=(m + n + 2, m + n + 2))
        flow = maximum_flow(graph, s, t, method="dinic").flow
        resid = (graph - flow).tocsr()
        resid.data = (resid.data > 0).astype(np.int8)
        resid.eliminate_zeros()
        reach = breadth_first_order(resid, s, directed=True, return_predecessors=False)
        mask = np.zeros(m + n + 2, dtype=bool)
        mask[reach] = True
        return mask[m:m + n]

    def _nx(self, p: int, q: int) -> np.ndarray:
        g = nx.DiGraph()
        m, n, s, t = self.m, self.n, self.s, self.t
        g.add_edges_from((s, j, {"capacity": int(p * self.w[j])}) for j in range(m))
        g.add_edges_from(zip(self.tails.tolist(), self.heads.tolist()))  # no capacity attribute: infinite
        g.add_edges_from((m + v, t, {"capacity": int(q * self.c[v])}) for v in range(n))
        _, (reach, _) = nx.minimum_cut(g, s, t)
        idx = np.array([v - m for v in reach if m <= v < m + n], dtype=np.int64)
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        return mask


def mincut_chain(hg: Hypergraph, backend: str = "scipy") -> Chain:
    """All minimal minimisers of c(K) − λ·W_ind(K) over λ ≥ 0, nested (GROUNDING §4.3, C-COMPRESS).

    Eisner–Severance splitting: between chain members A ⊂ B, solve at the λ where their lines cross,
    λ* = (c(B) − c(A)) / (W(B) − W(A)); a minimiser other than A is a new member (recurse on both sides),
    otherwise λ* is a breakpoint. Exact (integer capacities); about 2k max flows for a chain of k steps.
    """
    net = _Network(hg, backend)
    empty = np.zeros(hg.n_vertices, dtype=bool)
    full = net.inc.any(axis=0)
    sets, bps = [empty], []
    stack = [(empty, full)]
    while stack:  # depth-first, left to right, so sets come out in increasing order
        a, b = stack.pop()
        p, q = net.cost(b) - net.cost(a), net.induced(b) - net.induced(a)
        mid = net.source_side(p, q)
        if (mid == a).all() or (mid == b).all():
            sets.append(b)
            bps.append(p / q * int(net.w.sum()))
        else:
            stack.extend([(mid, b), (a, mid)])
    lost = np.array([1.0 - net.induced(s) / net.w.sum() for s in sets])
    return Chain(sets, lost, np.array(bps, dtype=np.float64))


def select_kappa(chain: Chain, tau: float, kappa: float = 1.0) -> np.ndarray:
    """K̂_τ: the smallest chain set whose lost mass is ≤ (1+κ)(1−τ) (GROUNDING §4.3; κ → 0 is the
    reference's "smallest set with mass ≥ τ"). τ ≥ 1 gives the last set."""
    ok = np.nonzero(chain.lost <= (1.0 + kappa) * (1.0 - tau) + 1e-12)[0]
    return chain.sets[ok[0] if ok.size else -1]


def path_greedy(hg: Hypergraph, phi: float) -> np.ndarray:
    """The reference's output-level greedy (C-COMPRESS "Baseline", kept as an extra [O] baseline): the
    union of the highest-mass outputs (ties: input order) until the covered mass is ≥ φ."""
    w = np.asarray(hg.weights, np.float64)
    w = w / w.sum()
    mask = np.zeros(hg.n_vertices, dtype=bool)
    inc = incidence(hg.edges, hg.n_vertices)
    for j in np.argsort(-w, kind="stable"):
        if w[~(inc & ~mask[None, :]).any(axis=1)].sum() >= phi - 1e-12:
            break
        mask[hg.edges[j]] = True
    return mask


# ------------------------------------------------------------------------- fixed context (§4.4(c))
def lp_fixed(train, calib, n_vertices: int, phi: float, backend: str = "scipy") -> np.ndarray:
    """Fixed-context procedure (§4.4(c)): chain from ``train``, the smallest member with coverage ≥ φ on
    ``calib`` (else the last member plus vertices in ascending id until it reaches φ), then delete the
    vertices it added over its predecessor in ascending id while coverage stays ≥ φ."""
    inc = incidence(calib, n_vertices)
    chain = mincut_chain(bag(train, n_vertices), backend)
    covs = [coverage(s, inc) for s in chain.sets]
    hit = [i for i, c in enumerate(covs) if c >= phi]
    if hit:
        i = hit[0]
        prev, cur = chain.sets[max(i - 1, 0)], chain.sets[i].copy()
    else:
        prev, cur = chain.sets[-1], chain.sets[-1].copy()
        for v in np.nonzero(~cur)[0]:
            if coverage(cur, inc) >= phi:
                break
            cur[v] = True
    for v in np.nonzero(cur & ~prev)[0]:
        cur[v] = False
        if coverage(cur, inc) < phi:
            cur[v] = True
    return cur


def _traffic(train, n_vertices: int) -> np.ndarray:
    """Number of training outputs using each element."""
    return incidence(train, n_vertices).sum(axis=0)


def forward_greedy(train, calib, n_vertices: int, phi: float) -> np.ndarray:
    """Forward Greedy (§4.5): add elements by decreasing training traffic (ties: ascending id) until
    coverage on ``calib`` is ≥ φ."""
    order = np.argsort(-_traffic(train, n_vertices), kind="stable")
    pos = np.empty(n_vertices, np.int64)
    pos[order] = np.arange(n_vertices)
    inc = incidence(calib, n_vertices)
    # an output is covered once its last element (in the order) is in: after max position + 1 additions
    need = np.sort(np.where(inc, pos[None, :], -1).max(axis=1) + 1)
    k = need[max(math.ceil(phi * len(need) - 1e-9), 1) - 1] if phi > 0 else 0
    mask = np.zeros(n_vertices, dtype=bool)
    mask[order[:k]] = True
    return mask


def reverse_greedy(train, calib, n_vertices: int, phi: float) -> np.ndarray:
    """Reverse Greedy (§4.5, Charikar-style peeling): from all elements, repeatedly delete the element with
    the least traffic among the surviving training outputs (ties: ascending id), drop the outputs through
    it, recompute traffic; stop just before coverage on ``calib`` would fall below φ."""
    tr = incidence(train, n_vertices)
    inc = incidence(calib, n_vertices)
    mask = np.ones(n_vertices, dtype=bool)
    alive = np.ones(tr.shape[0], dtype=bool)
    while mask.any():
        traffic = np.where(mask, tr[alive].sum(axis=0), np.iinfo(np.int64).max)
        v = int(np.argmin(traffic))
        mask[v] = False
        if coverage(mask, inc) < phi:
            mask[v] = True
            break
        alive &= ~tr[:, v]
    return mask


# ------------------------------------------------------------------------ variable context (§4.4(a))
def _dist(a, b) -> int:
    """Nonconformity f(A, B) = number of differing elements |A Δ B| (§4.4(a))."""
    return len(set(np.asarray(a).tolist()) ^ set(np.asarray(b).tolist()))


def _filtered_chain(ctx: Context, d_star: float, n_vertices: int, backend: str) -> Chain | None:
    """Chain over S_{d*}(A): the bag's outputs within distance d* of the model's output."""
    kept = [b for b in ctx.bag if _dist(ctx.model, b) <= d_star]
    return mincut_chain(bag(kept, n_vertices), backend) if kept else None


def _eta(ctx: Context, d_star: float, n_vertices: int, kappa: float, backend: str) -> float:
    """Stage-2 score: 1 for a Stage-1 miss (§4.4(a)); +∞ if the truth is never covered by the chain [O];
    else the least τ at which K_τ ⊇ truth, = 1 − lost(S_{i−1})/(1+κ) for i the first member covering it."""
    if _dist(ctx.model, ctx.truth) > d_star:
        return 1.0
    chain = _filtered_chain(ctx, d_star, n_vertices, backend)
    if chain is None:
        return math.inf
    inside = [bool(s[ctx.truth].all()) for s in chain.sets]
    if not any(inside):
        return math.inf
    i = inside.index(True)
    return 1.0 - chain.lost[i - 1] / (1.0 + kappa) if i > 0 else 0.0


def two_split_calibrate(d1: Sequence[Context], d2: Sequence[Context], n_vertices: int, phi: float,
                        delta: float, kappa: float = 1.0, backend: str = "scipy") -> tuple[float, float]:
    """(d*, τ*) of the two-split procedure (§4.4(a), Lemma 1: coverage ≥ φ − δ): d* is the
    ⌈(1−δ)(|D1|+1)⌉-th smallest f(A_i, B_i) on D1, τ* the ⌈φ(|D2|+1)⌉-th smallest η_i on D2 (+∞ beyond n)."""
    d_star = conformal_quantile([_dist(c.model, c.truth) for c in d1], delta)
    etas = [_eta(c, d_star, n_vertices, kappa, backend) for c in d2]
    return d_star, conformal_quantile(etas, 1.0 - phi)


def two_split_predict(ctx: Context, d_star: float, tau_star: float, n_vertices: int, kappa: float = 1.0,
                      backend: str = "scipy") -> np.ndarray:
    """K_{τ*}(A): the first chain member over S_{d*}(A) with lost mass < (1+κ)(1−τ*) (strict, so that
    η ≤ τ* implies coverage), the last member when τ* ≥ 1, all vertices when τ* = +∞."""
    if not math.isfinite(tau_star):
        return np.ones(n_vertices, dtype=bool)
    chain = _filtered_chain(ctx, d_star, n_vertices, backend)
    if chain is None:
        return np.zeros(n_vertices, dtype=bool)
    ok = np.nonzero(chain.lost < (1.0 + kappa) * (1.0 - tau_star))[0]
    return chain.sets[ok[0] if ok.size else -1]


# ------------------------------------------------------------------------------------------- trials
METHODS = ("lp", "forward_greedy", "reverse_greedy")


def run_trial(task: str, phi: float, method: str, rng: np.random.Generator, setting: str = "fixed",
              **task_kw) -> tuple[float, float]:
    """One trial → (size, coverage on fresh test outputs).

    ``setting="fixed"`` (§4.4(c), the §4.5 navigation protocol): one task draw, the chosen method's
    subgraph from train/calib, its number of elements and its coverage of the test outputs.
    ``setting="two_split"`` (§4.4(a), ``method="lp"`` only): D1/D2 calibration with ``delta`` (default 0.05)
    on sampled contexts, then the mean |K_{τ*}| and the coverage over test contexts.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    if setting == "two_split":
        if method != "lp":
            raise ValueError("the two-split calibration is defined for method 'lp' only")
        return _two_split_trial(task, phi, rng, **task_kw)
    fixed, _ = TASKS[task]
    t = fixed(rng, **task_kw)
    fn = {"lp": lp_fixed, "forward_greedy": forward_greedy, "reverse_greedy": reverse_greedy}[method]
    mask = fn(t.train, t.calib, t.n_vertices, phi)
    return float(mask.sum()), coverage(mask, incidence(t.test, t.n_vertices))


def _two_split_trial(task: str, phi: float, rng: np.random.Generator, delta: float = 0.05, n1: int = 100,
                     n2: int = 100, n_test: int = 50, **ctx_kw) -> tuple[float, float]:
    """Two-split trial on ``n1 + n2 + n_test`` fresh contexts of the task."""
    _, contexts = TASKS[task]
    n_vertices, d1 = contexts(rng, n1, **{**ctx_kw, "m_bag": 0})  # Stage 1 needs no bags
    _, pts = contexts(rng, n2 + n_test, **ctx_kw)
    d_star, tau = two_split_calibrate(d1, pts[:n2], n_vertices, phi, delta)
    masks = [two_split_predict(c, d_star, tau, n_vertices) for c in pts[n2:]]
    sizes = [m.sum() for m in masks]
    cov = [bool(m[c.truth].all()) for m, c in zip(masks, pts[n2:])]
    return float(np.mean(sizes)), float(np.mean(cov))
