"""Sequential recommenders inside the loop: ``sasrec`` (E-SASREC) and ``cosrec`` (E-COSATT, GROUNDING §1),
trained with BCE, softmax or DSL (E-DSL, GROUNDING §2); networks in :mod:`.seq_nets`, losses in
:mod:`.seq_losses`, training in :mod:`.seq_train`.

In the loop:

* **Sequences.** Each user's last ``max_len`` consumed items (users x L int32, -1 = padding, most
  recent last) are built once from the view (:meth:`PlatformView.sequences`, the log's organic and
  recommended rows) at the first fit, then updated from every cycle's feedback in :meth:`update`, in
  O(active users x L); the users whose sequence changed are marked for a new representation.
* **Training** on the retrain schedule and its ``retrain.data`` window: each user's last items in the
  training data (LLM-augmented rows included: they are training data), the most recent one held out for
  early stopping. A cold fit runs up to ``initial_epochs`` epochs, a warm fit (``warm_start``) fine-tunes
  up to ``epochs`` epochs from the current weights and Adam state; every epoch sees at most
  ``max_sequences`` sequences, so a fit's time and memory are bounded whatever the run length.
* **Serving** through the engine's fused top-k: :meth:`factors` hands U = the users' representations
  and V = the item table, with one extra column carrying popularity: a user with an empty sequence
  (a newcomer) has U = [0, ..., 0, 1] and is ranked by popularity (log(1 + φ) scaled to [0, 1]); the
  others have 0 there. Representations are recomputed only for users whose sequence changed (all of
  them after a fit), in batches sorted by length and trimmed of padding.
* **A growing catalog**: new items get embedding rows (initialised from (seed, item id)) and, with
  ``item_text``, their text vectors, before they are scored or trained.
* **Determinism**: every draw comes from the fit's generator (numpy, and torch's generator forked and
  seeded from it). torch trains on ``train_threads`` threads (part of the configuration: a trained
  model's last float bits depend on the thread count) and serves within the engine's budget
  (``engine.threads``; serving results do not depend on it). A checkpoint holds the sequences, the
  representations, the weights and Adam's state as arrays, so a resumed run equals an uninterrupted one.

``item_text: true`` embeds each item's title and genres with MiniLM through the run's ``item_text``
service (registered by :mod:`recloop.llm.item_text`, reached by name through the build context, so this
module never imports the LLM layer), projects them to d and adds them to the item embeddings.

torch is imported only when a sequential policy fits or scores.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from recloop import registry
from recloop.limits import MAX_DIM, MAX_ITERATIONS, MAX_SAMPLE, MAX_THREADS
from recloop.registry import Params, register

from .base import Feedback, Policy

__all__ = ["CosRec", "SASRec"]

_REPR_BATCH = 512
AUTO_FULL = 2048  #: ``negatives: auto``: the full softmax up to this many items ...
AUTO_SAMPLED = 512  #: ... and this many sampled negatives above it
_PARALLEL_WORK = 1 << 20  #: tokens x dim of a block worth more than one thread


_POOL: dict = {"pid": None, "size": 0, "pool": None}


def _pool(size: int) -> ThreadPoolExecutor:
    """This module's thread pool for serving batches (recreated after fork or to grow)."""
    if _POOL["pid"] != os.getpid() or _POOL["size"] < size:
        _POOL.update(pid=os.getpid(), size=size,
                     pool=ThreadPoolExecutor(max_workers=size, thread_name_prefix="recloop-seq"))
    return _POOL["pool"]


@contextlib.contextmanager
def torch_threads(n: int):
    """torch on ``n`` intra-op threads inside the block (restored after)."""
    import torch

    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class DSLParams(Params):
    """DSL's placeholder forms (E-DSL [O]): w_j ∝ exp(β_h s_j + β_s cos(i+, j)); τ_ex = τ0·clip(1 + κ·
    mean_top-m(s_j − s+), 0.5, 2), both under stop-gradient, w mean 1 per example, τ_ex batch mean τ0."""

    beta_h: float = Field(0.5, ge=0, description="β_h: weight of a negative's hardness (its score)")
    beta_s: float = Field(0.5, ge=0, description="β_s: weight of its cosine similarity to the target")
    kappa: float = Field(0.5, ge=0, description="κ: how much competition raises the example's temperature")
    m: int = Field(10, ge=1, le=MAX_SAMPLE, description="size of the top-competitor slate")


