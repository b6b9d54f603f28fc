"""``recloop llm ...``: tools around the LLM roles (mounted by :mod:`recloop.cli` when importable).

``recloop llm calibrate`` fits the F-SURR surrogate to a real backend on a probe set and writes the
parameters file a scenario points to::

    recloop llm calibrate --out calib.json                       # SmolLM2 (transformers), 200 probes
    recloop llm calibrate --backend openai --base-url http://127.0.0.1:8000 --model smollm2 --out calib.json

    # scenario
    llm:
      backend: {type: surrogate, params_file: calib.json}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from recloop import registry
from recloop.errors import RecloopInputError
from recloop.rng import component_rng
from recloop.sim.config import load_scenario

from .backend_http import OpenAIBackend
from .backend_local import TransformersBackend
from .cache import CachedBackend
from .calibrate import calibrate_backend, write_params
from .calibrate_probe import build_probes

llm_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="LLM tools: calibrate the surrogate against a real model.",
)


def default_calibration_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "recloop" / "llm_calibration"


def _world(world: str, scenario: Path | None, seed: int):

    if scenario is not None:

        cfg = load_scenario(scenario).world
    else:
        cfg = {"type": world}
    gen = registry.build("world", cfg)
    w = gen.build(component_rng(seed, "world"))
    initial = gen.initial_log(w, component_rng(seed, "initial_log"))
    if initial is None:
        raise RecloopInputError(
            "calibration needs a data-set world with real titles and a real log (movielens, "
            "interactions_csv); "
            f"'{getattr(gen, 'registry_name', world)}' is synthetic: an LLM knows none of its titles.",
            key="--world",
        )
    return w, initial


def _backend(
    backend: str,
    model: str | None,
    base_url: str | None,
    batch_size: int,
    threads: int | None,
    timeout_s: float,
):
    if backend == "transformers":

        return TransformersBackend(model=model, batch_size=batch_size, num_threads=threads)
    if backend == "openai":
        if not base_url or not model:
            raise RecloopInputError(
                "--backend openai needs --base-url and --model (the served model's name).", key="--base-url"
            )

        return OpenAIBackend(base_url=base_url, model=model, timeout_s=timeout_s)
    raise RecloopInputError(f"unknown backend '{backend}'. Allowed: transformers, openai.", key="--backend")


@llm_app.command()
def calibrate(
    out: Path = typer.Option(Path("calib.json"), "--out", "-o", help="parameters file to write (JSON)"),
    probes: int = typer.Option(
        200, min=8, help="probe prompts in all (recommend 50 %, profile 25 %, rank 25 %)"
    ),
    backend: str = typer.Option("transformers", help="real backend: transformers (local) or openai (HTTP)"),
    model: str | None = typer.Option(
        None, help="transformers: local model dir or .gguf (default SmolLM2); openai: the model name"
    ),
    base_url: str | None = typer.Option(None, help="openai: server root URL"),
    world: str = typer.Option("movielens", help="data-set world whose users and titles make the probes"),
    scenario: Path | None = typer.Option(None, help="take the world block from this scenario instead"),
    seed: int = typer.Option(0, help="probe sampling and decoding seed"),
    heldout: float = typer.Option(
        0.3, min=0.05, max=0.9, help="share of recommend probes held out for validation"
    ),
    n: int = typer.Option(5, min=1, help="titles asked per recommend probe"),
    candidates: int = typer.Option(20, min=2, help="candidates shown per recommend probe"),
    rank_candidates: int = typer.Option(10, min=2, help="candidates shown (shuffled) per rank probe"),
    replicates: int = typer.Option(5, min=1, help="surrogate answers per held-out probe"),
    cache_dir: Path | None = typer.Option(
        None, help="response cache (default ~/.cache/recloop/llm_calibration)"
    ),
    batch_size: int = typer.Option(8, min=1, help="transformers batch size"),
    threads: int | None = typer.Option(None, min=1, help="torch CPU threads (default: torch's choice)"),
    timeout_s: float = typer.Option(60.0, help="openai: per-request timeout"),
    temperature: float = typer.Option(0.0, min=0.0, help="decoding temperature (0 = greedy)"),
    max_tokens: int | None = typer.Option(
        None, min=1, help="cap on new tokens per answer (default: recommend 96, profile 80, rank 48)"
    ),
    beta_from: str = typer.Option(
        "head_share",
        help="fit beta to the head share (default), to the LPD (the reference's rule), or both "
        "(beta to the head share and tau_s to the LPD)",
    ),
    progress: bool = typer.Option(True, help="show progress"),
) -> None:
    """Fit the surrogate (h, eps_near, beta, rho, h_p) to a real model on a probe set; report the held-out
    check (HallRate within ±0.03, head share within ±0.05, KS on popularity percentiles)."""

    if beta_from not in ("lpd", "head_share", "both"):
        raise RecloopInputError(
            f"--beta-from must be lpd, head_share or both, not '{beta_from}'.", key="--beta-from"
        )

    w, initial = _world(world, scenario, seed)
    ps = build_probes(
        w,
        initial,
        probes=probes,
        seed=seed,
        n=n,
        candidates=candidates,
        rank_candidates=rank_candidates,
        heldout=heldout,
    )
    inner = _backend(backend, model, base_url, batch_size, threads, timeout_s)
    cache = cache_dir or default_calibration_cache()
    cached = CachedBackend(inner, cache)
    typer.echo(
        f"probes: {ps.meta['recommend']} recommend ({ps.meta['heldout']} held out), {ps.meta['profile']} "
        f"profile, {ps.meta['rank']} rank; backend {inner.name} {inner.model_id}; cache {cache}",
        err=True,
    )

    def show(done: int, total: int) -> None:
        if progress:
            a = cached.accounting
            typer.echo(
                f"\r  {done}/{total} probes ({a.calls} model calls, {a.cache_hits} cache hits)",
                err=True,
                nl=done >= total,
            )

    mt = None
    if max_tokens is not None:
        mt = {k: min(v, max_tokens) for k, v in {"recommend": 96, "profile": 80, "rank": 48}.items()}
    report = calibrate_backend(
        cached,
        ps,
        max_tokens=mt,
        temperature=temperature,
        seed=seed,
        replicates=replicates,
        batch=max(batch_size, 8),
        beta_from=beta_from,
        progress=show,
        log=lambda s: typer.echo(s, err=True),
    )
    write_params(report, out)
    h = report["heldout"]
    pr = report["params"]

    def f(x):
        return "nan" if x is None else f"{x:.3f}"

    typer.echo(
        f"surrogate: h={pr['h']:.3f} eps_near={pr['eps_near']:.3f} beta={pr['beta']:.3f} rho={pr['rho']:.3f} "
        f"h_p={pr['h_p']:.2f}\n"
        f"held-out ({h['real']['n_generated']} real titles): HallRate real {f(h['real']['hall_rate'])} "
        f"vs surrogate "
        f"{f(h['surrogate']['hall_rate'])} (diff {f(h['hall_rate_diff'])}, target ±{h['hall_rate_tol']}: "
        f"{'ok' if h['hall_rate_ok'] else 'MISSED'}); head share real {f(h['real']['head_share'])} "
        f"vs surrogate "
        f"{f(h['surrogate']['head_share'])} (diff {f(h['head_share_diff'])}, target ±{h['head_share_tol']}: "
        f"{'ok' if h['head_share_ok'] else 'MISSED'}); KS popularity percentiles D={f(h['ks_stat'])} "
        f"p={f(h['ks_p'])}\n"
        f"model calls {report['accounting']['calls']}, cache hits {report['accounting']['cache_hits']}, "
        f"probe wall {report['probe_wall_s']:.1f} s\n"
        f"wrote {out} (scenario: llm: {{backend: {{type: surrogate, params_file: {out}}}}})"
    )


@llm_app.command()
def show(
    params_file: Path = typer.Argument(..., help="a calibration JSON written by `recloop llm calibrate`"),
) -> None:
    """Print the surrogate parameters and the held-out report of a calibration file."""
    try:
        data = json.loads(params_file.read_text())
    except FileNotFoundError:
        raise RecloopInputError("file not found.", file=str(params_file)) from None
    except json.JSONDecodeError as exc:
        raise RecloopInputError(f"not JSON ({exc}).", file=str(params_file)) from None
    typer.echo(json.dumps({k: data.get(k) for k in ("params", "backend", "measured", "heldout")}, indent=2))
