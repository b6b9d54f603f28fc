"""Issue 9's speed targets for cosine linear attention (E-COSATT) on CPU (a benchmark, not a timed test).

    python bench/bench_seq_attention.py              # about 2-4 minutes on 2 loaded cores
    python bench/bench_seq_attention.py --repeats 5  # quicker, noisier

Three parts, on CPU, float32, at ``--threads`` torch/Numba threads (default 2, then 1: on a shared
2-core machine, 2 threads make every op with an OpenMP barrier wait for a core, so the 1-thread run is
the steadier comparison; the first thread count decides the targets):

* train: forward + backward time at L=200, d=64 (2 heads of 32), batch 128 (a quarter of the rows
  left-padded), of cosine attention against softmax attention (``scaled_dot_product_attention``,
  causal and not). Cosine in two implementations: the torch form (``cos_attention``: chunked causal,
  chunk 64; bidirectional ``Q(K^T V)``) and the fused Numba forward + backward
  (``cos_attention_fused``, the training path of ``CosineAttention(kernel="numba"|"auto")`` on CPU).
  Target: cosine causal at least 2x faster than softmax causal.
* memory: peak bytes that torch allocates during forward + backward (allocations minus frees from
  ``torch.profiler``'s memory events, plus the peak of NumPy allocations by tracemalloc, where the
  fused form's arrays live; the inputs already exist, their gradients count), for
  L = 50..800 at batch 16, for cosine, SDPA (causal; on CPU it picks a flash kernel, which keeps no
  L x L matrix) and explicit softmax attention (the L x L "math" form). "Linear in L" is judged by the
  log-log slope of peak bytes against L over L = 100..800 (1 = linear, 2 = quadratic; below one chunk,
  L < 64, the causal torch form is a single quadratic chunk). It also times forward + backward against L
  (one thread).
* inference: the fused Numba kernel against torch's inference (``torch.inference_mode``) of the same
  op, both forms. Target: Numba at least as fast.

The machine is shared, so every timing is a median over ``--repeats`` rounds, each round timing every
contender once back to back; speed-ups are medians of the per-round ratios (measured in the same
round). Results: ``bench/results/seq_attention.json`` and a printed table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import time
import tracemalloc
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F

from recloop.recommenders.cos_attention import cos_attention
from recloop.recommenders.cos_kernels import cos_attention_numba
from recloop.recommenders.cos_kernels_grad import cos_attention_fused

OUT = Path(__file__).resolve().parent / "results" / "seq_attention.json"
B, HEADS, L, DIM, CHUNK = 128, 2, 200, 64, 64
MEM_B, MEM_LS = 16, (50, 100, 200, 400, 800)
MEM_NAMES = ("cos_causal", "cos_bidir", "cos_causal_fused", "cos_bidir_fused", "sdpa_causal", "softmax_math_causal")


def _inputs(b: int, length: int, grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dh = DIM // HEADS
    q, k, v = (torch.randn(b, HEADS, length, dh, generator=g).requires_grad_(grad) for _ in range(3))
    m = torch.full((HEADS,), 0.5, requires_grad=grad)
    valid = torch.ones(b, length, dtype=torch.bool)
    valid[: b // 4, : length // 4] = False  # a quarter of the rows left-padded, as short user histories
    return q, k, v, m, valid


def _softmax_math(q, k, v, causal: bool):
    """Softmax attention with the L x L matrix materialised (the textbook form)."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


def _contenders(q, k, v, m, valid):
    """name -> forward closure (all differentiable)."""
    return {
        "cos_causal": lambda: cos_attention(q, k, v, m, valid, True, CHUNK),
        "cos_bidir": lambda: cos_attention(q, k, v, m, valid, False),
        "cos_causal_fused": lambda: cos_attention_fused(q, k, v, m, valid, True),
        "cos_bidir_fused": lambda: cos_attention_fused(q, k, v, m, valid, False),
        "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa_bidir": lambda: F.scaled_dot_product_attention(q, k, v),
        "softmax_math_causal": lambda: _softmax_math(q, k, v, True),
    }


