"""The feedback loop as a Mesa model: one cycle per :meth:`FeedbackLoop.step`, in six phases.

    serve → respond → advance → record → measure → retrain

* **serve**: the platform's policy scores the active users through the engine (chunked, fused top-k);
* **respond**: fused into serving, each chunk of slates goes to the users' choice model (an engine sink);
  the loop then commits what was consumed (history, popularity, the training log) and organic picks;
* **advance**: creators adapt and publish, users' tastes move, users leave and arrive (Mesa agents);
* **record**: the frozen :class:`~recloop.contracts.CycleRecord`; an online policy learns from it;
* **measure**: the metric components turn the record into rows;
* **retrain**: on schedule, the policy's stages produce reports (LLM augmentation, phantom items) that
  the loop commits, then the policy fits on the log.

Mesa's ``Model`` owns the clock and the agent registry; the coarse actors (:mod:`recloop.sim.actors`)
are Mesa agents whose methods are these phases. Users and items are arrays (:mod:`recloop.sim.state`).
A policy sees only its :class:`~recloop.contracts.PlatformView`; a metric only the record. Every random
draw derives from (run seed, component, cycle), so a resumed run, or one with another chunk size,
gives exactly the same numbers.
"""

from __future__ import annotations

import time
from collections import defaultdict
from types import MappingProxyType

import mesa
import numpy as np
from mesa.agent import AgentSet

from recloop import registry
from recloop.contracts import (
    PROVENANCE,
    BuildContext,
    CatalogReport,
    ConsumedSets,
    CycleRecord,
    InteractionReport,
    PlatformView,
    PolicyProbe,
    Report,
    WorldShape,
)
from recloop.errors import RecloopInputError
from recloop.rng import component_rng, derive_key
from recloop.sim.actors import CreatorsAgent, PlatformAgent, UsersAgent
from recloop.sim.checkpoint import CheckpointError
from recloop.sim.engine import ScoringEngine
from recloop.sim.log import InteractionLog
from recloop.sim.measure import MetricSuite
from recloop.sim.respond import Response
from recloop.sim.state import History, World


