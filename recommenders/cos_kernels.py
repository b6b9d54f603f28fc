"""Fused inference kernels for cosine linear attention (E-COSATT; GROUNDING §1): Numba CPU and Numba CUDA.

Both compute exactly :func:`recloop.recommenders.cos_attention.cos_attention` (float32, [B, H, L, dh]) in
one pass over the sequence per (batch row, head), with a ``dh x dh`` state and no ``L x L`` buffer:

* causal: at each valid position s, ``c += 1``, ``S += k^_s (v_s / c^sigmoid(m_h))^T``, ``out_s = q^_s S``;
* bidirectional: ``S = sum_s k^_s v_s^T`` and n = #valid in a first sweep, then ``out_s = q^_s S / n^p``.

Padded positions give zero outputs, as in the torch form. The CUDA kernel runs one block per
(batch row, head), one thread per value column j, each thread holding its column ``S[:, j]`` in local
memory; the current q, k, v rows are staged in shared memory. It runs under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, set before ``numba.cuda`` is first imported), which is how CI tests it.

:func:`pick_kernel` maps the engine's backend switch (``engine.backend``) onto a kernel: ``auto`` (and
``cupy``) pick the CUDA kernel when a real GPU is usable by Numba, else the Numba CPU kernel, following
:func:`recloop.sim.backends.resolve_backend_name`.
"""

from __future__ import annotations

import math
import os

import numpy as np
from numba import njit, prange

from recloop.sim.backends import nvidia_present

_EPS = 1e-12  # as torch.nn.functional.normalize


# ---------------------------------------------------------------------------------------------
# CPU (Numba)
# ---------------------------------------------------------------------------------------------
@njit(cache=False, fastmath=True, inline="always")
def _inv_norm(x):
    s = np.float32(0.0)
    for i in range(x.shape[0]):
        s += x[i] * x[i]
    return np.float32(1.0) / max(np.float32(math.sqrt(s)), np.float32(_EPS))


@njit(cache=False, fastmath=True)
def _causal_row(q, k, v, valid, p, ST, kh, qh, out):
    """One (b, h): q, k, v [L, d]; ST [dv, d] the transposed state; kh, qh [d] scratch; out [L, dv].

    The state update and the read-out share one sweep over ST (row j: ``ST[j] += k^ v'_j``, then
    ``out_j = ST[j] . q^``), so ST is read and written once per position.
    """
    L, D = q.shape
    Dv = v.shape[1]
    c = 0
    for s in range(L):
        if not valid[s]:
            out[s, :] = 0.0
            continue
        c += 1
        vscale = np.float32(c ** -p)
        kin = _inv_norm(k[s])
        qin = _inv_norm(q[s])
        for i in range(D):
            kh[i] = k[s, i] * kin
            qh[i] = q[s, i] * qin
        for j in range(Dv):
            vj = v[s, j] * vscale
            acc = np.float32(0.0)
            for i in range(D):
                x = ST[j, i] + kh[i] * vj
                ST[j, i] = x
                acc += qh[i] * x
            out[s, j] = acc


@njit(cache=False, fastmath=True)
def _bidir_row(q, k, v, valid, p, ST, kh, qh, out):
    """One (b, h), bidirectional: ST = sum v k^T over valid rows, then out = (ST q^) / max(n,1)^p.

    qh [4, d] scratch (padded rows get q^ = 0, hence zero outputs)."""
    L, D = q.shape
    Dv = v.shape[1]
    n = 0
    for s in range(L):
        if not valid[s]:
            continue
        n += 1
        kin = _inv_norm(k[s])
        for i in range(D):
            kh[i] = k[s, i] * kin
        for j in range(Dv):
            vj = v[s, j]
            for i in range(D):
                ST[j, i] += kh[i] * vj
    scale = np.float32(max(n, 1) ** -p)
    for s0 in range(0, L, 4):  # read out 4 rows at a time: 4 independent dot products per ST row
        for r in range(4):
            s = s0 + r
            if s < L and valid[s]:
                qin = _inv_norm(q[s]) * scale
                for i in range(D):
                    qh[r, i] = q[s, i] * qin
            else:
                qh[r, :] = 0.0
        for j in range(Dv):
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for i in range(D):
                x = ST[j, i]
                a0 += qh[0, i] * x
                a1 += qh[1, i] * x
                a2 += qh[2, i] * x
                a3 += qh[3, i] * x
            if s0 + 3 < L:
                out[s0, j], out[s0 + 1, j], out[s0 + 2, j], out[s0 + 3, j] = a0, a1, a2, a3
            else:
                for r, a in enumerate((a0, a1, a2)):
                    if s0 + r < L:
                        out[s0 + r, j] = a


@njit(parallel=True, cache=False, fastmath=True)
def _cos_attention_cpu(q, k, v, m, valid, causal, out):
    B, H, L, D = q.shape
    Dv = v.shape[3]
    for bh in prange(B * H):
        b = bh // H
        h = bh - b * H
        p = 1.0 / (1.0 + math.exp(-np.float64(m[h])))
        ST = np.zeros((Dv, D), np.float32)
        kh = np.empty(D, np.float32)
        qh = np.empty((4, D), np.float32)
        if causal:
            _causal_row(q[b, h], k[b, h], v[b, h], valid[b], p, ST, kh, qh[0], out[b, h])
        else:
            _bidir_row(q[b, h], k[b, h], v[b, h], valid[b], p, ST, kh, qh, out[b, h])


