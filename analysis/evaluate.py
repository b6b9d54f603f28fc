"""Offline next-item evaluation of a scenario's policies (``recloop evaluate``): is a policy competitive
before it goes into a loop?

**Data.** The world's logged positives with timestamps (:meth:`timeline` of a data-set world: the
MovieLens-100K positives, ratings >= ``min_rating``; an ``interactions_csv`` world with ``timestamp_col``),
each (user, item) once at its first time, restricted to the world's kept users and items. Every positive
is used, whatever ``initial_fraction`` says. Synthetic worlds have no log and exit 2.

**Split** (leave-last-two-out). Per user, positives ordered by (timestamp, item id): the last is the test
item, the one before the validation item, the rest is training data. Users with fewer than 3 positives
are not evaluated; their positives stay in the training data (the platform logged them).

**Training** through each policy's normal ``fit(TrainingData, PlatformView, ...)``: the training rows form
the view's log as the loop's initial log does (provenance organic, step -1), in time order (timestamp,
then user, then item), so ``view.sequences()`` gives each user's items in time order; the history and
popularity are those of the same rows. Nothing else is handed over: no preferences, no held-out items.
The policy is built and bound as the loop does (same build context, engine and fit RNG, ``fit`` with
``step=0, warm_start=False``). Stages' ``produce`` (LLM augmentation) is not run.

**Ranking**: the full catalog through the policy's ``recommend`` (the engine's fused top-k), the user's
other items excluded as the loop excludes consumed items (its view's history).

**Tuning** (the same budget for every policy): up to ``trials`` candidate configurations per policy, the
scenario's own first, then the overrides in :data:`TUNING` for its type (fewer when its type declares
fewer, e.g. one for ``popularity``). Each candidate is fitted on the training rows and scored on the
validation items (NDCG@10); the best (ties: the earlier) is refitted on training + validation rows, and
the test items are ranked with training and validation items excluded. Tuning runs on the first seed only;
the other seeds refit its choice (so their spread is the chosen configuration's seed variance). ``train_s``
is the final fit's wall time; ``tune_s`` (first seed) the candidates' fits and rankings; ``val_ndcg@10``
(first seed) the chosen candidate's score. Policies declaring ``uses_ground_truth`` (``ideal``, which sees
the answer) are skipped.

**Seeds**: ``seeds`` runs use the scenario seed + 0, 1, ..., N-1 (the seeds of ``replicates``); the seed
drives the policies' randomness (the split is deterministic).
Metric definitions: :mod:`recloop.analysis.offline_metrics`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recloop import registry
from recloop.analysis.offline_metrics import per_user_gain, ranking_metrics, target_ranks
from recloop.contracts import PROVENANCE, BuildContext, PlatformView, WorldShape
from recloop.errors import RecloopInputError
from recloop.limits import MAX_SEED
from recloop.rng import component_rng
from recloop.sim.config import load_scenario
from recloop.sim.engine import ScoringEngine
from recloop.sim.log import InteractionLog
from recloop.sim.state import History

K = 10
METRICS = ("hr@10", "ndcg@10", "mrr@10", "coverage@10", "train_s", "tune_s", "val_ndcg@10")

#: per policy type, the candidate overrides tried after the scenario's own configuration (in order; one more
#: than the default budget needs, so a scenario whose configuration equals an override still gets 3)
TUNING: dict[str, tuple[dict[str, Any], ...]] = {
    "als": ({"factors": 64, "regularization": 1.0, "alpha": 1.0}, {"factors": 64, "regularization": 10.0},
            {"factors": 128, "regularization": 10.0}, {"factors": 32, "regularization": 1.0, "alpha": 1.0}),
    "bpr": ({"factors": 64, "iterations": 150}, {"iterations": 150}, {"factors": 64, "iterations": 300},
            {"factors": 64, "iterations": 150, "learning_rate": 0.1}),
    "relmf": ({"iterations": 30}, {"factors": 64}, {"factors": 64, "iterations": 30}),
    "item_knn": ({"neighbors": 20}, {"neighbors": 200}, {"neighbors": 100}),
    "sasrec": ({"dropout": 0.5}, {"dropout": 0.2}, {"dim": 128}, {"blocks": 1}),
    "cosrec": ({"dropout": 0.5}, {"dropout": 0.2}, {"dim": 128}, {"blocks": 1}),
}


# ------------------------------------------------------------------------------------------ the data
def world_timeline(scenario, file: str | None = None):
    """(generator, (users, items, timestamps)) of the scenario world's logged positives, or exit 2."""
    generator = registry.build("world", scenario.world)
    has = getattr(generator, "has_timestamps", None)
    if not callable(has) or not has():
        kind = scenario.world.type
        raise RecloopInputError(
            f"`recloop evaluate` needs logged interactions with timestamps, and the '{kind}' world has none "
            "(a synthetic world has no log; an interactions_csv world needs timestamp_col). Use a data-set "
            "world such as `world: {type: movielens}` (MovieLens-100K, positives = ratings >= min_rating), "
            "or `type: interactions_csv` with `timestamp_col` naming the column of times.",
            file=file, key="world.type")
    return generator, generator.timeline("positives")


