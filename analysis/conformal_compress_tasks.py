"""Task generators for compact conformal subgraphs (C-COMPRESS; GROUNDING §4.5), all from a numpy Generator.

Each task has a fixed-context form (``FixedTask``: i.i.d. train / calib / test outputs of one context, the
§4.4(c) protocol; masses are the training bag's frequencies, see ``conformal_compress.bag``) and a
variable-context form (``Context`` points for the §4.4(a) two-split calibration):

- ``grid``: the 6 × 6 navigation task of §4.5. Vertices of the hypergraph are road segments: the 60 edges of
  an undirected 6 × 6 grid (ids 0–59, sorted by endpoint node ids, node = 6·row + col) and a 20-edge bypass
  from the top-left to the bottom-right corner (ids 60–79). A route is, with probability 0.85, the shortest
  top-left → bottom-right grid path under fresh i.i.d. Uniform[0.1, 2] edge weights, else the bypass.
  Defaults: 50 training and 50 held-out (calib) routes as in the paper, plus fresh test routes.
- ``session``: a session-structured recommendation task. Vertices are items (``n_clusters`` × ``cluster_size``);
  an output is a user's next-k session: with probability 1 − ``explore`` the user picks a cluster from its
  taste mixture π (Dirichlet) and k distinct items inside it by Zipf popularity, else k items uniformly from
  the catalog. Fixed context = one user; variable context = users with different π.

For variable contexts the model is calibrated (its bag samples the true process) and its point output A is
the process's mode: the no-noise shortest path (grid) or the top cluster's k most popular items (session).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import dijkstra

__all__ = [
    "TASKS", "Context", "FixedTask", "grid_contexts", "grid_edges", "grid_task", "session_contexts", "session_task",
]

SIDE = 6
N_GRID_EDGES = 2 * SIDE * (SIDE - 1)  # 60
BYPASS_LEN = 20
BYPASS_PROB = 0.15


@dataclass(frozen=True)
class Context:
    """One variable-context point (§4.4(a)): the model's output ``model``, the model's bag of sampled outputs
    and the true output ``truth`` (element id arrays)."""

    model: np.ndarray
    bag: tuple[np.ndarray, ...]
    truth: np.ndarray


@dataclass(frozen=True)
class FixedTask:
    """One context's i.i.d. outputs: ``train`` builds (chain, traffic), ``calib`` chooses / stops (the
    paper's held-out "test" routes), ``test`` measures coverage on fresh outputs."""

    n_vertices: int
    train: list[np.ndarray]
    calib: list[np.ndarray]
    test: list[np.ndarray]


# -------------------------------------------------------------------------------------------- grid
def grid_edges() -> np.ndarray:
    """(60, 2) endpoint node ids of the 6 × 6 grid's edges, sorted; row index = edge id."""
    pairs = []
    for r in range(SIDE):
        for c in range(SIDE):
            v = r * SIDE + c
            if c + 1 < SIDE:
                pairs.append((v, v + 1))
            if r + 1 < SIDE:
                pairs.append((v, v + SIDE))
    return np.array(sorted(pairs), dtype=np.int64)


_EDGES = grid_edges()
_BYPASS = np.arange(N_GRID_EDGES, N_GRID_EDGES + BYPASS_LEN, dtype=np.int64)
_EDGE_ID = {(int(a), int(b)): i for i, (a, b) in enumerate(_EDGES)}


def _shortest(weights: np.ndarray) -> np.ndarray:
    """Edge ids of the shortest top-left → bottom-right grid path under the given edge weights."""
    n = SIDE * SIDE
    rows = np.concatenate([_EDGES[:, 0], _EDGES[:, 1]])
    cols = np.concatenate([_EDGES[:, 1], _EDGES[:, 0]])
    g = csr_array((np.concatenate([weights, weights]), (rows, cols)), shape=(n, n))
    _, pred = dijkstra(g, directed=True, indices=0, return_predecessors=True)
    path, v = [], n - 1
    while v != 0:
        u = int(pred[v])
        path.append(_EDGE_ID[(min(u, v), max(u, v))])
        v = u
    return np.array(sorted(path), dtype=np.int64)


