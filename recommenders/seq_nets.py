"""The torch networks of the sequential policies (:mod:`.sequential`): SASRec (E-SASREC) and the cosine
linear-attention network (E-COSATT, GROUNDING §1), causal or bidirectional (cloze).

Token conventions (shared with the policy): item ids 0..n-1 are embedding rows 1..n, row 0 is padding
and token n+1 is [MASK] (its vector is a separate parameter, so the catalog can grow without moving
it). Sequences are left-padded [B, L] token tensors, most recent item last; positions are the absolute
column indices 0..L-1 (learned), so the most recent item always sits at L-1 (L-2 in the cloze form,
whose input ends with [MASK]).

The encoder is the pre-LN transformer block (LN -> attention -> residual; LN -> point-wise FFN (two
d x d layers, GELU, as SASRec's) -> residual) with dropout on both residual branches and on the input,
item embeddings scaled by sqrt(d) plus learned positions, padded positions zeroed after every block,
and a final LN (SASRec, Kang & McAuley 2018; pre-LN as in their
code). Scores are ``hidden @ item_table().T``: the input embeddings are shared with the output, as in
SASRec. Optional item side features (``text``: one fixed vector per item, e.g. MiniLM of title and
genres) are projected to d and added to the item embeddings (MuSTRec-style fusion, our form [O]).

New item rows are drawn from N(0, init_std²) by a counter-based generator keyed by (seed, item id):
an item's initial vector does not depend on when the catalog grew.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recloop.rng import derive_key, hash_uniform

from .cos_attention import CosineAttention

__all__ = ["SeqNet", "SoftmaxAttention", "item_rows", "new_net"]


def item_rows(seed: int, first: int, count: int, dim: int, std: float) -> np.ndarray:
    """Initial vectors of items ``first .. first+count-1``: N(0, std²) by Box-Muller over counter-based
    uniforms keyed by (seed, item id, column), so a row never depends on when it was created."""
    key = derive_key(seed, "seq.item_rows")
    ids = np.arange(first, first + count, dtype=np.int64)[:, None]
    cols = np.arange(dim, dtype=np.int64)[None, :]
    u1 = hash_uniform(key, ids, 2 * cols)
    u2 = hash_uniform(key, ids, 2 * cols + 1)
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2) * std).astype(np.float32)


class SoftmaxAttention(nn.Module):
    """Multi-head scaled dot-product attention (SASRec's), causal or not, with the same interface as
    :class:`~.cos_attention.CosineAttention` (``dropout`` is accepted for that interface; the blocks drop
    the attention output, not the weights: dropout masks are costly on a CPU). Padded keys are never
    attended; a padded query attends to itself only (its output is zeroed by the block anyway), so no
    row of the mask is empty."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, causal: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.causal = int(dim), int(heads), bool(causal)
        self.Wq, self.Wk, self.Wv, self.Wo = (nn.Linear(dim, dim) for _ in range(4))

    def _split(self, t: Tensor) -> Tensor:
        B, L, _ = t.shape
        return t.view(B, L, self.heads, self.dim // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, valid: Tensor, kernel: str = "torch") -> Tensor:
        B, L, _ = x.shape
        allowed = valid[:, None, :].expand(B, L, L)
        if self.causal:
            allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        allowed = allowed | torch.eye(L, dtype=torch.bool, device=x.device)
        q, k, v = self._split(self.Wq(x)), self._split(self.Wk(x)), self._split(self.Wv(x))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        return self.Wo(a.transpose(1, 2).reshape(B, L, self.dim))

    def last(self, x: Tensor, valid: Tensor, kernel: str = "torch") -> Tensor:
        """[B, d]: the output at the last position only (it sees every valid position, causal or not)."""
        B, L, _ = x.shape
        allowed = valid.clone()
        allowed[:, -1] = True
        q, k, v = self._split(self.Wq(x[:, -1:])), self._split(self.Wk(x)), self._split(self.Wv(x))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, None, :])
        return self.Wo(a.reshape(B, self.dim))


def cosine_last(attn: CosineAttention, x: Tensor, valid: Tensor, kernel: str = "torch") -> Tensor:
    """[B, d]: :class:`CosineAttention`'s output at the last position only, in O(L d) per head: the cosine
    of the last query with every valid key times the values, over the layer's length normaliser (causal:
    each value row over max(c_s, 1)^σ(m), c_s its count of valid positions; bidirectional: the sum over
    max(n, 1)^σ(m)). Equal to ``attn(x, valid)[:, -1]`` (tested), for serving without the other queries."""
    B, L, d = x.shape
    q = F.normalize(attn._split(attn.Wq(x[:, -1:])), dim=-1)  # [B, H, 1, dh]
    mask = valid.to(x.dtype)[:, None, :, None]
    k = F.normalize(attn._split(attn.Wk(x)), dim=-1) * mask
    v = attn._split(attn.Wv(x)) * mask
    e = torch.sigmoid(attn.m.to(x.dtype))[None, :, None]  # [1, H, 1]
    if attn.causal:
        count = valid.to(x.dtype).cumsum(-1).clamp(min=1.0)[:, None, :]  # [B, 1, L]
        out = ((q @ k.transpose(-1, -2)) / (count ** e)[:, :, None, :]) @ v
    else:
        n = valid.to(x.dtype).sum(-1).clamp(min=1.0)[:, None, None]  # [B, 1, 1]
        out = (q @ k.transpose(-1, -2)) @ v / (n ** e)[..., None]
    return attn.Wo(out.reshape(B, d))


