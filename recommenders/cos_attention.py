"""Cosine linear attention (E-COSATT, GROUNDING §1: Cottention as coded) in torch.

Per head h: Q and K rows are L2-normalised (no softmax, no 1/sqrt(d)); padded positions are zeroed in
Q, K and V; the output is scaled by a learnable per-head length normaliser with exponent
``sigmoid(m_h)`` (``m_h`` initialised to 0.5, so the exponent starts at 0.6225), denominators clamped
at >= 1:

* bidirectional: ``out_i = sum_j cos(q_i, k_j) v_j / max(n, 1)^sigmoid(m_h)``, n = valid positions,
  evaluated as ``Q^(K^T V)`` (linear in L);
* causal (Cottention's GPT form): value row s is divided by its own count of valid positions,
  ``out_t = sum_{s<=t} cos(q_t, k_s) v_s / max(c_s, 1)^sigmoid(m_h)``, ``c_s = #valid positions <= s``,
  by chunked prefix sums: a ``dh x dh`` state per head carried across chunks (an exclusive cumulative
  sum of per-chunk ``K^T V``) plus a masked quadratic within each chunk, so memory is
  ``O(L * (chunk + dh))`` per head, linear in L.

Whether this is Cotten4Rec's exact normalisation is unverified (METRICS_AND_MODELS §G.3).
Outputs at padded positions are zero; they never affect valid positions.

Fused kernels (:mod:`cos_kernels`: Numba CPU, Numba CUDA) compute the same op for inference, and
:mod:`cos_kernels_grad` adds a differentiable fused CPU form (Numba backward), the fast training path on
CPU; :class:`CosineAttention` dispatches to them through its ``kernel`` argument.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: kernels :meth:`CosineAttention.forward` accepts besides the engine backend names (see ``pick_kernel``)
KERNELS = ("torch", "numba", "cuda", "auto")
_EPS = 1e-12  # as F.normalize


def _valid(q: Tensor, valid: Tensor | None) -> Tensor:
    B, _, L, _ = q.shape
    return torch.ones(B, L, dtype=torch.bool, device=q.device) if valid is None else valid


def _unit_rows(x: Tensor, mask: Tensor) -> Tensor:
    """``x / max(|x|, eps)`` per row (as F.normalize), zeroed where ``mask`` [B, 1, L, 1] is 0, in one product."""
    return x * (mask / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(_EPS))


def _exponent(m: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.sigmoid(m.to(dtype))


def _bidir_denom(valid: Tensor, m: Tensor, dtype: torch.dtype) -> Tensor:
    """``max(n, 1)^sigmoid(m_h)`` as [B, H, 1, 1]."""
    n = valid.sum(-1).to(dtype).clamp(min=1.0)
    return (n[:, None] ** _exponent(m, dtype)[None, :])[:, :, None, None]


def _causal_denom(valid: Tensor, m: Tensor, dtype: torch.dtype) -> Tensor:
    """``max(c_s, 1)^sigmoid(m_h)`` as [B, H, L, 1] (c_s = valid positions <= s)."""
    c = valid.to(dtype).cumsum(-1).clamp(min=1.0)
    return (c[:, None, :] ** _exponent(m, dtype)[None, :, None])[..., None]


def _prepare(q: Tensor, k: Tensor, v: Tensor, m: Tensor, valid: Tensor | None,
             causal: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Unit Q, K rows and V with padding zeroed; causal: V rows already divided by c_s^p.

    Returns ``(q^, k^, v', denominator)``; the denominator is None in the causal form (it is in v').
    """
    valid = _valid(q, valid)
    mask = valid.to(q.dtype)[:, None, :, None]
    qn, kn = _unit_rows(q, mask), _unit_rows(k, mask)
    if causal:
        return qn, kn, v * (mask / _causal_denom(valid, m, q.dtype)), None
    return qn, kn, v * mask, _bidir_denom(valid, m, q.dtype)