@dataclass
class Split:
    """Leave-last-two-out: training rows in time order, and per evaluated user its validation and test item."""

    train_users: np.ndarray
    train_items: np.ndarray
    train_ts: np.ndarray
    users: np.ndarray  # evaluated users, ascending
    valid: np.ndarray  # their validation items
    valid_ts: np.ndarray
    test: np.ndarray  # their test items
    n_dropped: int  # users with 1 or 2 positives (not evaluated)

    def with_valid(self) -> tuple[np.ndarray, np.ndarray]:
        """(users, items) of training + validation rows, in time order (timestamp, user, item)."""
        u = np.concatenate([self.train_users, self.users])
        i = np.concatenate([self.train_items, self.valid])
        order = np.lexsort((i, u, np.concatenate([self.train_ts, self.valid_ts])))
        return u[order], i[order]


def leave_last_two(users, items, ts, n_users: int, min_positives: int = 3) -> Split:
    """Per user, positives ordered by (timestamp, item id): test = last, validation = the one before."""
    users, items, ts = (np.asarray(a) for a in (users, items, ts))
    order = np.lexsort((items, ts, users))
    u, i, t = users[order].astype(np.int64), items[order].astype(np.int64), ts[order].astype(np.float64)
    counts = np.bincount(u, minlength=n_users)
    ends = np.cumsum(counts)
    kept = np.flatnonzero(counts >= min_positives)
    test_pos = ends[kept] - 1
    held = np.zeros(len(u), bool)
    held[test_pos] = held[test_pos - 1] = True
    tu, ti, tt = u[~held], i[~held], t[~held]
    time_order = np.lexsort((ti, tu, tt))
    return Split(tu[time_order], ti[time_order], tt[time_order], kept, i[test_pos - 1], t[test_pos - 1],
                 i[test_pos], int(((counts > 0) & (counts < min_positives)).sum()))


class OfflineState:
    """The loop's state as a policy's :class:`PlatformView` reads it (``world``, ``history``, ``log``,
    ``popularity``, ``t``), holding the given rows as the loop holds its initial log."""

    def __init__(self, world, users: np.ndarray, items: np.ndarray):
        self.world = world
        self.t = 0
        self.history = History(world.users.n)
        self.history.add(users, items)
        self.log = InteractionLog("all")
        self.log.add(-1, users, items, PROVENANCE["organic"], initial=True)
        self.popularity = np.bincount(items, minlength=world.items.n).astype(np.float64)  # pairs are distinct


# --------------------------------------------------------------------------------- fit and rank
def _walk(component):
    yield component
    for c in component.children():
        yield from _walk(c)


def sees_answer(cfg) -> bool:
    """Whether the policy (or any of its stages) declares ``uses_ground_truth``."""
    return any(c.uses_ground_truth for c in _walk(registry.build("policy", cfg)))


@dataclass
class Setting:
    """What every fit of one seed shares: scenario, world, generator, engine and seed."""

    scenario: Any
    generator: Any
    world: Any
    engine: ScoringEngine
    seed: int


def fit_policy(s: Setting, name: str, cfg: dict, state: OfflineState):
    """Build, bind and fit a policy on ``state`` as the loop does; returns (policy, its view, seconds)."""
    w = s.world
    shape = WorldShape(w.users.n, w.items.n, w.items.dim, w.items.genres.shape[1])
    ctx = BuildContext(s.seed, name, s.engine, shape, None, s.scenario,
                       view=PlatformView(state, ground_truth=True, who="the simulator"), generator=s.generator)
    policy = registry.build("policy", cfg)
    view = PlatformView(state, ground_truth=policy.uses_ground_truth, who=f"policy '{name}'")
    policy.bind(ctx.with_view(view))
    data = state.log.training_data(w.users.n, w.items.n)
    t0 = time.perf_counter()
    policy.fit(data, view, step=0, rng=component_rng(s.seed, "fit", 0), warm_start=False)
    return policy, view, time.perf_counter() - t0