class Block(nn.Module):
    """Pre-LN transformer block: x + drop(attn(LN x)); x + drop(FFN(LN x)); padded rows zeroed."""

    def __init__(self, attn: nn.Module, dim: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attn
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, valid: Tensor, kernel: str = "torch") -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x), valid, kernel))
        x = x + self.drop(self.ffn(self.ln2(x)))
        return x * valid[..., None].to(x.dtype)

    def last(self, x: Tensor, valid: Tensor) -> Tensor:
        """[B, d]: the block's output at the last position only (which must be valid)."""
        h = self.ln1(x)
        a = self.attn.last(h, valid) if isinstance(self.attn, SoftmaxAttention) else cosine_last(self.attn, h, valid)
        y = x[:, -1] + self.drop(a)
        return y + self.drop(self.ffn(self.ln2(y)))


class SeqNet(nn.Module):
    """Item embeddings + learned positions + ``blocks`` attention blocks + final LN.

    ``attention``: ``softmax`` (SASRec) or ``cosine`` (E-COSATT); ``form``: ``causal`` (next-item
    training, the user is the last position's output) or ``bidirectional`` (cloze training, the user is
    the output at an appended [MASK]). ``text`` (n x t float32) adds projected item side features."""

    def __init__(self, n_items: int, *, dim: int, max_len: int, blocks: int, heads: int, dropout: float,
                 attention: str, form: str, seed: int, text: np.ndarray | None = None):
        super().__init__()
        if attention not in ("softmax", "cosine") or form not in ("causal", "bidirectional"):
            raise ValueError(f"unknown network {attention}/{form}")
        self.dim, self.max_len, self.seed = int(dim), int(max_len), int(seed)
        self.attention, self.form = attention, form
        self.init_std = 1.0 / math.sqrt(dim)
        rows = np.concatenate([np.zeros((1, dim), np.float32), item_rows(seed, 0, n_items, dim, self.init_std)])
        self.items = nn.Parameter(torch.from_numpy(rows))
        self.mask_emb = nn.Parameter(torch.from_numpy(item_rows(seed, -1, 1, dim, self.init_std)[0]))
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        causal = form == "causal"
        attn = (lambda: SoftmaxAttention(dim, heads, dropout, causal)) if attention == "softmax" else \
            (lambda: CosineAttention(dim, heads, 0.0, causal))
        self.blocks = nn.ModuleList([Block(attn(), dim, dropout) for _ in range(blocks)])
        self.ln = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.text_proj = None
        if text is not None:
            self.register_buffer("text", torch.from_numpy(np.ascontiguousarray(text, np.float32)))
            self.text_proj = nn.Linear(text.shape[1], dim, bias=False)
            nn.init.zeros_(self.text_proj.weight)  # starts as the ID-only model; learns how much text helps

    @property
    def n_items(self) -> int:
        return self.items.shape[0] - 1

    @property
    def mask_token(self) -> int:
        return self.n_items + 1

    # -- embeddings ---------------------------------------------------------------------------------
    def item_table(self) -> Tensor:
        """[n, d]: the vectors items are scored against (and embedded with)."""
        table = self.items[1:]
        if self.text_proj is not None:
            table = table + self.text_proj(self.text)
        return table

    def _embed(self, tokens: Tensor) -> Tensor:
        full = torch.cat([self.items[:1], self.item_table(), self.mask_emb[None]])
        return F.embedding(tokens, full, padding_idx=0)

    def _input(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        L = tokens.shape[1]
        valid = tokens > 0
        x = self._embed(tokens) * math.sqrt(self.dim) + self.pos[self.max_len - L:][None]
        return self.drop(x) * valid[..., None].to(x.dtype), valid

    def encode(self, tokens: Tensor, kernel: str = "torch") -> Tensor:
        """Hidden states [B, L, d] of left-padded tokens [B, L] (L <= max_len, right-aligned positions)."""
        x, valid = self._input(tokens)
        for block in self.blocks:
            x = block(x, valid, kernel)
        return self.ln(x)

    def user_repr(self, tokens: Tensor, kernel: str = "torch") -> Tensor:
        """[B, d]: causal: the last position's hidden state; bidirectional: shift left, append [MASK] and
        take its output. ``tokens`` are the user's recent items, left-padded, most recent last (the last
        column must hold an item). The last block is evaluated at the last position only."""
        if self.form == "bidirectional":
            mask = torch.full_like(tokens[:, :1], self.mask_token)
            tokens = torch.cat([tokens[:, 1:], mask], dim=1)
        x, valid = self._input(tokens)
        for block in self.blocks[:-1]:
            x = block(x, valid, kernel)
        return self.ln(self.blocks[-1].last(x, valid))

    # -- a growing catalog --------------------------------------------------------------------------
    def grow(self, n_new: int, text: np.ndarray | None = None) -> nn.Parameter:
        """Add ``n_new`` item rows (initialised from (seed, item id)); returns the new parameter (the
        optimizer's state for the old one must follow it). ``text``: the new items' side features."""
        old = self.items
        if n_new <= 0:
            return old
        rows = torch.from_numpy(item_rows(self.seed, self.n_items, n_new, self.dim, self.init_std))
        self.items = nn.Parameter(torch.cat([old.detach(), rows.to(old.dtype)]))
        if self.text_proj is not None:
            if text is None or len(text) != n_new:
                raise ValueError("grow() needs the side features of the new items")
            self.text = torch.cat([self.text, torch.from_numpy(np.asarray(text, np.float32))])
        return self.items


def new_net(n_items: int, seed: int, **kwargs) -> SeqNet:
    """A :class:`SeqNet` whose dense layers and positions are initialised from ``seed`` (torch's global
    generator is forked, so nothing else's draws change)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) % (2**63))
        return SeqNet(n_items, seed=seed, **kwargs)