def _as_inputs(q, k, v, m, valid):
    q, k, v = (np.ascontiguousarray(np.asarray(t, dtype=np.float32)) for t in (q, k, v))
    B, H, L, _ = q.shape
    if k.shape != q.shape or v.shape[:3] != (B, H, L):
        raise ValueError(f"q, k, v shapes disagree: {q.shape}, {k.shape}, {v.shape}")
    m = np.ascontiguousarray(np.asarray(m, dtype=np.float32).reshape(H))
    vb = np.ones((B, L), np.uint8) if valid is None else np.ascontiguousarray(np.asarray(valid).reshape(B, L))
    return q, k, v, m, vb.astype(np.uint8, copy=False)


def cos_attention_numba(q, k, v, m, valid, causal: bool) -> np.ndarray:
    """Fused CPU cosine attention: float32 [B, H, L, dh] in and out (see the module docstring)."""
    q, k, v, m, vb = _as_inputs(q, k, v, m, valid)
    out = np.empty(v.shape, np.float32)
    _cos_attention_cpu(q, k, v, m, vb, bool(causal), out)
    return out


# ---------------------------------------------------------------------------------------------
# GPU (Numba CUDA; also the simulator)
# ---------------------------------------------------------------------------------------------
def _cuda_module():
    """The CUDA kernel's module, imported lazily: importing numba.cuda is slow and fixes the simulator switch."""
    from . import cos_kernels_cuda

    return cos_kernels_cuda


def _is_device(x) -> bool:
    return hasattr(x, "__cuda_array_interface__")


def cos_attention_cuda(q, k, v, m, valid, causal: bool):
    """Fused CUDA cosine attention, one block per (b, h).

    Host (NumPy) inputs are copied to the device and the result comes back as a float32 ndarray;
    device inputs (``__cuda_array_interface__``, e.g. CUDA torch tensors; float32, contiguous,
    ``valid`` as uint8) stay there and a Numba device array is returned.
    """
    from numba import cuda

    on_device = _is_device(q)
    if on_device:
        q, k, v, m, vb = (cuda.as_cuda_array(t) for t in (q, k, v, m, valid))
    else:
        q, k, v, m, vb = (cuda.to_device(t) for t in _as_inputs(q, k, v, m, valid))
    B, H, L, D = q.shape
    Dv = v.shape[3]
    K = _cuda_module()
    if max(D, Dv) > K.MAX_HEAD_DIM:
        raise ValueError(f"head width {max(D, Dv)} > {K.MAX_HEAD_DIM}, the CUDA kernel's limit")
    out = cuda.device_array((B, H, L, Dv), np.float32)
    if B * H and L:
        K.cos_attention_kernel[B * H, max(D, Dv)](q, k, v, m, vb, bool(causal), out)
    return out if on_device else out.copy_to_host()


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
def cuda_usable() -> bool:
    """A real GPU usable by Numba CUDA (never the simulator)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0") or not nvidia_present():
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:
        return False


def pick_kernel(backend: str) -> str:
    """The attention kernel for an engine backend (or kernel) name: "torch", "numba" or "cuda".

    ``auto`` and ``cupy``: "cuda" when a GPU is usable by Numba (not the simulator), else "numba";
    ``numpy``/``numba``: "numba"; ``torch``: the torch reference; ``cuda``: the CUDA kernel (which
    also runs under the simulator).
    """
    if backend in ("auto", "cupy"):
        return "cuda" if cuda_usable() else "numba"
    if backend in ("numpy", "numba"):
        return "numba"
    if backend in ("torch", "cuda"):
        return backend
    raise ValueError(f"unknown attention kernel or engine backend {backend!r}; "
                     "use one of auto, numpy, numba, torch, cupy, cuda")


def run_kernel(kernel: str, q, k, v, m, valid, causal: bool):
    """Run the fused ``kernel`` ("numba" or "cuda") on torch tensors q, k, v [B, H, L, dh], m [H], valid [B, L]
    (or None) -> tensor (inference: no autograd)."""
    import torch

    B, _, L, _ = q.shape
    if valid is None:
        valid = torch.ones(B, L, dtype=torch.bool, device=q.device)
    dev, dtype = q.device, q.dtype
    args = [t.detach().to(torch.float32).contiguous() for t in (q, k, v, m)] + [valid.to(torch.uint8).contiguous()]
    if kernel == "numba":
        out = cos_attention_numba(*(t.cpu().numpy() for t in args), causal)
        return torch.from_numpy(out).to(device=dev, dtype=dtype)
    if kernel == "cuda":
        if dev.type == "cuda":
            return torch.as_tensor(cos_attention_cuda(*args, causal), device=dev).to(dtype)
        out = cos_attention_cuda(*(t.numpy() for t in args), causal)
        return torch.from_numpy(out).to(dtype)
    raise ValueError(f"unknown attention kernel {kernel!r}")
