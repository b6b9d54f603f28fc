"""Training of the sequential networks (:mod:`.seq_nets`) for the policies of :mod:`.sequential`.

* **Data.** Each user's last ``L + 2`` training items in log order (:func:`last_items`). A user with at
  least 3 holds its most recent item out for early stopping (the validation target) and trains on the
  rest; a user with 2 trains on both; shorter ones are skipped.
* **Causal** (next item): input = the sequence but its last item, target = the next item at every
  position. **Bidirectional** (cloze, BERT4Rec): each valid position of the last L items is replaced by
  [MASK] with probability ``mask_ratio`` (at least one per sequence), or, for a share ``ft_ratio`` of
  the sequences, only the last one (as it is served: the user is the output at an appended [MASK]).
* **Steps.** Adam; per epoch at most ``max_sequences`` sequences (drawn without replacement) in
  mini-batches; each batch is trimmed to its longest sequence (left padding removed). All draws come
  from the fit's generator; dropout from torch's generator seeded from it (forked, so nothing else's
  draws change).
* **Early stopping** on NDCG@10 of the held-out items (full catalog, the input items excluded), for
  at most ``eval_users`` users: the model and optimizer of the best epoch are kept. A warm fit keeps
  the best of its own epochs, never the weights it started from: in the loop the held-out items were
  picked from the current model's own slates, so the score of the current weights is biased upwards
  and comparing with it would freeze the model.

Optimizer state is saved by parameter name as NumPy arrays (:func:`optimizer_state`), the safe
checkpoint format, and follows a growing item table (new rows start with zero moments).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from .seq_losses import bce_loss, dsl_loss, softmax_loss
from .seq_nets import SeqNet

__all__ = ["FitData", "fit_net", "last_items", "load_optimizer_state", "optimizer_state", "split_for_fit"]


def last_items(users: np.ndarray, items: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """(user ids [m], their last ``keep`` items [m, keep] in row order, left-padded with -1)."""
    users = np.asarray(users, np.int64)
    order = np.argsort(users, kind="stable")
    u, i = users[order], np.asarray(items, np.int64)[order]
    uniq, start, cnt = np.unique(u, return_index=True, return_counts=True)
    from_end = np.repeat(start + cnt, cnt) - np.arange(len(u)) - 1  # 0 = the user's last row
    row = np.repeat(np.arange(len(uniq)), cnt)
    sel = from_end < keep
    out = np.full((len(uniq), keep), -1, np.int64)
    out[row[sel], keep - 1 - from_end[sel]] = i[sel]
    return uniq, out


@dataclass
class FitData:
    train: np.ndarray  # [m, L + 1] item ids, left-padded with -1
    val_input: np.ndarray  # [v, L] the inputs of the validation users
    val_target: np.ndarray  # [v]


def split_for_fit(users: np.ndarray, items: np.ndarray, max_len: int, eval_users: int,
                  rng: np.random.Generator) -> FitData:
    """Training sequences and the held-out validation items (see the module doc)."""
    _, S = last_items(users, items, max_len + 2)
    length = (S >= 0).sum(1)
    S = S[length >= 2]
    length = length[length >= 2]
    held = length >= 3
    train = np.where(held[:, None], np.concatenate([np.full((len(S), 1), -1), S[:, :-1]], 1), S)[:, 1:]
    val_rows = np.flatnonzero(held)
    if len(val_rows) > eval_users:
        val_rows = np.sort(rng.choice(val_rows, eval_users, replace=False))
    return FitData(train, train[val_rows, 1:], S[val_rows, -1])


# ------------------------------------------------------------------------------------- optimizer
def optimizer_state(net: SeqNet, opt: torch.optim.Optimizer) -> dict:
    """Adam's moments and step per parameter name, as arrays."""
    names = {id(p): n for n, p in net.named_parameters()}
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                out[names[id(p)]] = {k: v.detach().cpu().numpy().copy() for k, v in st.items()}
    return out


def load_optimizer_state(net: SeqNet, opt: torch.optim.Optimizer, state: dict) -> None:
    """Restore :func:`optimizer_state`; the item table's moments are zero-padded to its current rows."""
    params = dict(net.named_parameters())
    for name, st in state.items():
        p = params[name]
        entry = {}
        for k, v in st.items():
            t = torch.from_numpy(np.array(v))
            if t.ndim and t.shape != p.shape:  # a grown item table
                pad = torch.zeros((p.shape[0] - t.shape[0], *t.shape[1:]), dtype=t.dtype)
                t = torch.cat([t, pad])
            entry[k] = t
        opt.state[p] = entry


def new_optimizer(net: SeqNet, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.98))


# ------------------------------------------------------------------------------------- batches
def _trim(tokens: np.ndarray) -> np.ndarray:
    """Drop leading columns that are padding in every row (at least one column stays)."""
    used = np.flatnonzero((tokens > 0).any(0))
    return tokens[:, used[0]:] if len(used) else tokens[:, -1:]