def top_k(policy, view: PlatformView, users: np.ndarray, engine: ScoringEngine, k: int = K) -> np.ndarray:
    """Top-k over the full catalog through the policy's normal path, the view's history excluded."""
    slates, _ = policy.recommend(users, k, view, exclude=view.history, step=0, engine=engine)
    return np.asarray(slates)


def candidates(cfg, trials: int) -> list[dict]:
    """The scenario's configuration, then :data:`TUNING`'s overrides for its type: at most ``trials``
    distinct valid configurations."""
    base = cfg.model_dump() if hasattr(cfg, "model_dump") else dict(cfg)
    out = [base]
    for over in TUNING.get(base["type"], ()):
        if len(out) >= trials:
            break
        c = {**base, **over}
        if c in out:
            continue
        try:
            registry.build("policy", c)
        except (RecloopInputError, ValueError):  # a key this policy does not declare, or out of bounds
            continue
        out.append(c)
    return out


@dataclass
class PolicyResult:
    metrics: dict[str, float]
    ranks: np.ndarray  # 0-based rank of each evaluated user's test item in its top 10, -1 = miss
    chosen: dict
    tried: list[tuple[dict, float]]


def tune(s: Setting, name: str, cfg, split: Split, trials: int) -> list[tuple[dict, float]]:
    """Each candidate fitted on the training rows and its validation NDCG@10 (training items excluded)."""
    train = OfflineState(s.world, split.train_users, split.train_items)
    tried = []
    for c in candidates(cfg, trials):
        policy, view, _ = fit_policy(s, name, c, train)
        slates = top_k(policy, view, split.users, s.engine)
        tried.append((c, float(per_user_gain(target_ranks(slates, split.valid), "ndcg").mean())))
    return tried


def evaluate_policy(s: Setting, name: str, cfg, split: Split, trials: int, chosen: dict | None = None
                    ) -> PolicyResult:
    """Tune on the validation items (unless ``chosen`` is given), refit the best on training + validation,
    score the test items."""
    t0 = time.perf_counter()
    tried = tune(s, name, cfg, split, trials) if chosen is None else []
    best, val = max(tried, key=lambda cv: cv[1]) if tried else (chosen, None)  # max keeps the first of equals
    tune_s = time.perf_counter() - t0
    full = OfflineState(s.world, *split.with_valid())
    policy, view, train_s = fit_policy(s, name, best, full)
    slates = top_k(policy, view, split.users, s.engine)
    metrics = ranking_metrics(slates, split.test, s.world.items.n, K)
    metrics["train_s"] = train_s
    if tried:
        metrics.update({"tune_s": tune_s, "val_ndcg@10": val})
    return PolicyResult(metrics, target_ranks(slates, split.test), best, tried)


# ------------------------------------------------------------------------------------ the protocol
@dataclass
class Evaluation:
    """Everything ``recloop evaluate`` reports: long rows, per-user test ranks, the tuning record."""

    rows: list[tuple[str, int, str, float]] = field(default_factory=list)
    ranks: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    tuning: dict[str, dict[int, dict]] = field(default_factory=dict)
    users: np.ndarray | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def frame(self) -> pl.DataFrame:
        cols = list(zip(*self.rows)) if self.rows else [[], [], [], []]
        return pl.DataFrame({"policy": list(cols[0]), "seed": list(cols[1]), "metric": list(cols[2]),
                             "value": list(cols[3])},
                            schema={"policy": pl.Utf8, "seed": pl.Int64, "metric": pl.Utf8, "value": pl.Float64})

    def ranks_frame(self) -> pl.DataFrame:
        parts = [pl.DataFrame({"policy": p, "seed": s, "user": self.users, "rank": r},
                              schema={"policy": pl.Utf8, "seed": pl.Int64, "user": pl.Int64, "rank": pl.Int64})
                 for (p, s), r in self.ranks.items()]
        return pl.concat(parts) if parts else pl.DataFrame()


def resolve_seeds(scenario, seeds: int | None, file: str | None = None) -> list[int]:
    """The scenario seed + 0..N-1 (N = ``seeds``, default the scenario's ``replicates``)."""
    n = scenario.replicates if seeds is None else int(seeds)
    if n < 1 or scenario.seed + n - 1 > MAX_SEED:
        raise RecloopInputError(f"--seeds must be at least 1 and keep seed + N - 1 <= {MAX_SEED} (scenario seed "
                                f"{scenario.seed}); got {n}.", file=file, key="--seeds")
    return [scenario.seed + r for r in range(n)]