class FeedbackLoop(mesa.Model):
    """One simulated ecosystem under one policy and one seed."""

    def __init__(self, scenario, policy_name: str, policy_cfg, seed: int, *, restore: dict | None = None,
                 scenario_file: str | None = None, run_dir: str | None = None):
        super().__init__(rng=seed)
        self.scenario = sc = scenario
        self.policy_name = policy_name
        self.seed = int(seed)
        self.t = 0
        self.timings: dict[str, list[float]] = defaultdict(list)
        self.generator = registry.build("world", sc.world)
        self.world = self.generator.build(component_rng(seed, "world"))
        _check_k(sc, self.world, scenario_file)
        eng = sc.engine
        self.engine = ScoringEngine(eng.backend, chunk_rows=eng.chunk_rows, chunk_mib=eng.chunk_mib,
                                    workers=eng.threads)
        self.history = History(self.world.users.n)
        self.log = InteractionLog(sc.retrain.data, sc.retrain.window)
        self.popularity = np.zeros(self.world.items.n, np.float64)
        self.context = self._build_context(run_dir)
        self._build_actors(policy_cfg)
        if restore is not None:
            self.load_state(restore)
        else:
            self._initial_log()
            self.retrain(0, warm_start=False)

    # -- setup ------------------------------------------------------------------------------------
    def _build_context(self, run_dir: str | None) -> BuildContext:
        w = self.world
        shape = WorldShape(w.users.n, w.items.n, w.items.dim, w.items.genres.shape[1])
        return BuildContext(self.seed, self.policy_name, self.engine, shape, run_dir, self.scenario,
                            view=PlatformView(self, ground_truth=True, who="the simulator"),
                            generator=self.generator)

    def _build_actors(self, policy_cfg) -> None:
        """Build and bind every component, and the Mesa agents that own them."""
        sc, sim = self.scenario, self.context
        self.generator.bind(sim)
        policy = registry.build("policy", policy_cfg)
        who = f"policy '{self.policy_name}'"
        view = PlatformView(self, ground_truth=policy.uses_ground_truth, who=who)
        policy.bind(sim.with_view(view))
        self.platform = PlatformAgent(self, policy, view)
        self.users_agent = UsersAgent(
            self, registry.build("choice", sc.users.choice, sim),
            [registry.build("dynamics", d, sim) for d in sc.users.dynamics],
            registry.build("population", sc.users.population, sim))
        creators = registry.build("creator", sc.creators, sim) if sc.creators is not None else None
        self.creators_agent = CreatorsAgent(self, creators) if creators is not None else None
        #: the agents that advance the world after each cycle, in order (catalog, then users)
        self.advancers = AgentSet([a for a in (self.creators_agent, self.users_agent) if a is not None],
                                       random=self.random)
        self.metrics = MetricSuite(sc.metrics, sim)

    @property
    def policy(self):
        return self.platform.policy

    @property
    def services(self):
        """The run's shared services by name (e.g. ``"llm"``), read-only."""
        return MappingProxyType(self.context.services)

    def _initial_log(self) -> None:
        w = self.world
        real = self.generator.initial_log(w, component_rng(self.seed, "initial_log"))
        if real is not None:
            self._commit(-1, real.users, real.items, real.provenance, initial=True)
            return
        cfg = self.scenario.initial_log
        users = w.users.active_ids()
        m = min(cfg.slate_size, w.items.n)
        choice = self.users_agent.choice
        for r in range(cfg.interactions_per_user):
            key = derive_key(self.seed, "initial_log", r)
            # a random slate per user: m distinct items via hashed ranks (chunking-invariant)
            exclude = None if self.scenario.users.repeat_consumption else self.history
            slate = self.engine.random_topk(users, m, w.items.n, key, exclude=exclude)
            util = w.true_utility(users, slate)
            pos = choice.choose(util, slate >= 0, users, derive_key(self.seed, "initial_choice", r))
            hit = pos >= 0
            items = slate[np.flatnonzero(hit), pos[hit]]
            self._commit(-1, users[hit], items, PROVENANCE["organic"], initial=True)

    # -- one cycle --------------------------------------------------------------------------------
    def step(self) -> list[tuple[str, str, float]]:
        """One cycle (Mesa advances ``steps``); the metric rows are also left in ``last_rows``."""
        t, sc = self.t, self.scenario
        tc = time.perf_counter()
        active = self.users_agent.active(t)
        response, slates, pop_before = self.serve_and_respond(t, active)
        t0 = time.perf_counter()
        consumed = self.commit_consumption(t, response)
        served_truth = self.metrics.serve_time_truth(self.world, measured=t % sc.metrics.every == 0)
        self.advancers.do("advance", response, t)
        self.history.ensure_users(self.world.users.n)
        record = self.record(t, slates, response, consumed, pop_before, served_truth)
        self.platform.observe(record.feedback)
        self.timings["update"].append(time.perf_counter() - t0)
        rows = self.measure(record) if t % sc.metrics.every == 0 else []
        if (t + 1) % sc.retrain.every == 0:
            r = sc.retrain
            full = (not r.warm_start) or (r.full_every > 0 and (t + 1) % r.full_every == 0)
            self.retrain(t + 1, warm_start=not full)
        self.t += 1
        self.timings["cycle"].append(time.perf_counter() - tc)
        self.last_rows = rows  # Mesa's wrapped step() discards return values
        return rows

    def serve_and_respond(self, t: int, active: np.ndarray) -> tuple[Response, np.ndarray, np.ndarray]:
        """serve + respond: slates through the engine, each chunk handed to the users' choice sink."""
        t0 = time.perf_counter()
        sink = self.users_agent.sink(active, t)
        slates, _scores = self.platform.serve(active, t, sink)
        self.timings["scoring"].append(time.perf_counter() - t0)
        return sink.response(), slates, self.popularity.copy()

    def commit_consumption(self, t: int, response: Response) -> tuple[np.ndarray, np.ndarray]:
        """The loop records what users consumed (picks, further accepts, organic picks): histories,
        popularity and the training log. Returns every (user, item) pair consumed this cycle."""
        self._cycle_pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self._cycle_log: list[tuple[np.ndarray, ...]] = []
        clicked = response.chosen_item >= 0
        self._commit(t, response.users[clicked], response.chosen_item[clicked], PROVENANCE["recommended"],
                     positions=response.chosen_pos[clicked])
        self._commit(t, response.extra_users, response.extra_items, PROVENANCE["recommended"],
                     positions=response.extra_positions)
        if self.scenario.users.organic_rate > 0:
            users, items = self.users_agent.organic(t, response.users)
            if len(users) and not self.scenario.users.repeat_consumption:
                keep = self._new_pairs(users, items)
                users, items = users[keep], items[keep]
            self._commit(t, users, items, PROVENANCE["organic"])
        pairs = self._cycle_pairs
        if not pairs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate([u for u, _ in pairs]), np.concatenate([i for _, i in pairs])

    def record(self, t: int, slates, response: Response, consumed, pop_before, served_truth=None) -> CycleRecord:
        """The frozen record of the cycle, for the online policy and the metrics."""
        measured = t % self.scenario.metrics.every == 0
        policy_view = self.platform.view
        reports, self._last_reports = tuple(self._last_reports), []  # each report is recorded once
        return CycleRecord(
            step=t, seed=self.seed, k=self.scenario.k, users=response.users, slates=slates,
            chosen_pos=response.chosen_pos, chosen_item=response.chosen_item, utility=response.utility,
            consumed=consumed, popularity_before=pop_before, popularity=self.popularity,
            history=ConsumedSets(self.history),
            user_sample=self.metrics.user_sample(response.users) if measured else np.zeros(0, np.int64),
            fixed_sample=self.metrics.sample, world=self.world,
            policy=PolicyProbe(self.policy, policy_view), engine=self.engine,
            repeat_consumption=self.scenario.users.repeat_consumption, choice_probs=response.choice_probs,
            choice_probabilities=getattr(self.users_agent.choice, "probabilities", None),
            truth_at_serve=served_truth,
            reports=reports,
            stages=PolicyProbe(self.policy, policy_view).stage_reports() if measured else (),
            platform=PlatformView(self, ground_truth=True, who="a metric"),
            services=MappingProxyType(self.context.services),
        )

    def measure(self, record: CycleRecord) -> list[tuple[str, str, float]]:
        t0 = time.perf_counter()
        rows = self.metrics.measure(record)
        self.timings["metrics"].append(time.perf_counter() - t0)
        return rows

    def retrain(self, step: int, warm_start: bool) -> None:
        """The policy's stages produce reports, the loop commits them, then the policy fits on the log."""
        reports = self.platform.produce(step)
        for rep in reports:
            self.commit_report(rep)
        self._last_reports = reports
        self.platform.fit(self.training_data(), step, warm_start)

    # -- commits: the only writers of the log, the histories and the catalog -----------------------
    def commit_report(self, report: Report) -> None:
        """Apply a stage's report: items join the catalog, interactions join the training log."""
        if isinstance(report, CatalogReport):
            ids = self.world.items.append(report.attrs, report.genres, list(report.titles), report.creator,
                                          report.group, report.step)
            if not np.array_equal(ids, report.ids):
                raise RuntimeError(f"{report.source}: catalog report expected ids from {report.first_id}, got "
                                   f"{int(ids[0]) if len(ids) else '-'}")
        elif isinstance(report, InteractionReport):
            self.log.add(report.step, report.users, report.items, report.provenance, initial=report.initial)
        else:
            raise TypeError(f"unknown report type {type(report).__name__}")

    def _commit(self, step, users, items, provenance, initial=False, positions=None) -> None:
        """Record consumed pairs; ``positions`` are their slate positions (None: not from a slate, -1)."""
        users = np.asarray(users, np.int64)
        items = np.asarray(items, np.int64)
        if len(users) == 0:
            return
        if not initial:
            pos = np.full(len(users), -1, np.int16) if positions is None else np.asarray(positions, np.int16)
            self._cycle_log.append((users, items, pos, np.full(len(users), provenance, np.int8)))
        new = self._new_pairs(users, items)
        if len(self.popularity) < self.world.items.n:
            self.popularity = np.concatenate([self.popularity, np.zeros(self.world.items.n - len(self.popularity))])
        np.add.at(self.popularity, items[new], 1.0)
        if not initial:
            self._cycle_pairs.append((users, items))
        self.history.add(users, items)
        self.log.add(step, users, items, provenance, initial=initial)

    def _new_pairs(self, users, items) -> np.ndarray:
        """Which (user, item) pairs are not yet in the history (φ counts distinct users)."""
        if len(users) < 2 or bool(np.all(users[1:] > users[:-1])):
            new = np.ones(len(users), bool)  # one pair per user (sorted users): no repeats in the batch
        else:
            key = users * (self.world.items.n + 1) + items
            _, first = np.unique(key, return_index=True)
            new = np.zeros(len(users), bool)
            new[first] = True
        if self.history.nnz == 0:
            return new
        return new & ~self.history.contains(users, items)

    def cycle_interactions(self) -> dict[str, np.ndarray]:
        """What users consumed in the last cycle (the run store's ``interactions.parquet`` rows):
        user, item, slate position (-1: not from the slate, e.g. organic) and provenance code."""
        parts = getattr(self, "_cycle_log", [])
        if not parts:
            return {"user": np.zeros(0, np.int64), "item": np.zeros(0, np.int64), "position": np.zeros(0, np.int16),
                    "provenance": np.zeros(0, np.int8)}
        return {name: np.concatenate([p[j] for p in parts])
                for j, name in enumerate(("user", "item", "position", "provenance"))}

    def cycle_tables(self) -> dict[str, dict[str, np.ndarray]]:
        """The metric components' per-cycle tables of the last cycle ({} when it was not measured)."""
        return self.metrics.take_tables()

    def training_data(self):
        return self.log.training_data(self.world.users.n, self.world.items.n)

    # -- manifest and checkpoints -------------------------------------------------------------------
    def run_report(self) -> dict:
        """Facts for the run's manifest entry: each component's ``run_report()`` (policy tree order) and
        each shared service's ``manifest()`` (e.g. the LLM accounting)."""
        out: dict = {}
        stack = [self.policy]
        while stack:
            comp = stack.pop(0)
            report = getattr(comp, "run_report", None)
            if callable(report):
                out.update(report())
            stack.extend(comp.children())
        for svc in self.context.services.values():
            manifest = getattr(svc, "manifest", None)
            if callable(manifest):
                out.update(manifest())
        return out

    def state(self) -> dict:
        """Everything a resume needs, as plain values and arrays (see :mod:`recloop.sim.checkpoint`).
        The arrays are the live ones: write or copy the state before the next step."""
        users = self.users_agent
        creators = self.creators_agent.creators if self.creators_agent is not None else None
        return {
            "t": int(self.t),
            "world": self.world.state_dict(),
            "history": self.history.state_dict(),
            "log": self.log.state_dict(),
            "popularity": self.popularity,
            "policy": self.policy.state_dict(),
            "dynamics": [d.state_dict() for d in users.dynamics],
            "population": users.population.state_dict(),
            "creators": creators.state_dict() if creators is not None else None,
            "metrics": self.metrics.state_dict(),
            "timings": {k: np.asarray(v, np.float64) for k, v in self.timings.items()},
            "services": {name: svc.state_dict() for name, svc in sorted(self.context.services.items())},
        }

    def load_state(self, state: dict) -> None:
        """Restore :meth:`state` into this freshly built model. It may be left half-restored when this
        raises (a checkpoint that does not fit this run): build a new model before trying another one."""
        fresh = self.world
        self.t = int(state["t"])
        self.world = World.from_state_dict(state["world"])  # the views follow: they read the loop's world
        self.history = History.from_state_dict(state["history"])
        self.log = InteractionLog.from_state_dict(state["log"])
        self.popularity = np.array(state["popularity"], copy=True)
        check_restored(self, fresh)
        self.policy.load_state_dict(state["policy"])
        users = self.users_agent
        if len(state["dynamics"]) != len(users.dynamics):
            raise CheckpointError(f"it holds {len(state['dynamics'])} user dynamics, this run has "
                                  f"{len(users.dynamics)}")
        for d, s in zip(users.dynamics, state["dynamics"]):
            d.load_state_dict(s)
        users.population.load_state_dict(state["population"])
        if self.creators_agent is not None:
            self.creators_agent.creators.load_state_dict(state["creators"])
        self.metrics.load_state_dict(state["metrics"])
        self.timings = defaultdict(list, {k: np.asarray(v).tolist() for k, v in state.get("timings", {}).items()})
        saved = state.get("services") or {}
        ctx = self.context
        for name in sorted(set(saved) - set(ctx.services)):  # made after setup (e.g. a warm start)
            ctx.service(name, lambda name=name: registry.service_factory(name)(ctx))
        for name, svc in list(self.context.services.items()):
            restored = getattr(svc, "on_restore", None)
            if callable(restored):
                restored()  # e.g. the LLM service re-reads the restored catalog
            if saved.get(name) is not None:
                svc.load_state_dict(saved[name])
        self._last_reports = []
        self.steps = self.t


