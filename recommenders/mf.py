"""Matrix-factorisation policies: implicit ALS (E-ALS), BPR (E-BPR) and propensity-weighted Rel-MF (E-IPS).

All three serve the BLAS fast path through :meth:`factors` (U, V, bias) and keep their state as plain
float32 arrays, so checkpoints are arrays only.

Conventions shared by the three (our choices where the reference leaves them open):

* **Determinism.** Every random draw (initial factors, BPR/Rel-MF sampling) comes from one integer seed
  drawn from the ``rng`` passed to :meth:`fit`; ``implicit`` runs with ``num_threads=1`` by default, so
  two fits with equal seeds give bit-identical factors.
* **Warm start.** ``fit(..., warm_start=True)`` keeps the current factors, extends them for users and
  items that arrived since the last fit (ALS: zero rows, which the first half-step solves for; BPR: the
  implicit initialisation; Rel-MF: small random rows) and runs ``warm_iterations`` sweeps/epochs instead
  of ``iterations``. ``implicit``'s ``fit`` only initialises factors that are ``None``, so warm start is
  just "set the factors, then fit".
* **Growth between fits.** :meth:`factors` always covers the current world: users who joined after the
  last fit get the mean user factor (``cold_user="mean"``, i.e. the average user's ranking) or zeros,
  items that arrived after it get zero factors (and zero bias) until the next fit.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from pydantic import Field

from recloop.limits import MAX_DIM, MAX_ITERATIONS, MAX_SAMPLE, MAX_THREADS
from recloop.recommenders.bpr_sgd import bpr_uniform
from recloop.registry import Params, register

from .base import Policy, TrainingData


def _seed_from(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _extend(arr: np.ndarray | None, n: int, fill) -> np.ndarray:
    """Rows [0, len(arr)) kept, rows up to n filled by ``fill(m) -> (m, f)`` (arr may be None)."""
    if arr is not None and arr.shape[0] >= n:
        return np.ascontiguousarray(arr, dtype=np.float32)
    m0 = 0 if arr is None else arr.shape[0]
    new = np.asarray(fill(n - m0), dtype=np.float32)
    return new if arr is None else np.ascontiguousarray(np.concatenate([arr.astype(np.float32), new]))


def interaction_matrix(
    data: TrainingData, binary: bool, shape: tuple[int, int] | None = None
) -> sp.csr_matrix:
    """users x items CSR of r_ui (counts, or 1), float32, canonical (sorted, no duplicates)."""
    shape = shape or (data.n_users, data.n_items)
    m = sp.csr_matrix((np.ones(len(data.users), np.float32), (data.users, data.items)), shape=shape)
    m.sum_duplicates()
    if binary:
        m.data[:] = 1.0
    m.sort_indices()
    return m


# --------------------------------------------------------------------------------------------- ALS
def als_half_step(
    C: sp.csr_matrix, Y: np.ndarray, regularization: float, *, max_entries: int = 1 << 22
) -> np.ndarray:
    """One exact ALS half-step (Hu, Koren & Volinsky 2008), vectorised over rows.

    ``C`` is the rows x cols confidence matrix: stored entries are c_ui (with p_ui = 1), missing entries
    mean c = 1, p = 0. For every row u:

        x_u = (YᵀY + Yᵀ(C^u − I)Y + λI)^{-1} Yᵀ C^u p(u)

    computed as a sparse product with the flattened outer products y_i y_iᵀ and one batched solve per
    chunk of rows (float64 inside, float32 out). ``max_entries`` bounds the float64 temporaries.
    Sanity (reference E-ALS): one row, one column, y = 1, c = 1, λ = 1 → x = 0.5.
    """
    C = sp.csr_matrix(C)
    Y64 = np.asarray(Y, dtype=np.float64)
    n_rows = C.shape[0]
    n_cols, f = Y64.shape
    if C.shape[1] != n_cols:
        raise ValueError(f"C has {C.shape[1]} columns but Y has {n_cols} rows")
    YtY = Y64.T @ Y64 + regularization * np.eye(f)
    Cm1 = C.copy().astype(np.float64)
    Cm1.data -= 1.0
    B = C.astype(np.float64) @ Y64  # Yᵀ C^u p(u): observed entries only (p = 0 elsewhere)
    out = np.empty((n_rows, f), dtype=np.float32)
    col_step = max(1, max_entries // (f * f))
    row_step = max(1, max_entries // (f * f))
    col_chunks = [(lo, min(lo + col_step, n_cols)) for lo in range(0, n_cols, col_step)]
    outer = None
    if len(col_chunks) == 1:
        outer = np.einsum("if,ig->ifg", Y64, Y64).reshape(n_cols, f * f)
    Cm1_csc = None if outer is not None else Cm1.tocsc()
    for lo in range(0, n_rows, row_step):
        hi = min(lo + row_step, n_rows)
        A = np.broadcast_to(YtY.reshape(1, f * f), (hi - lo, f * f)).copy()
        if outer is not None:
            A += Cm1[lo:hi] @ outer
        else:
            for clo, chi in col_chunks:
                Yc = Y64[clo:chi]
                outer_c = np.einsum("if,ig->ifg", Yc, Yc).reshape(-1, f * f)
                A += sp.csr_matrix(Cm1_csc[lo:hi, clo:chi]) @ outer_c
        out[lo:hi] = np.linalg.solve(A.reshape(hi - lo, f, f), B[lo:hi, :, None])[:, :, 0]
    return out


class _FactorPolicy(Policy):
    """Shared plumbing: float32 factor arrays, growth padding, array-only checkpoints."""

    def __init__(self, params: Params | None = None):
        super().__init__(params)
        self.user_factors: np.ndarray | None = None
        self.item_factors: np.ndarray | None = None
        self.item_bias: np.ndarray | None = None
        self.n_fits = 0
        self._cache: tuple | None = None

    @property
    def dim(self) -> int:
        return int(self.params.factors)

    def _blank_user(self) -> np.ndarray:
        return np.zeros(self.dim, np.float32)

    def _warm(self, warm_start: bool) -> bool:
        return bool(warm_start and self.user_factors is not None and self.item_factors is not None)

    def _shape(self, data: TrainingData, warm: bool) -> tuple[int, int]:
        """Training shape: the log's, never fewer rows than the factors being warm-started."""
        if not warm:
            return int(data.n_users), int(data.n_items)
        return (max(int(data.n_users), self.user_factors.shape[0]),
                max(int(data.n_items), self.item_factors.shape[0]))

    def _set(self, U: np.ndarray, V: np.ndarray, b: np.ndarray | None = None) -> None:
        self.user_factors = np.ascontiguousarray(U, dtype=np.float32)
        self.item_factors = np.ascontiguousarray(V, dtype=np.float32)
        self.item_bias = None if b is None else np.ascontiguousarray(b, dtype=np.float32)
        self.n_fits += 1
        self._cache = None

    def factors(self, world) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        n_users, n_items = int(world.users.n), int(world.items.n)
        key = (self.n_fits, n_users, n_items)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        U, V, b = self.user_factors, self.item_factors, self.item_bias
        if U is None or V is None:
            U = np.zeros((0, self._blank_user().shape[0]), np.float32)
            V = np.zeros((0, U.shape[1]), np.float32)
        if U.shape[0] < n_users:
            if self.params.cold_user == "mean" and U.shape[0] > 0:
                row = U.mean(axis=0, dtype=np.float64).astype(np.float32)
            else:
                row = self._blank_user()
            U = np.concatenate([U, np.broadcast_to(row, (n_users - U.shape[0], U.shape[1]))])
        if V.shape[0] < n_items:
            V = np.concatenate([V, np.zeros((n_items - V.shape[0], V.shape[1]), np.float32)])
        if b is not None and b.shape[0] < n_items:
            b = np.concatenate([b, np.zeros(n_items - b.shape[0], np.float32)])
        out = (np.ascontiguousarray(U, np.float32), np.ascontiguousarray(V, np.float32),
               None if b is None else np.ascontiguousarray(b, np.float32))
        self._cache = (key, out)
        return out

    def state_dict(self) -> dict[str, Any]:
        def cp(a):
            return None if a is None else np.array(a, copy=True)

        return {"user_factors": cp(self.user_factors), "item_factors": cp(self.item_factors),
                "item_bias": cp(self.item_bias), "n_fits": int(self.n_fits)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the factors; ValueError for a state that is not this policy's (a foreign checkpoint)."""
        def cp(a):
            return None if a is None else np.ascontiguousarray(np.array(a, copy=True), dtype=np.float32)

        missing = {"user_factors", "item_factors", "item_bias", "n_fits"} - set(state)
        if missing:
            raise ValueError(f"the {type(self).__name__} state lacks {', '.join(sorted(missing))}")
        U, V, b = cp(state["user_factors"]), cp(state["item_factors"]), cp(state["item_bias"])
        width = self._blank_user().shape[0]
        if (U is None) != (V is None) or (U is not None and (U.ndim != 2 or V.ndim != 2 or U.shape[1] != width
                                                            or V.shape[1] != width)):
            shapes = [None if a is None else a.shape for a in (U, V)]
            raise ValueError(f"the {type(self).__name__} factors have shapes {shapes}; this policy needs "
                             f"(users, {width}) and (items, {width})")
        if b is not None and (b.ndim != 1 or V is None or b.shape[0] != V.shape[0]):
            raise ValueError(f"the item bias has shape {b.shape}; this policy needs one value per item")
        self.user_factors, self.item_factors, self.item_bias = U, V, b
        self.n_fits = int(state["n_fits"])
        self._cache = None


@register("policy", "als")
class ALS(_FactorPolicy):
    """Implicit-feedback ALS (Hu, Koren & Volinsky 2008) with confidence c = 1 + α·r (E-ALS).

    Fitted with ``implicit``'s CPU solver (conjugate gradient by default, ``solver="cholesky"`` for the
    exact solve) or with this module's own vectorised exact half-steps (``solver="numpy"``). ``implicit``
    reads the stored value as the confidence c_ui itself, so the matrix passed is 1 + α·r_ui (its own
    ``alpha`` stays 1). Score = <U_u, V_i>, no bias.
    """

    class Params(Params):
        factors: int = Field(32, ge=1, le=MAX_DIM)
        regularization: float = Field(0.1, ge=0.0, description="λ (not scaled by counts)")
        alpha: float = Field(10.0, ge=0.0, description="confidence c_ui = 1 + alpha * r_ui")
        iterations: int = Field(15, ge=0, le=MAX_ITERATIONS, description="ALS sweeps for a cold fit")
        warm_iterations: int = Field(3, ge=0, le=MAX_ITERATIONS, description="ALS sweeps when warm-starting")
        binary: bool = Field(False, description="r_ui = 1[interacted] instead of interaction counts")
        solver: Literal["cg", "cholesky", "numpy"] = "cg"
        cold_user: Literal["mean", "zero"] = "mean"
        num_threads: int = Field(
            1, ge=0, le=MAX_THREADS, description="implicit threads (1 = deterministic, 0 = all cores)")

    def confidence(self, data: TrainingData, shape: tuple[int, int] | None = None) -> sp.csr_matrix:
        """The users x items matrix of confidences c_ui = 1 + α·r_ui on the logged pairs."""
        C = interaction_matrix(data, self.params.binary, shape)
        C.data = (1.0 + self.params.alpha * C.data).astype(np.float32)
        return C

    def fit(
        self, data: TrainingData, world, *, step: int, rng: np.random.Generator, warm_start: bool
    ) -> None:
        p = self.params
        seed = _seed_from(rng)
        warm = self._warm(warm_start)
        nu, ni = self._shape(data, warm)
        C = self.confidence(data, (nu, ni))
        iters = p.warm_iterations if warm else p.iterations
        init = np.random.default_rng(seed)
        if warm:
            U = _extend(self.user_factors, nu, lambda m: np.zeros((m, p.factors)))
            V = _extend(self.item_factors, ni, lambda m: np.zeros((m, p.factors)))
        else:  # the implicit initialisation: uniform [0, 0.01)
            U = (init.random((nu, p.factors), dtype=np.float32) * 0.01).astype(np.float32)
            V = (init.random((ni, p.factors), dtype=np.float32) * 0.01).astype(np.float32)
        if p.solver == "numpy":
            CT = C.T.tocsr()
            for _ in range(iters):
                U = als_half_step(C, V, p.regularization)
                V = als_half_step(CT, U, p.regularization)
        elif iters > 0:
            from implicit.cpu.als import AlternatingLeastSquares

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # implicit's OpenBLAS-threads advice
                model = AlternatingLeastSquares(
                    factors=p.factors, regularization=p.regularization, alpha=1.0, dtype=np.float32,
                    use_cg=p.solver == "cg", iterations=iters, num_threads=p.num_threads, random_state=seed,
                )
            model.user_factors, model.item_factors = U.copy(), V.copy()
            model.fit(C, show_progress=False)
            U, V = model.user_factors, model.item_factors
        self._set(U, V)


# --------------------------------------------------------------------------------------------- BPR
@register("policy", "bpr")
class BPR(_FactorPolicy):
    """Bayesian Personalised Ranking (Rendle et al. 2009) with ``implicit``'s CPU SGD (E-BPR).

    Factors have ``factors + 1`` columns: the last item column is the item bias and the last user column
    is fixed at 1 (the implicit layout), so score = <U_u, V_i> already includes the bias.

    Negatives (``negatives``): ``uniform`` (default) is Rendle's BPR, a uniformly drawn item the user has
    not liked (re-drawn until one is found), with our own SGD kernel (:mod:`recloop.recommenders.bpr_sgd`);
    ``popularity`` is ``implicit``'s sampler, whose negative is the item of a random logged pair (so drawn
    in proportion to popularity) and which skips, rather than re-draws, a sample the user liked
    (``verify_negative_samples``). The two move popularity bias in opposite directions inside a loop.
    """

    class Params(Params):
        factors: int = Field(32, ge=1, le=MAX_DIM)
        learning_rate: float = Field(0.05, gt=0.0)
        regularization: float = Field(0.01, ge=0.0)
        iterations: int = Field(15, ge=0, le=MAX_ITERATIONS, description="epochs (nnz samples each) for a cold fit")
        warm_iterations: int = Field(5, ge=0, le=MAX_ITERATIONS, description="epochs when warm-starting")
        negatives: Literal["uniform", "popularity"] = Field(
            "uniform", description="uniform: Rendle's sampler (ours); popularity: implicit's (∝ item popularity)")
        verify_negative_samples: bool = Field(True, description="popularity sampler: skip liked negatives")
        cold_user: Literal["mean", "zero"] = "mean"
        num_threads: int = Field(
            1, ge=0, le=MAX_THREADS, description="implicit threads for the popularity sampler (1 = deterministic; "
                                                 ">1 is Hogwild)")

    def _blank_user(self) -> np.ndarray:
        row = np.zeros(self.dim + 1, np.float32)
        row[-1] = 1.0
        return row

    def _init_users(self, rng: np.random.Generator, m: int) -> np.ndarray:
        f = self.params.factors
        U = (rng.random((m, f + 1), dtype=np.float32) - 0.5) / f
        U[:, f] = 1.0
        return U

    def fit(
        self, data: TrainingData, world, *, step: int, rng: np.random.Generator, warm_start: bool
    ) -> None:
        p = self.params
        f = p.factors
        seed = _seed_from(rng)
        init = np.random.default_rng(seed)
        warm = self._warm(warm_start)
        nu, ni = self._shape(data, warm)
        X = interaction_matrix(data, True, (nu, ni))
        iters = p.warm_iterations if warm else p.iterations
        if warm:
            U = _extend(self.user_factors, nu, lambda m: self._init_users(init, m))
            V = _extend(self.item_factors, ni, lambda m: np.zeros((m, f + 1)))
        else:  # the implicit initialisation; items without interactions start at zero
            V = ((init.random((ni, f + 1), dtype=np.float32) - 0.5) / f).astype(np.float32)
            V[np.bincount(X.indices, minlength=ni) == 0] = 0.0
            U = self._init_users(init, nu)
        if iters > 0 and X.nnz > 0 and p.negatives == "uniform":
            U, V = bpr_uniform(X, U, V, iters, p.learning_rate, p.regularization, seed)
        elif iters > 0 and X.nnz > 0:
            from implicit.cpu.bpr import BayesianPersonalizedRanking

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                model = BayesianPersonalizedRanking(
                    factors=f, learning_rate=p.learning_rate, regularization=p.regularization,
                    dtype=np.float32, iterations=iters, verify_negative_samples=p.verify_negative_samples,
                    num_threads=p.num_threads, random_state=seed,
                )
            model.user_factors, model.item_factors = U.copy(), V.copy()
            model.fit(X, show_progress=False)
            U, V = model.user_factors, model.item_factors
        self._set(U, V)


# ------------------------------------------------------------------------------------------ Rel-MF
def relmf_propensity(counts: np.ndarray, eta: float = 0.5, clip: float = 0.1) -> np.ndarray:
    """θ̂_i = (n_i / max_j n_j)^η, clipped to ≥ ``clip`` (Saito et al. 2020). n_i=25, max 100 → 0.5."""
    counts = np.asarray(counts, dtype=np.float64)
    top = counts.max() if counts.size else 0.0
    if top <= 0:
        return np.ones_like(counts)
    return np.maximum((counts / top) ** eta, clip)


@register("policy", "relmf")
class RelMF(_FactorPolicy):
    """Rel-MF: MF trained with the propensity-weighted (IPS) pointwise log loss (E-IPS).

    L = −Σ [(Y/θ̂_i) log σ(ŷ_ui) + (1 − Y/θ̂_i) log(1 − σ(ŷ_ui))] + λ(‖u‖² + ‖v_i‖² + b_i²) per pair,
    ŷ_ui = <U_u, V_i> + b_i, θ̂_i = (n_i / max n)^η clipped to ≥ ``clip`` with n_i = φ(i) (distinct users in
    the training log). Our training choice: each epoch visits every logged pair once plus ``neg_ratio``
    uniformly drawn (u, i) pairs per logged pair (Y looked up, so a drawn logged pair counts as positive),
    in shuffled mini-batches with Adam, all in numpy (sparse COO products for the gradients). The
    gradient of the loss in the logit is σ(ŷ) − Y/θ̂, so a positive with θ̂ = 0.5 is weighted 2.
    """

    class Params(Params):
        factors: int = Field(32, ge=1, le=MAX_DIM)
        learning_rate: float = Field(0.02, gt=0.0, description="Adam step size")
        regularization: float = Field(1e-4, ge=0.0, description="L2 per sampled pair")
        iterations: int = Field(10, ge=0, le=MAX_ITERATIONS, description="epochs for a cold fit")
        warm_iterations: int = Field(3, ge=0, le=MAX_ITERATIONS)
        neg_ratio: int = Field(3, ge=0, le=MAX_ITERATIONS, description="uniform (u, i) pairs per logged pair and epoch")
        batch_size: int = Field(16384, ge=1, le=MAX_SAMPLE)
        eta: float = Field(0.5, ge=0.0, description="propensity exponent η")
        clip: float = Field(0.1, gt=0.0, le=1.0, description="lower clip of θ̂")
        init_scale: float = Field(0.1, gt=0.0)
        cold_user: Literal["mean", "zero"] = "mean"

    def fit(
        self, data: TrainingData, world, *, step: int, rng: np.random.Generator, warm_start: bool
    ) -> None:
        p = self.params
        f = p.factors
        g = np.random.default_rng(_seed_from(rng))
        warm = self._warm(warm_start)
        nu, ni = self._shape(data, warm)
        X = interaction_matrix(data, True, (nu, ni))
        iters = p.warm_iterations if warm else p.iterations
        if warm:
            U = _extend(self.user_factors, nu, lambda m: g.normal(0, p.init_scale, (m, f)))
            V = _extend(self.item_factors, ni, lambda m: g.normal(0, p.init_scale, (m, f)))
            b0 = None if self.item_bias is None else self.item_bias[:, None]
            b = _extend(b0, ni, lambda m: np.zeros((m, 1)))[:, 0].copy()
        else:
            U = g.normal(0, p.init_scale, (nu, f)).astype(np.float32)
            V = g.normal(0, p.init_scale, (ni, f)).astype(np.float32)
            b = np.zeros(ni, np.float32)
        if iters > 0 and X.nnz > 0:
            U, V, b = self._train(X, U.copy(), V.copy(), b.copy(), iters, g)
        self._set(U, V, b)

    def _train(self, X: sp.csr_matrix, U, V, b, iters: int, g: np.random.Generator):
        p = self.params
        nu, ni = X.shape
        lam = 2.0 * p.regularization
        pu = np.repeat(np.arange(nu, dtype=np.int64), np.diff(X.indptr))
        pi = X.indices.astype(np.int64)
        keys = pu * ni + pi  # sorted (canonical CSR)
        theta = relmf_propensity(np.bincount(pi, minlength=ni), p.eta, p.clip)
        w_pos = (1.0 / theta).astype(np.float32)
        params = [U, V, b]
        m1 = [np.zeros_like(a) for a in params]
        m2 = [np.zeros_like(a) for a in params]
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        t = 0
        n_pos = len(pu)
        for _ in range(iters):
            # this epoch's pairs: every logged pair + neg_ratio uniform pairs per logged pair
            su = np.concatenate([pu, g.integers(0, nu, n_pos * p.neg_ratio)])
            si = np.concatenate([pi, g.integers(0, ni, n_pos * p.neg_ratio)])
            k = su * ni + si
            pos = np.minimum(np.searchsorted(keys, k), n_pos - 1)
            label = np.where(keys[pos] == k, w_pos[si], np.float32(0.0)).astype(np.float32)  # Y / θ̂
            order = g.permutation(len(su))
            for lo in range(0, len(order), p.batch_size):
                sel = order[lo: lo + p.batch_size]
                u, i = su[sel], si[sel]
                logit = np.einsum("nf,nf->n", U[u], V[i]) + b[i]
                dz = (0.5 * (1.0 + np.tanh(0.5 * logit)) - label[sel]).astype(np.float32)  # σ(ŷ) − Y/θ̂
                D = sp.coo_matrix((dz, (u, i)), shape=(nu, ni))
                cu = np.bincount(u, minlength=nu).astype(np.float32)
                ci = np.bincount(i, minlength=ni).astype(np.float32)
                grads = [
                    D @ V + (lam * cu)[:, None] * U,
                    D.T @ U + (lam * ci)[:, None] * V,
                    np.bincount(i, weights=dz, minlength=ni).astype(np.float32) + lam * ci * b,
                ]
                t += 1
                c1, c2 = 1.0 - beta1**t, 1.0 - beta2**t
                for a, gr, mm, vv in zip(params, grads, m1, m2, strict=True):  # Adam (dense moments)
                    mm *= beta1
                    mm += (1.0 - beta1) * gr
                    vv *= beta2
                    vv += (1.0 - beta2) * gr * gr
                    a -= ((p.learning_rate / c1) * mm / (np.sqrt(vv / c2) + eps)).astype(np.float32)
        return U, V, b