def evaluate_scenario(scenario, seeds: int | None = None, trials: int = 3,
                      log: Callable[[str], None] | None = None) -> Evaluation:
    """Run the protocol of this module on a scenario (a path, a shipped name or a loaded Scenario)."""
    file = None
    if isinstance(scenario, (str, Path)):
        file = str(scenario)
        scenario = load_scenario(scenario)
    say = log or (lambda _msg: None)
    seed_list = resolve_seeds(scenario, seeds, file)
    generator, (users, items, ts) = world_timeline(scenario, file)
    ev = Evaluation()
    todo = {}
    for name, cfg in scenario.policy_configs().items():
        if sees_answer(cfg):
            ev.skipped[name] = "uses ground truth (it sees the answer)"
        else:
            todo[name] = cfg
    if not todo:
        raise RecloopInputError("every policy of the scenario uses ground truth (ideal sees the answer): nothing to "
                                "evaluate; add a policy under 'policies'.", file=file, key="policies")
    eng = scenario.engine
    engine = ScoringEngine(eng.backend, chunk_rows=eng.chunk_rows, chunk_mib=eng.chunk_mib, workers=eng.threads)
    for seed in seed_list:
        world = generator.build(component_rng(seed, "world"))
        split = leave_last_two(users, items, ts, world.users.n)
        if ev.users is None:
            ev.users = split.users
            ev.info = {"users_evaluated": int(len(split.users)), "users_dropped": split.n_dropped,
                       "n_items": int(world.items.n), "train_rows": int(len(split.train_users)),
                       "positives": int(len(users)), "seeds": seed_list, "trials": trials, "k": K}
            say(f"{len(split.users)} users evaluated, {split.n_dropped} dropped (fewer than 3 positives); "
                f"{world.items.n} items; {len(split.train_users)} training rows")
        if not len(split.users):
            raise RecloopInputError("no user has 3 or more positives with timestamps: nothing to evaluate.",
                                    file=file, key="world")
        setting = Setting(scenario, generator, world, engine, seed)
        for name, cfg in todo.items():
            first = ev.tuning.get(name, {}).get(seed_list[0])
            res = evaluate_policy(setting, name, cfg, split, trials, None if first is None else first["chosen"])
            ev.rows.extend((name, seed, m, float(v)) for m, v in res.metrics.items())
            ev.ranks[(name, seed)] = res.ranks
            ev.tuning.setdefault(name, {})[seed] = {
                "chosen": res.chosen, "tried": [{"config": c, "val_ndcg@10": v} for c, v in res.tried]}
            how = f"{len(res.tried)} config(s) tried" if res.tried else f"configuration of seed {seed_list[0]}"
            say(f"{name} seed {seed}: ndcg@10 {res.metrics['ndcg@10']:.4f}, hr@10 {res.metrics['hr@10']:.4f} "
                f"({how}, fit {res.metrics['train_s']:.2f} s)")
    return ev


def write_evaluation(ev: Evaluation, out: Path) -> Path:
    """DIR/evaluation.parquet (policy, seed, metric, value), DIR/ranks.parquet (policy, seed, user, rank)
    and DIR/evaluation.json (split sizes, seeds, skipped policies, every candidate tried)."""
    import json

    from recloop.sim.store import atomic_write, atomic_write_text

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RecloopInputError("exists and is not a folder.", file=str(out), key="--out")
    atomic_write(out / "evaluation.parquet", ev.frame().write_parquet)
    if ev.ranks:
        atomic_write(out / "ranks.parquet", ev.ranks_frame().write_parquet)
    meta = {"format": "recloop-evaluation/1", **ev.info, "skipped": ev.skipped,
            "tuning": {p: {str(s): v for s, v in d.items()} for p, d in ev.tuning.items()}}
    atomic_write_text(out / "evaluation.json", json.dumps(meta, indent=2, default=str))
    return out / "evaluation.parquet"


def summary_table(df: pl.DataFrame):
    """A rich table: one row per policy, each metric as mean ± sd across seeds."""
    from rich.table import Table

    table = Table(title="offline next-item evaluation (leave-last-two-out, full catalog, mean ± sd over seeds)",
                  title_justify="left")
    table.add_column("policy", no_wrap=True)
    shown = [m for m in METRICS if m in set(df["metric"].to_list())]
    for m in shown:
        table.add_column(m, justify="right", no_wrap=True)
    agg = df.group_by("policy", "metric", maintain_order=True).agg(
        pl.col("value").mean().alias("mean"), pl.col("value").std().fill_null(0.0).alias("sd"))
    cells = {(p, m): (mu, sd) for p, m, mu, sd in agg.iter_rows()}
    for pol in dict.fromkeys(df["policy"].to_list()):
        fmt = [("{:.2f} ± {:.2f}" if m.endswith("_s") else "{:.4f} ± {:.4f}").format(*cells[(pol, m)])
               for m in shown]
        table.add_row(pol, *fmt)
    return table