def _check_k(sc, world, scenario_file) -> None:
    n_items = world.items.n
    if sc.k > n_items:
        raise RecloopInputError(
            f"k={sc.k} is larger than the catalog ({n_items} items). Set 'k' to at most {n_items} or "
            "enlarge the world's n_items.", file=scenario_file, key="k")


def check_restored(model: FeedbackLoop, fresh: World) -> None:
    """CheckpointError unless the restored world, history and popularity fit this run's freshly built world
    (same dimensions and dtypes, consistent lengths): a foreign or damaged state never runs on."""
    w = model.world
    u, it, fu, fi = w.users, w.items, fresh.users, fresh.items
    cap_u, cap_i = u.prefs.shape[0], it.attrs.shape[0]
    expect = {
        "world.users.prefs": (u.prefs, (cap_u, fu.dim), fu.prefs.dtype),
        "world.users.prefs0": (u.prefs0, (cap_u, fu.dim), fu.prefs0.dtype),
        "world.users.active": (u.active, (cap_u,), fu.active.dtype),
        "world.users.joined_at": (u.joined_at, (cap_u,), fu.joined_at.dtype),
        "world.items.attrs": (it.attrs, (cap_i, fi.dim), fi.attrs.dtype),
        "world.items.genres": (it.genres, (cap_i, fi.genres.shape[1]), fi.genres.dtype),
        "world.items.creator": (it.creator, (cap_i,), fi.creator.dtype),
        "world.items.group": (it.group, (cap_i,), fi.group.dtype),
        "world.items.created_at": (it.created_at, (cap_i,), fi.created_at.dtype),
        "popularity": (model.popularity, (min(len(model.popularity), it.n),), np.dtype(np.float64)),
    }
    expect.update({f"world.users.attributes.{k}": (u.attributes.get(k), (cap_u, *v.shape[1:]), v.dtype)
                   for k, v in fu.attributes.items()})
    if fresh.creators is not None and w.creators is not None:
        fc = fresh.creators
        expect["world.creators.profiles"] = (w.creators.profiles, fc.profiles.shape, fc.profiles.dtype)
        expect["world.creators.group"] = (w.creators.group, fc.group.shape, fc.group.dtype)
    for name, (arr, shape, dtype) in expect.items():
        if not isinstance(arr, np.ndarray) or arr.shape != shape or arr.dtype != dtype:
            got = "nothing" if arr is None else f"shape {getattr(arr, 'shape', '?')} {getattr(arr, 'dtype', '')}"
            raise CheckpointError(f"state.{name} is {got}; this run needs shape {shape} {dtype}")
    if not (0 <= u.n <= cap_u and 0 <= it.n <= cap_i and len(it.titles) == it.n):
        raise CheckpointError("state.world counts do not fit its arrays")
    if (w.creators is None) != (fresh.creators is None) or set(u.attributes) != set(fu.attributes):
        raise CheckpointError("state.world has other parts (creators, user attributes) than this run's world")
    h = model.history
    if h.n_users < u.n or any(ip.shape != (h.n_users + 1,) for ip, _ in h.segments):
        raise CheckpointError("state.history does not fit the restored world's users")