def _fwd_bwd(f, leaves) -> float:
    for t in leaves:
        t.grad = None
    t0 = time.perf_counter()
    f().sum().backward()
    return time.perf_counter() - t0


def _rounds(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Time every contender once per round (rotating the order), after one warm-up call each."""
    for f in fns.values():
        f()
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            out[n].append(fns[n]())
    return out


def _ratio(times: dict, slow: str, fast: str) -> float:
    return float(np.median(np.array(times[slow]) / np.array(times[fast])))


def bench_train(repeats: int) -> dict:
    q, k, v, m, valid = _inputs(B, L, grad=True)
    leaves = (q, k, v, m)
    fns = {n: (lambda f=f: _fwd_bwd(f, leaves)) for n, f in _contenders(q, k, v, m, valid).items()}
    t = _rounds(fns, repeats)
    return {
        "config": {"batch": B, "L": L, "d": DIM, "heads": HEADS, "chunk": CHUNK},
        "median_ms": {n: 1e3 * float(np.median(x)) for n, x in t.items()},
        "speedup": {
            "cos_causal_fused_vs_sdpa_causal": _ratio(t, "sdpa_causal", "cos_causal_fused"),
            "cos_bidir_fused_vs_sdpa_bidir": _ratio(t, "sdpa_bidir", "cos_bidir_fused"),
            "cos_causal_vs_sdpa_causal": _ratio(t, "sdpa_causal", "cos_causal"),
            "cos_bidir_vs_sdpa_bidir": _ratio(t, "sdpa_bidir", "cos_bidir"),
            "cos_causal_vs_softmax_math_causal": _ratio(t, "softmax_math_causal", "cos_causal"),
        },
    }


def peak_bytes(f, leaves) -> int:
    """Peak bytes during f().sum().backward(): torch's CPU allocations minus frees (the profiler's memory
    events) plus the peak of NumPy allocations (tracemalloc; the fused form's arrays). Summing two peaks
    is an upper bound."""
    from torch.profiler import ProfilerActivity, profile

    for t in leaves:
        t.grad = None
    tracemalloc.start()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        f().sum().backward()
    np_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak + np_peak)


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _slope(xs, ys) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def bench_memory(repeats: int) -> dict:
    peak: dict[str, list[int]] = {n: [] for n in MEM_NAMES}
    ms: dict[str, list[float]] = {"cos_causal": [], "cos_causal_fused": [], "sdpa_causal": []}
    for length in (MEM_LS[0], *MEM_LS):  # the first pass warms up (imports, Numba compilation)
        q, k, v, m, valid = _inputs(MEM_B, length, grad=True)
        fns, leaves = _contenders(q, k, v, m, valid), (q, k, v, m)
        for n in MEM_NAMES:
            peak[n].append(peak_bytes(fns[n], leaves))
        with _threads(1):  # time against L on one thread: steadier on a shared machine
            t = _rounds({n: (lambda f=fns[n], lv=leaves: _fwd_bwd(f, lv)) for n in ms}, max(5, repeats // 3))
        for n in ms:
            ms[n].append(1e3 * float(np.median(t[n])))
    peak = {n: v[1:] for n, v in peak.items()}
    ms = {n: v[1:] for n, v in ms.items()}
    return {
        "batch": MEM_B, "L": list(MEM_LS),
        "what": "peak torch CPU bytes allocated minus freed during forward+backward (torch.profiler memory "
                "events) plus peak NumPy bytes (tracemalloc), inputs excluded, their gradients included",
        "peak_mib": {n: [p / 2**20 for p in v] for n, v in peak.items()},
        "loglog_slope": {n: _slope(MEM_LS[1:], v[1:]) for n, v in peak.items()},
        "loglog_slope_over": f"L = {MEM_LS[1]}..{MEM_LS[-1]} (L >= chunk {CHUNK}: below one chunk the causal "
                             "torch form is a single L x L chunk)",
        "fwd_bwd_ms_1_thread": ms,
    }


def bench_inference(repeats: int) -> dict:
    q, k, v, m, valid = _inputs(B, L, grad=False)
    arrs = [t.numpy() for t in (q, k, v, m)] + [valid.numpy()]

    def torch_fn(causal):
        def run():
            t0 = time.perf_counter()
            with torch.inference_mode():
                cos_attention(q, k, v, m, valid, causal, CHUNK)
            return time.perf_counter() - t0
        return run

    def numba_fn(causal):
        def run():
            t0 = time.perf_counter()
            cos_attention_numba(*arrs, causal)
            return time.perf_counter() - t0
        return run

    t = _rounds({"torch_causal": torch_fn(True), "numba_causal": numba_fn(True),
                 "torch_bidir": torch_fn(False), "numba_bidir": numba_fn(False)}, repeats)
    with torch.inference_mode():
        err = max(float(np.abs(cos_attention_numba(*arrs, c) - cos_attention(q, k, v, m, valid, c).numpy()).max())
                  for c in (True, False))
    return {
        "median_ms": {n: 1e3 * float(np.median(x)) for n, x in t.items()},
        "speedup": {"numba_vs_torch_causal": _ratio(t, "torch_causal", "numba_causal"),
                    "numba_vs_torch_bidir": _ratio(t, "torch_bidir", "numba_bidir")},
        "max_abs_diff": err,
    }


def _table(res: dict) -> str:
    mem = res["memory"]
    lines = []
    for th, run in res["runs"].items():
        tr, inf = run["train"], run["inference"]
        lines.append(f"[{th} thread(s)] forward+backward, B={B} L={L} d={DIM} heads={HEADS} (median ms)")
        lines += [f"  {n:<22}{v:9.1f}" for n, v in tr["median_ms"].items()]
        lines += [f"  speed-up {n:<36}{v:6.2f}x" for n, v in tr["speedup"].items()]
        lines.append(f"[{th} thread(s)] inference, B={B} L={L} (median ms)")
        lines += [f"  {n:<22}{v:9.1f}" for n, v in inf["median_ms"].items()]
        lines += [f"  speed-up {n:<36}{v:6.2f}x" for n, v in inf["speedup"].items()]
    lines.append(f"peak MiB during forward+backward, B={MEM_B}; L = {mem['L']}")
    lines += [f"  {n:<22}" + " ".join(f"{x:8.1f}" for x in v) + f"   log-log slope {mem['loglog_slope'][n]:.2f}"
              for n, v in mem["peak_mib"].items()]
    lines += [f"  ms(1 thr) {n:<17}" + " ".join(f"{x:8.1f}" for x in v) for n, v in mem["fwd_bwd_ms_1_thread"].items()]
    lines.append("targets: " + ", ".join(f"{n}={'met' if ok else 'NOT met'}" for n, ok in res["targets"].items()))
    return "\n".join(lines)


def _targets(res: dict) -> dict[str, bool]:
    main = res["runs"][str(res["machine"]["threads"][0])]
    return {
        "cos_fwd_bwd_2x_softmax (fused training path)":
            main["train"]["speedup"]["cos_causal_fused_vs_sdpa_causal"] >= 2.0,
        "cos_fwd_bwd_2x_softmax (torch chunked form)": main["train"]["speedup"]["cos_causal_vs_sdpa_causal"] >= 2.0,
        "cos_memory_linear": max(res["memory"]["loglog_slope"][n] for n in MEM_NAMES if n.startswith("cos")) < 1.15,
        "numba_at_least_torch": min(main["inference"]["speedup"].values()) >= 1.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1],
                    help="thread counts to time (torch and Numba); the first one decides the targets")
    args = ap.parse_args()
    res: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                             "numba": numba.__version__, "threads": args.threads, "repeats": args.repeats},
                 "runs": {}}
    for th in args.threads:
        torch.set_num_threads(th)
        numba.set_num_threads(min(th, numba.config.NUMBA_NUM_THREADS))
        res["runs"][str(th)] = {"train": bench_train(args.repeats), "inference": bench_inference(args.repeats)}
    torch.set_num_threads(args.threads[0])
    res["memory"] = bench_memory(args.repeats)
    res["targets"] = _targets(res)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2))
    print(_table(res))
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
