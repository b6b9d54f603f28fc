"""Training losses of the sequential policies (:mod:`.sequential`): BCE, softmax (full or sampled) and
the dual-scale softmax loss DSL (E-DSL; GROUNDING §2 is newer).

Every loss takes the hidden states ``h`` [N, d] at the N target positions, the item table [n, d] and
the target items ``pos`` [N]; a score is ``s = <h, item>``.

* ``bce``: one sampled negative per position, ``softplus(-s+) + softplus(s-)`` (original SASRec, E-SASREC).
* ``softmax``: ``L = -log(e^{s+/τ} / (e^{s+/τ} + Σ_j e^{s_j/τ}))`` over every other item (full), or over
  ``negatives`` uniformly drawn items shared by the batch (sampled; a drawn item equal to a row's
  target is dropped from that row). With the full catalog and τ = 1 this is the cross-entropy over all
  items.
* ``dsl``: ``L = -log(e^{s+/τ_ex} / (e^{s+/τ_ex} + Σ_j w_j e^{s_j/τ_ex}))`` with

  - the κ-branch (within an instance): ``w_j ∝ exp(β_h s_j + β_s cos(i+, j))``, hardness and item–item
    similarity (cosine of the item vectors), normalised to mean 1 over the row's negatives;
  - the competition-aware branch (across instances): ``τ_ex = τ0 · clip(1 + κ · mean_{top-m}(s_j − s+),
    0.5, 2)`` over the row's m highest-scoring negatives (its competitor slate), rescaled so that the
    batch mean of τ_ex is τ0;
  - both computed under stop-gradient (no gradient flows through w or τ_ex).

  The paper's exact formulas are unknown (its text beyond the abstract could not be read): these are the
  reference's placeholder forms, **ours [O]**, with GROUNDING §2's reading of "normalised against logit
  drift" (stop-gradient, mean-1 weights, batch-mean temperature). With w ≡ 1 and a constant τ, DSL is
  the plain softmax loss; s+ = 1, one negative s = 0, τ = 1 → 0.313262 (the reference sanity).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["bce_loss", "candidate_scores", "dsl_loss", "dsl_weights", "softmax_loss", "weighted_softmax_loss"]


def weighted_softmax_loss(s_pos: Tensor, s_neg: Tensor, log_w: Tensor | None = None,
                          tau: Tensor | float = 1.0) -> Tensor:
    """Mean over rows of ``-log(e^{s+/τ} / (e^{s+/τ} + Σ_j w_j e^{s_j/τ}))``; ``log_w`` = -inf drops a
    negative, ``tau`` is a scalar or one value per row. The shared core of ``softmax`` and ``dsl``."""
    tau = torch.as_tensor(tau, dtype=s_pos.dtype, device=s_pos.device)
    tau = tau[:, None] if tau.ndim == 1 else tau
    a = s_pos[:, None] / tau
    b = s_neg / tau
    if log_w is not None:
        b = b + log_w
    return (torch.logsumexp(torch.cat([a, b], dim=1), dim=1) - a[:, 0]).mean()


def candidate_scores(h: Tensor, table: Tensor, pos: Tensor, negatives: Tensor | None = None):
    """(s+ [N], s_neg [N, C], valid [N, C], neg_ids [C]): scores of the targets and of the candidate
    negatives, the full catalog (``negatives`` None; the target masked out) or the shared sample."""
    if negatives is None:
        s_all = h @ table.T
        s_pos = s_all.gather(1, pos[:, None])[:, 0]
        valid = torch.ones_like(s_all, dtype=torch.bool)
        valid[torch.arange(len(pos), device=pos.device), pos] = False
        return s_pos, s_all, valid, torch.arange(table.shape[0], device=pos.device)
    s_pos = (h * table[pos]).sum(-1)
    s_neg = h @ table[negatives].T
    return s_pos, s_neg, negatives[None, :] != pos[:, None], negatives


def _masked(log_w: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, log_w, torch.full_like(log_w, -math.inf))


def bce_loss(h: Tensor, table: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """Binary cross-entropy with one negative ``neg`` [N] per position (original SASRec)."""
    s_pos = (h * table[pos]).sum(-1)
    s_neg = (h * table[neg]).sum(-1)
    return (F.softplus(-s_pos) + F.softplus(s_neg)).mean()


def softmax_loss(h: Tensor, table: Tensor, pos: Tensor, negatives: Tensor | None = None,
                 tau: float = 1.0) -> Tensor:
    """The softmax loss over the full catalog (``negatives`` None: the cross-entropy over every item,
    which is the same sum) or over a shared uniform sample."""
    if negatives is None:
        return F.cross_entropy((h @ table.T) / tau, pos)
    s_pos, s_neg, valid, _ = candidate_scores(h, table, pos, negatives)
    return weighted_softmax_loss(s_pos, s_neg, _masked(torch.zeros_like(s_neg), valid), tau)


@torch.no_grad()
def dsl_weights(s_pos: Tensor, s_neg: Tensor, valid: Tensor, cos: Tensor, *, tau0: float, beta_h: float,
                beta_s: float, kappa: float, m: int) -> tuple[Tensor, Tensor]:
    """(log w [N, C], τ_ex [N]) of DSL's two branches, under stop-gradient ([O], see the module doc)."""
    s_neg, s_pos = s_neg.detach(), s_pos.detach()
    n_valid = valid.sum(1, keepdim=True).clamp(min=1).to(s_neg.dtype)
    logits = _masked(beta_h * s_neg + beta_s * cos, valid)
    log_w = _masked(torch.log(n_valid) + torch.log_softmax(logits, dim=1), valid)  # mean 1 per row
    m = max(1, min(int(m), s_neg.shape[1]))
    top = torch.topk(_masked(s_neg, valid), m, dim=1).values
    gap = torch.where(torch.isfinite(top), top - s_pos[:, None], torch.zeros_like(top))
    k = torch.isfinite(top).sum(1).clamp(min=1).to(s_neg.dtype)
    tau = tau0 * (1.0 + kappa * gap.sum(1) / k).clamp(0.5, 2.0)
    return log_w, tau * (tau0 / tau.mean())


def dsl_loss(h: Tensor, table: Tensor, pos: Tensor, negatives: Tensor | None = None, *, tau0: float = 1.0,
             beta_h: float = 0.5, beta_s: float = 0.5, kappa: float = 0.5, m: int = 10) -> Tensor:
    """DSL (E-DSL, forms [O]) over the full catalog or a shared uniform sample of negatives."""
    s_pos, s_neg, valid, neg_ids = candidate_scores(h, table, pos, negatives)
    with torch.no_grad():
        unit = F.normalize(table.detach(), dim=-1)
        cos = unit[pos] @ unit[neg_ids].T if beta_s else torch.zeros_like(s_neg)
    log_w, tau = dsl_weights(s_pos, s_neg, valid, cos, tau0=tau0, beta_h=beta_h, beta_s=beta_s, kappa=kappa, m=m)
    if negatives is not None:
        return weighted_softmax_loss(s_pos, s_neg, log_w, tau)
    # full catalog: the target's own column carries e^{s+/τ} (w = 1), so one logsumexp covers the sum
    a = s_pos / tau
    logits = torch.where(valid, s_neg / tau[:, None] + log_w, a[:, None].expand_as(s_neg))
    return (torch.logsumexp(logits, dim=1) - a).mean()