class _SeqParams(Params):
    max_len: int = Field(200, ge=2, le=4096, description="L: items per sequence")
    blocks: int = Field(2, ge=1, le=64, description="attention blocks")
    heads: int = Field(1, ge=1, le=64, description="attention heads (must divide dim)")
    dim: int = Field(64, ge=2, le=MAX_DIM, description="d: embedding width")
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    loss: Literal["bce", "softmax", "dsl"] = Field("softmax", description="training loss (see seq_losses)")
    negatives: Annotated[int, Field(ge=0, le=MAX_SAMPLE)] | Literal["auto"] = Field(
        "auto", description=f"negatives of softmax/dsl: 0 = the full catalog, N = N uniformly sampled per batch, "
                            f"auto = the full catalog up to {AUTO_FULL} items, else {AUTO_SAMPLED} sampled")
    tau: float = Field(1.0, gt=0, description="τ (τ0 of dsl): softmax temperature")
    dsl: DSLParams = Field(default_factory=DSLParams, description="DSL's branch parameters")
    initial_epochs: int = Field(100, ge=0, le=MAX_ITERATIONS, description="epochs of a cold fit (early stopping)")
    epochs: int = Field(3, ge=0, le=MAX_ITERATIONS, description="epochs of a warm fine-tune (early stopping)")
    patience: int = Field(8, ge=1, le=MAX_ITERATIONS, description="epochs without a better validation NDCG@10")
    lr: float = Field(5e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(128, ge=1, le=MAX_SAMPLE, description="sequences per step")
    max_sequences: int = Field(1024, ge=1, le=MAX_SAMPLE, description="sequences per epoch at most")
    eval_users: int = Field(1000, ge=0, le=MAX_SAMPLE, description="validation users for early stopping at most")
    train_threads: int = Field(1, ge=1, le=MAX_THREADS, description=(
        "torch threads for training: part of the model's configuration, since the last float bits of a "
        "trained model depend on it (serving uses engine.threads: its results do not)"))
    item_text: bool = Field(False, description="add projected MiniLM vectors of title + genres to the items")
    text_embedder: Literal["minilm", "hashing"] = Field("minilm", description="the item_text embedder")

    @model_validator(mode="after")
    def _heads_divide_dim(self):
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        return self


class _SequentialPolicy(Policy):
    """Shared machinery of ``sasrec`` and ``cosrec``."""

    online = True
    attention = "softmax"
    example_params = {"initial_epochs": 2, "epochs": 1, "dim": 8, "max_len": 8, "blocks": 1}

    def __init__(self, params: Params | None = None):
        super().__init__(params)
        self.seqs: np.ndarray | None = None  # users x L int32, -1 = padding
        self.reprs = np.zeros((0, self.params.dim + 1), np.float32)  # U with the popularity column
        self.dirty = np.zeros(0, bool)
        self.net = None
        self.opt = None
        self.text: np.ndarray | None = None
        self.fits: list[dict] = []
        self._items_cache: tuple | None = None

    # -- configuration ------------------------------------------------------------------------------
    @property
    def score_temperature(self) -> float | None:
        """τ when trained with the full softmax loss (its scores are then the model's logits)."""
        p = self.params
        full = self._negatives(self.net.n_items if self.net is not None else 0) == 0
        return float(p.tau) if p.loss == "softmax" and full else None

    def _negatives(self, n_items: int) -> int:
        """Sampled negatives per batch for a catalog of ``n_items`` (0 = the full catalog)."""
        neg = self.params.negatives
        if neg == "auto":
            return 0 if n_items <= AUTO_FULL else AUTO_SAMPLED
        return int(neg)

    @property
    def form(self) -> str:
        return "causal"

    @property
    def kernel(self) -> str:
        return "torch"

    def _config(self):
        from .seq_train import TrainConfig

        p = self.params
        return TrainConfig(p.loss, self._negatives(self.net.n_items), p.tau, p.dsl.model_dump(), p.lr, p.batch_size,
                           p.max_sequences, getattr(p, "mask_ratio", 0.2), getattr(p, "ft_ratio", 0.0), p.patience)

    def _torch(self):
        import torch

        return torch

    def _threads(self, work: int) -> contextlib.AbstractContextManager:
        """torch's threads for inference: the engine's budget when the block is big enough to share
        (inference results do not depend on the thread count; tested), else one."""
        workers = int(getattr(self.engine, "workers", 1))
        return torch_threads(workers if work >= _PARALLEL_WORK else 1)

    # -- the network --------------------------------------------------------------------------------
    def _new_net(self, n_items: int, view) -> None:
        from .seq_nets import new_net
        from .seq_train import new_optimizer

        self._torch()
        p = self.params
        text = self._text_rows(view, 0, n_items) if p.item_text else None
        self.text = text
        self.net = new_net(n_items, int(self.context.seed), dim=p.dim, max_len=p.max_len, blocks=p.blocks,
                           heads=p.heads, dropout=p.dropout, attention=self.attention, form=self.form, text=text)
        self.opt = new_optimizer(self.net, p.lr)
        self._items_cache = None

    def _text_rows(self, view, first: int, count: int) -> np.ndarray:
        ctx = self.context
        svc = ctx.service("item_text", lambda: registry.service_factory("item_text")(ctx))
        return svc.item_vectors(view, first, count, self.params.text_embedder)

    def _grow_items(self, view) -> None:
        """New catalog items get rows (and text vectors); Adam's state follows the grown table."""
        from .seq_train import load_optimizer_state, new_optimizer, optimizer_state

        n = int(view.items.n)
        if self.net is None or n <= self.net.n_items:
            return
        first = self.net.n_items
        text = self._text_rows(view, first, n - first) if self.params.item_text else None
        state = optimizer_state(self.net, self.opt)
        self.net.grow(n - first, text)
        if text is not None:
            self.text = np.concatenate([self.text, text])
        self.opt = new_optimizer(self.net, self.params.lr)
        load_optimizer_state(self.net, self.opt, state)
        self._items_cache = None

    # -- sequences ----------------------------------------------------------------------------------
    def _ensure_users(self, view) -> None:
        cap = max(int(view.users.capacity), int(view.users.n))
        L = self.params.max_len
        if self.seqs is None:
            self.seqs = np.asarray(view.sequences(np.arange(view.users.n), L), np.int32)
        if len(self.seqs) < cap:
            self.seqs = np.concatenate([self.seqs, np.full((cap - len(self.seqs), L), -1, np.int32)])
        if len(self.reprs) < cap:
            extra = np.zeros((cap - len(self.reprs), self.reprs.shape[1]), np.float32)
            self.reprs = np.concatenate([self.reprs, extra])
            self.dirty = np.concatenate([self.dirty, np.ones(cap - len(self.dirty), bool)])

    def update(self, feedback: Feedback, view) -> None:
        """Append every item consumed this cycle to its user's sequence (in the loop's commit order)."""
        self._ensure_users(view)
        if feedback.consumed is not None:
            users, items = (np.asarray(a, np.int64) for a in feedback.consumed)
        else:
            hit = feedback.chosen_item >= 0
            users, items = feedback.users[hit].astype(np.int64), feedback.chosen_item[hit].astype(np.int64)
        if len(users):
            push_items(self.seqs, users, items)
            self.dirty[np.unique(users)] = True

    # -- training -----------------------------------------------------------------------------------
    def fit(self, data, view, *, step: int, rng: np.random.Generator, warm_start: bool) -> None:
        from .seq_train import fit_net, split_for_fit

        self._ensure_users(view)
        p = self.params
        n_items = max(int(view.items.n), int(data.n_items))
        warm = bool(warm_start and self.net is not None)
        if not warm:
            self._new_net(n_items, view)
        self._grow_items(view)
        fit_rng = np.random.default_rng(int(rng.integers(0, 2**63 - 1)))
        fd = split_for_fit(data.users, data.items, p.max_len, p.eval_users, fit_rng)
        epochs = p.epochs if warm else p.initial_epochs
        report = {"step": int(step), "warm": warm, "sequences": int(len(fd.train)), "epochs": 0}
        if len(fd.train) and epochs > 0:
            with torch_threads(p.train_threads):
                report.update(fit_net(self.net, self.opt, fd, epochs, self._config(), fit_rng))
        self.fits = (self.fits + [report])[-20:]
        self.net.eval()
        self.dirty[:] = True
        self._items_cache = None

    # -- serving ------------------------------------------------------------------------------------
    def _item_table(self) -> np.ndarray:
        if self._items_cache is None:
            torch = self._torch()
            with torch.no_grad(), self._threads(self.net.n_items * self.params.dim):
                self._items_cache = (self.net.item_table().numpy().astype(np.float32),)
        return self._items_cache[0]

    def _refresh(self, n_users: int) -> None:
        """New representations for the users whose sequence changed (sorted by length, trimmed)."""
        dirty = np.flatnonzero(self.dirty[:n_users])
        if not len(dirty):
            return
        length = (self.seqs[dirty] >= 0).sum(1)
        empty = dirty[length == 0]
        self.reprs[empty] = 0.0
        self.reprs[empty, -1] = 1.0
        todo = dirty[length > 0][np.argsort(length[length > 0], kind="stable")]
        if len(todo) and self.net is not None:
            self._encode_users(todo)
        elif len(todo):  # never fitted: everyone is served by popularity
            self.reprs[todo] = 0.0
            self.reprs[todo, -1] = 1.0
        self.dirty[dirty] = False

    def _encode_users(self, users: np.ndarray) -> None:
        """Representations of ``users`` (sorted by length) in fixed batches of ``_REPR_BATCH``. With the
        torch kernel the batches run on ``engine.threads`` threads of this module's own pool (one torch
        thread each: robust on a loaded machine; never the engine's pool, whose callbacks may call
        here); a fused kernel runs them in turn with its own threads. A batch's result does not depend
        on which thread ran it."""
        from .seq_train import _trim

        torch = self._torch()
        self.net.eval()
        batches = [users[lo:lo + _REPR_BATCH] for lo in range(0, len(users), _REPR_BATCH)]

        def run(ids: np.ndarray) -> None:
            tok = torch.from_numpy(_trim(self.seqs[ids].astype(np.int64) + 1))
            with torch.no_grad():  # grad mode is per thread
                out = self.net.user_repr(tok, self.kernel)
            self.reprs[ids, :-1] = out.numpy()
            self.reprs[ids, -1] = 0.0

        workers = int(getattr(self.engine, "workers", 1))
        if self.kernel == "torch" and workers > 1 and len(batches) > 1:
            with torch_threads(1):
                for f in [_pool(workers).submit(run, ids) for ids in batches]:
                    f.result()
            return
        for ids in batches:
            with self._threads(len(ids) * self.seqs.shape[1] * self.params.dim):
                run(ids)

    def factors(self, view) -> tuple[np.ndarray, np.ndarray, None]:
        self._ensure_users(view)
        self._grow_items(view)
        n_items = int(view.items.n)
        pop = np.log1p(np.asarray(view.popularity[:n_items], np.float64))
        top = pop.max() if len(pop) else 0.0
        pop_col = (pop / top if top > 0 else pop).astype(np.float32)
        if self.net is None:
            V = np.zeros((n_items, self.params.dim + 1), np.float32)
        else:
            V = np.concatenate([self._item_table()[:n_items], np.zeros((n_items, 1), np.float32)], axis=1)
        V[:, -1] = pop_col
        self._refresh(int(view.users.n))
        return self.reprs, V, None

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        from .seq_train import optimizer_state

        net = None
        if self.net is not None:
            net = {"weights": {k: v.detach().numpy().copy() for k, v in self.net.state_dict().items()},
                   "adam": optimizer_state(self.net, self.opt), "n_items": int(self.net.n_items)}
        return {"seqs": None if self.seqs is None else self.seqs.copy(), "reprs": self.reprs.copy(),
                "dirty": self.dirty.copy(), "net": net, "text": None if self.text is None else self.text.copy(),
                "fits": [dict(f) for f in self.fits]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; ValueError for a state that does not fit this policy's parameters."""
        p = self.params
        missing = {"seqs", "reprs", "dirty", "net", "text", "fits"} - set(state)
        if missing:
            raise ValueError(f"the {type(self).__name__} state lacks {', '.join(sorted(missing))}")
        seqs, reprs = state["seqs"], np.array(state["reprs"], np.float32)
        if seqs is not None and (np.ndim(seqs) != 2 or np.shape(seqs)[1] != p.max_len):
            raise ValueError(f"the sequences have shape {np.shape(seqs)}; this policy needs (users, {p.max_len})")
        if reprs.ndim != 2 or reprs.shape[1] != p.dim + 1:
            raise ValueError(f"the representations have shape {reprs.shape}; this policy needs (users, {p.dim + 1})")
        self.seqs = None if seqs is None else np.array(seqs, np.int32)
        self.reprs, self.dirty = reprs, np.array(state["dirty"], bool)
        self.text = None if state["text"] is None else np.array(state["text"], np.float32)
        self.fits = [dict(f) for f in state["fits"]]
        self.net = self.opt = None
        self._items_cache = None
        if state["net"] is not None:
            self._load_net(state["net"])

    def _load_net(self, saved: dict) -> None:
        from .seq_nets import new_net
        from .seq_train import load_optimizer_state, new_optimizer

        torch = self._torch()
        p = self.params
        n = int(saved["n_items"])
        self.net = new_net(n, int(self.context.seed), dim=p.dim, max_len=p.max_len, blocks=p.blocks, heads=p.heads,
                           dropout=p.dropout, attention=self.attention, form=self.form,
                           text=None if self.text is None else self.text[:n])
        weights = {k: torch.from_numpy(np.array(v)) for k, v in saved["weights"].items()}
        try:
            self.net.load_state_dict(weights)
        except RuntimeError as exc:
            raise ValueError(f"the {type(self).__name__} weights do not fit its parameters: {exc}") from None
        self.net.eval()
        self.opt = new_optimizer(self.net, p.lr)
        load_optimizer_state(self.net, self.opt, saved["adam"])

    def run_report(self) -> dict:
        """The last fits (epochs run, best epoch, validation NDCG@10) for the run's manifest."""
        fits = [{k: v for k, v in f.items() if k != "val_curve"} for f in self.fits[-5:]]
        return {f"{self.registry_name}_fits": fits}


def push_items(seqs: np.ndarray, users: np.ndarray, items: np.ndarray) -> None:
    """Append ``items`` to the rows ``users`` of ``seqs`` in order (each row keeps its last L items)."""
    L = seqs.shape[1]
    order = np.argsort(users, kind="stable")
    users, items = users[order], items[order]
    uniq, start, cnt = np.unique(users, return_index=True, return_counts=True)
    rank = np.arange(len(users)) - np.repeat(start, cnt)
    shift = np.minimum(cnt, L)
    src = np.arange(L)[None, :] + shift[:, None]
    rows = seqs[uniq]
    out = np.where(src < L, np.take_along_axis(rows, np.minimum(src, L - 1), axis=1), -1)
    col = L - np.repeat(cnt, cnt) + rank
    keep = col >= 0
    out[np.repeat(np.arange(len(uniq)), cnt)[keep], col[keep]] = items[keep]
    seqs[uniq] = out


@register("policy", "sasrec")
class SASRec(_SequentialPolicy):
    """E-SASREC: causal softmax self-attention over each user's recent items (Kang & McAuley 2018);
    learned positions, scores against the item embeddings; loss bce, softmax (default) or dsl."""

    class Params(_SeqParams):
        pass


@register("policy", "cosrec")
class CosRec(_SequentialPolicy):
    """E-COSATT: the same network with cosine linear attention (Cottention / Cotten4Rec-style, GROUNDING
    §1): Q, K rows L2-normalised, no softmax, a learnable per-head length normaliser; ``form:
    bidirectional`` (default; cloze training, BERT4Rec-style) or ``causal`` (prefix sums, ours [O])."""

    attention = "cosine"

    class Params(_SeqParams):
        heads: int = Field(2, ge=1, le=64, description="attention heads (must divide dim)")
        form: Literal["bidirectional", "causal"] = Field("bidirectional", description="cloze or next-item")
        mask_ratio: float = Field(0.2, gt=0.0, le=1.0, description="cloze: share of items masked")
        ft_ratio: float = Field(0.5, ge=0.0, le=1.0, description="cloze: share of sequences with only the "
                                                                "last item masked (as served)")
        kernel: Literal["engine", "auto", "torch", "numba", "cuda"] = Field(
            "engine", description="cosine attention kernel when serving (training always uses torch); "
                                  "engine: the one matching engine.backend (Numba on a CPU, CUDA on a GPU)")

    @property
    def form(self) -> str:
        return self.params.form

    @property
    def kernel(self) -> str:
        k = self.params.kernel
        return getattr(self.engine, "backend_name", "auto") if k == "engine" else k