def _grid_route(rng: np.random.Generator, base: np.ndarray | None = None, noise: float = 0.5) -> np.ndarray:
    """One route: the bypass with probability 0.15, else a shortest path under fresh Uniform[0.1, 2]
    weights (or, given ``base``, under base weights times lognormal(0, ``noise``) per edge)."""
    if rng.random() < BYPASS_PROB:
        return _BYPASS.copy()
    if base is None:
        return _shortest(rng.uniform(0.1, 2.0, N_GRID_EDGES))
    return _shortest(base * np.exp(noise * rng.standard_normal(N_GRID_EDGES)))


def grid_task(rng: np.random.Generator, n_train: int = 50, n_calib: int = 50, n_test: int = 500) -> FixedTask:
    """The §4.5 navigation task: 80 vertices (60 grid edges + 20 bypass edges), i.i.d. routes."""
    routes = [_grid_route(rng) for _ in range(n_train + n_calib + n_test)]
    return FixedTask(N_GRID_EDGES + BYPASS_LEN, routes[:n_train], routes[n_train:n_train + n_calib],
                     routes[n_train + n_calib:])


def grid_contexts(rng: np.random.Generator, n: int, m_bag: int = 50, noise: float = 0.5):
    """n variable contexts: each a traffic state (base weights Uniform[0.1, 2]); A = the noise-free
    shortest path, the bag = ``m_bag`` routes from the true process, the truth one more. → (80, contexts)."""
    out = []
    for _ in range(n):
        base = rng.uniform(0.1, 2.0, N_GRID_EDGES)
        routes = [_grid_route(rng, base, noise) for _ in range(m_bag + 1)]
        out.append(Context(_shortest(base), tuple(routes[:-1]), routes[-1]))
    return N_GRID_EDGES + BYPASS_LEN, out


# ----------------------------------------------------------------------------------------- sessions
def _popularity(cluster_size: int, zipf: float) -> np.ndarray:
    p = 1.0 / np.arange(1, cluster_size + 1) ** zipf
    return p / p.sum()


def _session(rng, pi, cluster_size: int, k: int, zipf: float, explore: float) -> np.ndarray:
    """One next-k session of a user with taste mixture π over clusters."""
    n_items = len(pi) * cluster_size
    if rng.random() < explore:
        return np.sort(rng.choice(n_items, size=k, replace=False))
    c = rng.choice(len(pi), p=pi)
    inside = rng.choice(cluster_size, size=k, replace=False, p=_popularity(cluster_size, zipf))
    return np.sort(c * cluster_size + inside).astype(np.int64)


def session_task(rng: np.random.Generator, n_train: int = 100, n_calib: int = 100, n_test: int = 500,
                 n_clusters: int = 6, cluster_size: int = 10, k: int = 3, zipf: float = 1.0,
                 explore: float = 0.1, concentration: float = 0.5) -> FixedTask:
    """One user's i.i.d. next-k sessions over ``n_clusters · cluster_size`` items."""
    pi = rng.dirichlet(np.full(n_clusters, concentration))
    sess = [_session(rng, pi, cluster_size, k, zipf, explore) for _ in range(n_train + n_calib + n_test)]
    return FixedTask(n_clusters * cluster_size, sess[:n_train], sess[n_train:n_train + n_calib],
                     sess[n_train + n_calib:])


def session_contexts(rng: np.random.Generator, n: int, m_bag: int = 100, n_clusters: int = 6,
                     cluster_size: int = 10, k: int = 3, zipf: float = 1.0, explore: float = 0.05,
                     concentration: float = 0.5):
    """n users (contexts) with their own π; A = the top cluster's k most popular items."""
    out = []
    for _ in range(n):
        pi = rng.dirichlet(np.full(n_clusters, concentration))
        sess = [_session(rng, pi, cluster_size, k, zipf, explore) for _ in range(m_bag + 1)]
        mode = np.arange(k, dtype=np.int64) + int(np.argmax(pi)) * cluster_size
        out.append(Context(mode, tuple(sess[:-1]), sess[-1]))
    return n_clusters * cluster_size, out


TASKS = {"grid": (grid_task, grid_contexts), "session": (session_task, session_contexts)}