def _causal_chunked(qn: Tensor, kn: Tensor, vs: Tensor, chunk: int) -> Tensor:
    """``out_t = sum_{s<=t} (q_t . k_s) v_s`` by chunks: masked quadratic inside, dh x dh state across."""
    B, H, L, D = qn.shape
    Dv = vs.shape[-1]
    C = max(1, min(int(chunk), L))
    nc = -(-L // C)
    pad = nc * C - L
    if pad:
        qn, kn, vs = (F.pad(t, (0, 0, 0, pad)) for t in (qn, kn, vs))
    qc, kc, vc = qn.view(B, H, nc, C, D), kn.view(B, H, nc, C, D), vs.view(B, H, nc, C, Dv)
    out = torch.tril(qc @ kc.transpose(-1, -2)) @ vc  # within each chunk
    if nc > 1:
        kv = kc.transpose(-1, -2) @ vc  # [B, H, nc, D, Dv]: each chunk's K^T V
        state = torch.cat([kv.new_zeros(B, H, 1, D, Dv), kv[:, :, :-1].cumsum(2)], dim=2)  # before chunk
        out = out + qc @ state
    return out.reshape(B, H, nc * C, Dv)[:, :, :L]


def cos_attention(q: Tensor, k: Tensor, v: Tensor, m: Tensor, valid: Tensor | None, causal: bool,
                  chunk: int = 64) -> Tensor:
    """Cosine linear attention (E-COSATT) of q, k, v [B, H, L, dh] with per-head m [H]; differentiable.

    ``valid`` [B, L] bool (False = padding). Bidirectional: ``Q^(K^T V) / max(n,1)^sigmoid(m)``;
    causal: chunked prefix sums with chunk length ``chunk`` (memory linear in L).
    """
    qn, kn, vm, denom = _prepare(q, k, v, m, valid, causal)
    if not causal:
        return (qn @ (kn.transpose(-1, -2) @ vm)) / denom
    return _causal_chunked(qn, kn, vm, chunk)


def cos_attention_quadratic(q: Tensor, k: Tensor, v: Tensor, m: Tensor, valid: Tensor | None,
                            causal: bool) -> Tensor:
    """The explicit L x L form of :func:`cos_attention` (the reference for tests)."""
    qn, kn, vm, denom = _prepare(q, k, v, m, valid, causal)
    scores = qn @ kn.transpose(-1, -2)  # [B, H, L, L] cosines (0 where either side is padding)
    if not causal:
        return (scores @ vm) / denom
    L = q.shape[-2]
    return (scores * torch.ones(L, L, dtype=torch.bool, device=q.device).tril()) @ vm


class CosineAttention(nn.Module):
    """Multi-head cosine linear attention layer (E-COSATT): Wq, Wk, Wv, Wo and a per-head ``m`` (init 0.5).

    ``chunk`` is the chunk length of the torch causal form.

    ``dropout`` applies to the attention output before Wo (the attention weights are never formed, so
    there is nothing else to drop; our choice [O]).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, causal: bool = False, chunk: int = 64):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.causal, self.chunk = int(dim), int(heads), bool(causal), int(chunk)
        self.Wq, self.Wk, self.Wv, self.Wo = (nn.Linear(dim, dim) for _ in range(4))
        self.m = nn.Parameter(torch.full((heads,), 0.5))
        self.drop = nn.Dropout(dropout)

    def _split(self, t: Tensor) -> Tensor:
        B, L, _ = t.shape
        return t.view(B, L, self.heads, self.dim // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, valid: Tensor | None = None, kernel: str = "torch") -> Tensor:
        """x [B, L, d], valid [B, L] bool -> [B, L, d].

        ``kernel``: "torch" (the chunked torch form, any device), "numba" (fused CPU kernel; when a
        gradient is needed, the differentiable fused forward/backward of :mod:`cos_kernels_grad`),
        "cuda" (fused GPU kernel, inference only), or an engine backend name mapped by
        :func:`cos_kernels.pick_kernel` ("auto": cuda on a GPU, else numba; under autograd "cuda"
        falls back to "torch").
        """
        q, k, v = self._split(self.Wq(x)), self._split(self.Wk(x)), self._split(self.Wv(x))
        a = self._attend(q, k, v, valid, kernel)
        B, L, _ = x.shape
        return self.Wo(self.drop(a.transpose(1, 2).reshape(B, L, self.dim)))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, kernel: str) -> Tensor:
        if kernel == "torch":
            return cos_attention(q, k, v, self.m, valid, self.causal, self.chunk)
        from recloop.recommenders import cos_kernels

        picked = cos_kernels.pick_kernel(kernel)
        grad = torch.is_grad_enabled() and (q.requires_grad or self.m.requires_grad)
        if grad and picked == "cuda":
            if kernel == "cuda":
                raise RuntimeError("kernel 'cuda' is inference only: call under torch.no_grad(), "
                                   "or use kernel='torch' or 'numba' for training")
            picked = "torch"
        if grad and picked == "numba":
            from recloop.recommenders.cos_kernels_grad import cos_attention_fused

            return cos_attention_fused(q, k, v, self.m, valid, self.causal)
        if picked == "torch":
            return cos_attention(q, k, v, self.m, valid, self.causal, self.chunk)
        return cos_kernels.run_kernel(picked, q, k, v, self.m, valid, self.causal)
