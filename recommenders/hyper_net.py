"""The hypernetwork h_ψ of :mod:`.hyperbandit` (E-HYPER): an MLP from time features to Θ(τ), refit with
the ListNet listwise loss (GROUNDING §5). torch is imported here, only when a hyperbandit is built."""

from __future__ import annotations

import contextlib

import numpy as np

__all__ = ["HyperNet", "polar_time"]


def polar_time(step) -> np.ndarray:
    """The "polar" time embedding of a cycle (one cycle = one day, weekday = step mod 7):
    [sin(2πw/7 + 0.1π), cos(2πw/7 + 0.1π)]; ``step`` may be an array."""
    a = 2.0 * np.pi * (np.asarray(step) % 7) / 7.0 + 0.1 * np.pi
    return np.stack([np.sin(a), np.cos(a)], axis=-1)


@contextlib.contextmanager
def _one_thread(torch):
    """torch on one thread while h_ψ trains: results do not depend on the thread budget."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class HyperNet:
    """h_ψ: time features (2) → Θ ∈ R^{(d + d_l) × d_u} (d item features, d_l latent, d_u user features).
    Starts at Θ = [I 0; 0 0] (content filtering) with a small random perturbation, seeded from the run
    seed; Adam keeps its state across refits."""

    def __init__(self, d: int, latent: int, d_user: int, hidden: list[int], lr: float, seed: int):
        import torch

        self.torch = torch
        self.d, self.dl, self.du = int(d), int(latent), int(d_user)
        widths = [2, *hidden, (self.d + self.dl) * self.du]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) % (2**63))
            layers: list = []
            for a, b in zip(widths[:-1], widths[1:]):
                layers += [torch.nn.Linear(a, b, dtype=torch.float64), torch.nn.ReLU()]
            self.mlp = torch.nn.Sequential(*layers[:-1])
            last = self.mlp[-1]
            with torch.no_grad():
                last.weight.mul_(0.01)
                start = np.eye(self.d + self.dl, self.du)
                start[self.d:] = 0.0
                start = start.ravel()
                last.bias.copy_(torch.from_numpy(start))
        self.opt = torch.optim.Adam(self.mlp.parameters(), lr=lr)

    def theta(self, time_features: np.ndarray) -> np.ndarray:
        """Θ(τ) for one time (float64, (d + d_l) × d)."""
        torch = self.torch
        with torch.no_grad(), _one_thread(torch):
            out = self.mlp(torch.from_numpy(np.asarray(time_features, np.float64)[None]))
        return out.numpy().reshape(self.d + self.dl, self.du)

    def _batch_loss(self, idx, time, prof, slate, target, Xt):
        """ListNet loss of events ``idx``: −Σ softmax(y)·log softmax(ŝ), ŝ_j = x_jᵀΘ_O(τ)u, per event."""
        torch = self.torch
        i = torch.from_numpy(np.asarray(idx))
        theta = self.mlp(time[i]).reshape(len(idx), self.d + self.dl, self.du)[:, : self.d]
        a = torch.einsum("nde,ne->nd", theta, prof[i])
        s = torch.einsum("nkd,nd->nk", Xt[slate[i].clamp(min=0)], a)
        return -(target[i] * torch.log_softmax(s, dim=1)).sum() / len(idx)

    def refit(self, events, X: np.ndarray, epochs: int, batch: int, rng: np.random.Generator,
              holdout: float = 0.2) -> float:
        """ListNet on the events (the clicked item labelled 3), with early stopping at patience 1 as in the
        code: the most recent ``holdout`` share of the window is held out, and the weights of the epoch with
        the lowest held-out loss are kept (the weights before the refit when no epoch improves on them).
        Returns the kept held-out loss."""
        torch = self.torch
        Xt = torch.from_numpy(np.asarray(X, np.float64))
        time = torch.from_numpy(polar_time(events.day))
        prof = torch.from_numpy(np.asarray(events.profile, np.float64))
        slate = torch.from_numpy(np.asarray(events.slate, np.int64))
        labels = torch.zeros(slate.shape, dtype=torch.float64)
        labels[torch.arange(len(events)), torch.from_numpy(events.pos)] = 3.0
        target = torch.softmax(labels, dim=1)
        n_val = int(len(events) * holdout) if len(events) >= 10 else 0
        train, val = np.arange(len(events) - n_val), np.arange(len(events) - n_val, len(events))
        data = (time, prof, slate, target, Xt)
        with _one_thread(torch):
            best = self._held_out(val, data)
            kept = {k: v.clone() for k, v in self.mlp.state_dict().items()}
            for _ in range(epochs):
                for idx in np.array_split(rng.permutation(train), max(1, -(-len(train) // batch))):
                    loss = self._batch_loss(idx, *data)
                    self.opt.zero_grad()
                    loss.backward()
                    self.opt.step()
                now = self._held_out(val, data)
                if now >= best:
                    break  # patience 1
                best, kept = now, {k: v.clone() for k, v in self.mlp.state_dict().items()}
            self.mlp.load_state_dict(kept)
        return best

    def _held_out(self, val: np.ndarray, data) -> float:
        if not len(val):
            return float("inf")
        with self.torch.no_grad():
            return float(self._batch_loss(val, *data))

    def state_dict(self) -> dict:
        """Weights and Adam's moments as arrays (the safe checkpoint format)."""
        weights = {k: v.detach().numpy().copy() for k, v in self.mlp.state_dict().items()}
        opt = self.opt.state_dict()
        moments = {str(i): {k: (v.detach().numpy().copy() if hasattr(v, "numpy") else v) for k, v in s.items()}
                   for i, s in opt["state"].items()}
        return {"weights": weights, "adam": moments}

    def load_state_dict(self, state: dict) -> None:
        torch = self.torch
        self.mlp.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state["weights"].items()})
        opt = self.opt.state_dict()
        opt["state"] = {int(i): {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else
                                 torch.tensor(float(v)) for k, v in s.items()} for i, s in state["adam"].items()}
        self.opt.load_state_dict(opt)