def causal_batch(seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(input tokens [B, L'], target tokens [B, L']) of next-item training; 0 = no target."""
    tok = seqs + 1
    inp, tgt = tok[:, :-1], tok[:, 1:]
    tgt = np.where(inp > 0, tgt, 0)
    inp = _trim(inp)
    return inp, tgt[:, tgt.shape[1] - inp.shape[1]:]


def cloze_batch(seqs: np.ndarray, mask_token: int, mask_ratio: float, ft_ratio: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(input tokens with [MASK]s, target tokens at the masked positions; 0 = no target)."""
    tok = _trim(seqs[:, 1:] + 1)
    valid = tok > 0
    masked = (rng.random(tok.shape) < mask_ratio) & valid
    last_only = rng.random(len(tok)) < ft_ratio
    none = ~masked.any(1)
    masked[last_only | none] = False
    masked[last_only | none, -1] = True  # the last column is always a real item
    return np.where(masked, mask_token, tok), np.where(masked, tok, 0)


# ------------------------------------------------------------------------------------- fitting
@dataclass
class TrainConfig:
    loss: str
    negatives: int
    tau: float
    dsl: dict
    lr: float
    batch_size: int
    max_sequences: int
    mask_ratio: float
    ft_ratio: float
    patience: int


def _loss(net: SeqNet, inp: np.ndarray, tgt: np.ndarray, cfg: TrainConfig, rng: np.random.Generator):
    h = net.encode(torch.from_numpy(inp))
    sel = torch.from_numpy(tgt > 0)
    h, pos = h[sel], torch.from_numpy(tgt)[sel] - 1
    table = net.item_table()
    n = table.shape[0]
    if cfg.loss == "bce":
        return bce_loss(h, table, pos, torch.from_numpy(rng.integers(0, n, size=len(pos))))
    neg = None if cfg.negatives <= 0 else torch.from_numpy(rng.integers(0, n, size=cfg.negatives))
    if cfg.loss == "dsl":
        return dsl_loss(h, table, pos, neg, tau0=cfg.tau, **cfg.dsl)
    return softmax_loss(h, table, pos, neg, cfg.tau)


@torch.no_grad()
def validation_ndcg(net: SeqNet, data: FitData, batch: int = 512) -> float:
    """NDCG@10 of the held-out items over the full catalog, the input items excluded (-inf if none)."""
    if not len(data.val_target):
        return -np.inf
    net.eval()
    table = net.item_table()
    total = 0.0
    for lo in range(0, len(data.val_target), batch):
        inp = data.val_input[lo:lo + batch]
        s = net.user_repr(torch.from_numpy(_trim(inp + 1))) @ table.T
        rows, cols = np.nonzero(inp >= 0)
        s[torch.from_numpy(rows), torch.from_numpy(inp[rows, cols])] = -torch.inf
        tgt = torch.from_numpy(data.val_target[lo:lo + batch])
        rank = (s > s.gather(1, tgt[:, None])).sum(1)
        total += float(torch.where(rank < 10, 1.0 / torch.log2(rank.double() + 2.0), 0.0).sum())
    return total / len(data.val_target)


def _epoch(net, opt, data: FitData, cfg: TrainConfig, rng: np.random.Generator) -> None:
    net.train()
    rows = np.arange(len(data.train))
    if len(rows) > cfg.max_sequences:
        rows = rng.choice(rows, cfg.max_sequences, replace=False)
    else:
        rows = rng.permutation(rows)
    for lo in range(0, len(rows), cfg.batch_size):
        seqs = data.train[rows[lo:lo + cfg.batch_size]]
        if net.form == "causal":
            inp, tgt = causal_batch(seqs)
        else:
            inp, tgt = cloze_batch(seqs, net.mask_token, cfg.mask_ratio, cfg.ft_ratio, rng)
        if not (tgt > 0).any():
            continue
        loss = _loss(net, inp, tgt, cfg, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def fit_net(net: SeqNet, opt: torch.optim.Optimizer, data: FitData, epochs: int, cfg: TrainConfig,
            rng: np.random.Generator) -> dict:
    """Train up to ``epochs`` epochs with early stopping; returns {epochs, best_epoch, val_ndcg, val_curve}
    (the validation NDCG@10 after each epoch)."""
    seed = int(rng.integers(0, 2**63 - 1))
    best = -np.inf
    kept = _snapshot(net, opt)
    best_epoch, since, ran, curve = 0, 0, 0, []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(1, epochs + 1):
            _epoch(net, opt, data, cfg, rng)
            ran = epoch
            score = validation_ndcg(net, data)
            curve.append(round(float(score), 5) if np.isfinite(score) else None)
            if score > best or not len(data.val_target):
                best, best_epoch, since, kept = score, epoch, 0, _snapshot(net, opt)
            else:
                since += 1
                if since >= cfg.patience:
                    break
    net.load_state_dict(kept[0])
    opt.load_state_dict(kept[1])
    net.eval()
    return {"epochs": ran, "best_epoch": best_epoch, "val_ndcg": float(best) if np.isfinite(best) else None,
            "val_curve": curve}


def _snapshot(net: SeqNet, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    return ({k: v.detach().clone() for k, v in net.state_dict().items()}, copy.deepcopy(opt.state_dict()))
