"""The Numba CUDA kernel of fused cosine attention (E-COSATT), kept apart because importing ``numba.cuda``
is slow and fixes whether the CUDA simulator is on (``NUMBA_ENABLE_CUDASIM=1`` must be set before).

One block per (batch row b, head h), one thread per value column j; thread j keeps the state column
``S[:, j]`` in local memory, the current q, k, v rows are staged in shared memory. Causal: one sweep
(``S += k^_s (v_s / c_s^p)^T``, ``out_s = q^_s S``); bidirectional: a sweep to build S and count n, then
one to read ``out_s = q^_s S / max(n,1)^p`` out. Called through :func:`cos_kernels.cos_attention_cuda`.
"""

from __future__ import annotations

import math

from numba import cuda, float32

#: largest head width the kernel supports (each thread's state column is a fixed-size local array)
MAX_HEAD_DIM = 256
MAXD = MAX_HEAD_DIM
_EPS = 1e-12  # as torch.nn.functional.normalize


@cuda.jit(device=True)
def _stage(q, k, v, b, h, s, sq, sk, sv, j, nt):
    """Copy row s of q, k, v into shared memory (threads stride over the columns)."""
    for i in range(j, q.shape[3], nt):
        sq[i] = q[b, h, s, i]
        sk[i] = k[b, h, s, i]
    for i in range(j, v.shape[3], nt):
        sv[i] = v[b, h, s, i]


@cuda.jit(device=True)
def _clamped_norm(sq_sum):
    """max(sqrt(sq_sum), eps) (the builtin max fails to compile for the CUDA target in numba 0.68)."""
    r = math.sqrt(sq_sum)
    return r if r > float32(_EPS) else float32(_EPS)


@cuda.jit(device=True)
def _accumulate(sk, vj, col, D):
    """col += k^ * vj (this thread's column of the state)."""
    nk = float32(0.0)
    for i in range(D):
        nk += sk[i] * sk[i]
    vj = vj / _clamped_norm(nk)
    for i in range(D):
        col[i] += sk[i] * vj


@cuda.jit(device=True)
def _read(sq, col, D):
    """q^ . col."""
    nq = float32(0.0)
    acc = float32(0.0)
    for i in range(D):
        nq += sq[i] * sq[i]
        acc += sq[i] * col[i]
    return acc / _clamped_norm(nq)


@cuda.jit
def cos_attention_kernel(q, k, v, m, valid, causal, out):
    """q, k [B, H, L, D], v/out [B, H, L, Dv] float32, m [H] float32, valid [B, L] uint8; grid B*H."""
    H, L, D, Dv = q.shape[1], q.shape[2], q.shape[3], v.shape[3]
    b = cuda.blockIdx.x // H
    h = cuda.blockIdx.x - b * H
    j = cuda.threadIdx.x
    sq = cuda.shared.array(MAXD, float32)
    sk = cuda.shared.array(MAXD, float32)
    sv = cuda.shared.array(MAXD, float32)
    col = cuda.local.array(MAXD, float32)  # this thread's state column S[:, j]
    for i in range(D):
        col[i] = 0.0
    p = float32(1.0) / (float32(1.0) + math.exp(-m[h]))  # float32 throughout: no f64 on the GPU
    c = 0
    for sweep in range(1 if causal else 2):
        for s in range(L):
            _stage(q, k, v, b, h, s, sq, sk, sv, j, cuda.blockDim.x)
            cuda.syncthreads()
            ok = valid[b, s] != 0
            if ok and sweep == 0:
                c += 1
            if j < Dv:
                if ok and sweep == 0:  # the state; causal: value row s divided by c_s^p
                    _accumulate(sk, sv[j] * math.pow(float32(c), -p) if causal else sv[j], col, D)
                if causal or sweep == 1:  # the output (0 at padding)
                    acc = _read(sq, col, D) if ok else float32(0.0)
                    out[b, h, s, j] = acc if causal else acc * math.pow(float32(c if c > 0 else 1), -p)
            cuda.syncthreads()
