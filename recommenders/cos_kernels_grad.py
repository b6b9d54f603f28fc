"""A differentiable fused CPU cosine attention (E-COSATT): Numba forward and hand-derived Numba backward.

:func:`cos_attention_fused` equals :func:`recloop.recommenders.cos_attention.cos_attention` (float32) but
keeps nothing for the backward pass except its inputs: the backward recomputes the ``dh x dh`` state in
a forward sweep and accumulates the adjoint state in a reverse sweep, one (batch row, head) per task.
It is the fast training path on CPU (the chunked torch form runs ~15 small ops forward and backward).

Causal form, per (b, h), with q^ = q / |q|, k^ likewise, v'_s = v_s c_s^-p, p = sigmoid(m_h):
``S_t = sum_{s<=t} k^_s v'_s^T``, ``out_t = S_t^T q^_t``. Backward, with ``G_s = sum_{t>=s} q^_t dout_t^T``:
``dq^_t = S_t dout_t``, ``dk^_s = G_s v'_s``, ``dv'_s = G_s^T k^_s``,
``dp = -sum_s ln(c_s) (dv'_s . v'_s)``. Bidirectional with a = max(n,1)^-p:
``dq^_t = a S dout_t``, ``G = a sum_t q^_t dout_t^T``, ``dp = -ln(max(n,1)) sum_t dout_t . out_t``.
Row normalisation: ``dx = (dx^ - x^ (x^ . dx^)) / |x|`` (``dx^ / eps`` where |x| < eps, as F.normalize).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from .cos_kernels import _EPS, _as_inputs, cos_attention_numba


@njit(cache=False, fastmath=True, inline="always")
def _unit(x, xh):
    """xh = x / max(|x|, eps); returns 1 / max(|x|, eps) and whether the norm was clamped."""
    s = np.float32(0.0)
    for i in range(x.shape[0]):
        s += x[i] * x[i]
    nrm = np.float32(math.sqrt(s))
    r = np.float32(1.0) / max(nrm, np.float32(_EPS))
    for i in range(x.shape[0]):
        xh[i] = x[i] * r
    return r, nrm < np.float32(_EPS)


@njit(cache=False, fastmath=True, inline="always")
def _unit_back(xh, dxh, r, clamped, dx):
    """dx from the gradient dxh of the unit row xh = x r."""
    dot = np.float32(0.0)
    if not clamped:
        for i in range(xh.shape[0]):
            dot += xh[i] * dxh[i]
    for i in range(xh.shape[0]):
        dx[i] = (dxh[i] - xh[i] * dot) * r


@njit(cache=False, fastmath=True)
def _causal_back(q, k, v, dout, valid, p, ST, qh, kh, dh, dq, dk, dv):
    """One (b, h), causal: dq, dk, dv [L, d] written, returns dL/dp."""
    L, D = q.shape
    Dv = v.shape[1]
    ST[:, :] = 0.0
    c = 0
    for t in range(L):  # forward sweep: S_t, dq^_t = S_t dout_t
        dq[t, :] = 0.0
        if not valid[t]:
            continue
        c += 1
        w = np.float32(c ** -p)
        _unit(k[t], kh)
        rq, cq = _unit(q[t], qh)
        dh[:] = 0.0
        for j in range(Dv):
            vj = v[t, j] * w
            gj = dout[t, j]
            for i in range(D):
                x = ST[j, i] + kh[i] * vj
                ST[j, i] = x
                dh[i] += x * gj
        _unit_back(qh, dh, rq, cq, dq[t])
    ST[:, :] = 0.0  # now the adjoint state G^T
    dp = 0.0
    for s in range(L - 1, -1, -1):  # reverse sweep: G_s, dk^_s = G_s v'_s, dv'_s = G_s^T k^_s
        dk[s, :] = 0.0
        dv[s, :] = 0.0
        if not valid[s]:
            continue
        w = np.float32(c ** -p)
        lnc = math.log(c)
        c -= 1
        _unit(q[s], qh)
        rk, ck = _unit(k[s], kh)
        dh[:] = 0.0
        for j in range(Dv):
            gj = dout[s, j]
            vj = v[s, j] * w
            acc = np.float32(0.0)
            for i in range(D):
                g = ST[j, i] + qh[i] * gj
                ST[j, i] = g
                dh[i] += g * vj
                acc += g * kh[i]
            dv[s, j] = acc * w
            dp -= lnc * acc * vj
        _unit_back(kh, dh, rk, ck, dk[s])
    return dp


@njit(cache=False, fastmath=True)
def _bidir_back(q, k, v, dout, valid, p, ST, GT, qh, kh, dh, dq, dk, dv):
    """One (b, h), bidirectional: dq, dk, dv [L, d] written, returns dL/dp."""
    L, D = q.shape
    Dv = v.shape[1]
    ST[:, :] = 0.0
    GT[:, :] = 0.0
    n = 0
    for s in range(L):  # S = sum k^ v^T
        if valid[s]:
            n += 1
            _unit(k[s], kh)
            for j in range(Dv):
                vj = v[s, j]
                for i in range(D):
                    ST[j, i] += kh[i] * vj
    a = np.float32(max(n, 1) ** -p)
    oo = 0.0  # sum_t dout_t . out_t
    for t in range(L):  # dq^_t = a S dout_t, G += a q^_t dout_t^T
        dq[t, :] = 0.0
        if not valid[t]:
            continue
        rq, cq = _unit(q[t], qh)
        dh[:] = 0.0
        for j in range(Dv):
            gj = dout[t, j] * a
            acc = np.float32(0.0)
            for i in range(D):
                x = ST[j, i]
                dh[i] += x * gj
                acc += x * qh[i]
                GT[j, i] += qh[i] * gj
            oo += acc * gj
        _unit_back(qh, dh, rq, cq, dq[t])
    for s in range(L):  # dk^_s = G v_s, dv_s = G^T k^_s
        dk[s, :] = 0.0
        dv[s, :] = 0.0
        if not valid[s]:
            continue
        rk, ck = _unit(k[s], kh)
        dh[:] = 0.0
        for j in range(Dv):
            vj = v[s, j]
            acc = np.float32(0.0)
            for i in range(D):
                g = GT[j, i]
                dh[i] += g * vj
                acc += g * kh[i]
            dv[s, j] = acc
        _unit_back(kh, dh, rk, ck, dk[s])
    return -math.log(max(n, 1)) * oo


@njit(parallel=True, cache=False, fastmath=True)
def _backward_cpu(q, k, v, m, valid, causal, dout, dq, dk, dv, dp):
    B, H, L, D = q.shape
    Dv = v.shape[3]
    for bh in prange(B * H):
        b = bh // H
        h = bh - b * H
        p = 1.0 / (1.0 + math.exp(-np.float64(m[h])))
        ST = np.empty((Dv, D), np.float32)
        qh = np.empty(D, np.float32)
        kh = np.empty(D, np.float32)
        dh = np.empty(D, np.float32)
        if causal:
            dp[b, h] = _causal_back(q[b, h], k[b, h], v[b, h], dout[b, h], valid[b], p, ST, qh, kh, dh,
                                    dq[b, h], dk[b, h], dv[b, h])
        else:
            GT = np.empty((Dv, D), np.float32)
            dp[b, h] = _bidir_back(q[b, h], k[b, h], v[b, h], dout[b, h], valid[b], p, ST, GT, qh, kh, dh,
                                   dq[b, h], dk[b, h], dv[b, h])


def cos_attention_backward_numba(q, k, v, m, valid, causal: bool, dout):
    """Gradients ``(dq, dk, dv, dm)`` of ``sum(dout * cos_attention(q, k, v, m, valid, causal))`` (float32)."""
    q, k, v, m, vb = _as_inputs(q, k, v, m, valid)
    dout = np.ascontiguousarray(np.asarray(dout, dtype=np.float32))
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    dp = np.zeros(q.shape[:2], np.float64)
    _backward_cpu(q, k, v, m, vb, bool(causal), dout, dq, dk, dv, dp)
    p = 1.0 / (1.0 + np.exp(-m.astype(np.float64)))
    return dq, dk, dv, (dp.sum(0) * p * (1.0 - p)).astype(np.float32)


class _FusedCosAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, m, valid, causal):
        args = [t.detach().to(torch.float32).contiguous().numpy() for t in (q, k, v, m)]
        ctx.save_for_backward(q, k, v, m, valid)
        ctx.causal = causal
        return torch.from_numpy(cos_attention_numba(*args, valid.numpy(), causal)).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, m, valid = ctx.saved_tensors
        args = [t.detach().to(torch.float32).contiguous().numpy() for t in (q, k, v, m)]
        grads = cos_attention_backward_numba(*args, valid.numpy(), ctx.causal,
                                             dout.detach().to(torch.float32).contiguous().numpy())
        dq, dk, dv, dm = (torch.from_numpy(g).to(t.dtype) for g, t in zip(grads, (q, k, v, m)))
        return dq, dk, dv, dm, None, None


def cos_attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor,
                        valid: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Differentiable fused cosine attention on CPU tensors (float32 arithmetic; see the module docstring)."""
    if q.device.type != "cpu":
        raise ValueError("cos_attention_fused runs on CPU tensors; use cos_attention on other devices")
    if valid is None:
        valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool)
    return _FusedCosAttention.apply(q, k, v, m, valid.to(torch.uint8).contiguous(), bool(causal))
