"""BPR's negative samplers: uniform (Rendle, our kernel, the default) and popularity (implicit's)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recloop.recommenders.bpr_sgd import bpr_uniform
from recloop.registry import build


def _power_law_log(seed=0, nu=300, ni=200, per_user=12):
    """Users with a taste cluster; item popularity ∝ rank^-1 within it, so the log is head-heavy."""
    g = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, ni + 1)
    rows, cols = [], []
    for u in range(nu):
        w = pop * (1.0 + 3.0 * ((np.arange(ni) % 4) == (u % 4)))
        items = g.choice(ni, per_user, replace=False, p=w / w.sum())
        rows += [u] * per_user
        cols += list(items)
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(nu, ni))


def _auc(U, V, X, g):
    """Share of (user, liked, unliked) triples ranked correctly."""
    X = X.tocsr()
    u = g.integers(0, X.shape[0], 4000)
    ok = []
    for uu in u:
        liked = X.indices[X.indptr[uu]:X.indptr[uu + 1]]
        i = g.choice(liked)
        j = g.integers(0, X.shape[1])
        if j in liked:
            continue
        ok.append(U[uu] @ V[i] > U[uu] @ V[j])
    return float(np.mean(ok))


def _init(nu, ni, f, seed=1):
    g = np.random.default_rng(seed)
    U = ((g.random((nu, f + 1)) - 0.5) / f).astype(np.float32)
    U[:, f] = 1.0
    V = ((g.random((ni, f + 1)) - 0.5) / f).astype(np.float32)
    return U, V


def test_uniform_kernel_learns_and_is_deterministic():
    X = _power_law_log()
    U0, V0 = _init(*X.shape, 8)
    U, V = bpr_uniform(X, U0, V0, 20, 0.05, 0.01, seed=5)
    assert _auc(U, V, X, np.random.default_rng(0)) > 0.8
    np.testing.assert_array_equal(U[:, -1], 1.0)  # the bias column of users stays 1
    U2, V2 = bpr_uniform(X, U0, V0, 20, 0.05, 0.01, seed=5)
    assert np.array_equal(U, U2) and np.array_equal(V, V2)
    U3, _ = bpr_uniform(X, U0, V0, 20, 0.05, 0.01, seed=6)
    assert not np.array_equal(U, U3)
    np.testing.assert_array_equal(U0, _init(*X.shape, 8)[0])  # inputs untouched


def test_uniform_negatives_favour_popular_items_more_than_implicits_sampler():
    """Uniform negatives are mostly tail items, so the learned item bias rises with popularity; implicit's
    popularity-proportional negatives push popular items down (the sign flip behind Mansoury's result)."""
    from recloop.contracts import TrainingData

    X = _power_law_log(seed=2).tocoo()
    data = TrainingData(users=X.row.astype(np.int64), items=X.col.astype(np.int64),
                        steps=np.zeros(X.nnz, np.int32), provenance=np.ones(X.nnz, np.int8),
                        n_users=X.shape[0], n_items=X.shape[1])
    counts = np.bincount(X.col, minlength=X.shape[1])
    arp = {}
    for neg in ("uniform", "popularity"):
        pol = build("policy", {"type": "bpr", "factors": 8, "iterations": 20, "negatives": neg})
        pol.fit(data, None, step=0, rng=np.random.default_rng(3), warm_start=False)
        U, V = pol.user_factors, pol.item_factors
        top = np.argsort(-(U @ V.T), axis=1)[:, :10]
        arp[neg] = counts[top].mean()
    assert arp["uniform"] > 1.2 * arp["popularity"]
