"""The feedback loop as a Mesa model: the platform recommends, users choose, the world evolves,
the policy retrains and the metrics are recorded — one cycle per :meth:`FeedbackLoop.step`.

Mesa's ``Model`` owns the clock and the agent registry; the coarse actors (the platform, the creator
population) are Mesa agents, while users and items are arrays (see :mod:`recloop.sim.state`). Every
random draw derives from (run seed, component, cycle), so a run resumed from a checkpoint, or run with
another chunk size, gives exactly the same numbers.
"""

from __future__ import annotations

import time
from collections import defaultdict

import mesa
import numpy as np

from recloop import registry
from recloop.errors import RecloopInputError
from recloop.recommenders.base import PROVENANCE, Feedback, PolicyContext
from recloop.sim.checkpoint import CheckpointError
from recloop.sim.engine import ScoringEngine
from recloop.sim.log import InteractionLog
from recloop.sim.rng import component_rng, derive_key, hash_u64, hash_uniform
from recloop.sim.state import History, World


class PlatformAgent(mesa.Agent):
    """The platform: serves slates from the policy and retrains it on schedule."""

    def __init__(self, model: FeedbackLoop, policy):
        super().__init__(model)
        self.policy = policy


class CreatorsAgent(mesa.Agent):
    """The creator population (array-backed): adapts to consumption and publishes items."""

    def __init__(self, model: FeedbackLoop, creators):
        super().__init__(model)
        self.creators = creators


class FeedbackLoop(mesa.Model):
    """One simulated ecosystem under one policy and one seed."""

    def __init__(self, scenario, policy_name: str, policy_cfg, seed: int, *, restore: dict | None = None,
                 scenario_file: str | None = None, run_dir: str | None = None):
        super().__init__(rng=seed)
        self.scenario = scenario
        self.policy_name = policy_name
        self.seed = int(seed)
        self.t = 0
        self.timings: dict[str, list[float]] = defaultdict(list)
        sc = scenario
        self.generator = registry.build("world", sc.world)
        self.world = self.generator.build(component_rng(seed, "world"))
        n_items = self.world.items.n
        if sc.k > n_items:
            raise RecloopInputError(
                f"k={sc.k} is larger than the catalog ({n_items} items). Set 'k' to at most {n_items} or "
                "enlarge the world's n_items.", file=scenario_file, key="k")
        eng = sc.engine
        self.engine = ScoringEngine(eng.backend, chunk_rows=eng.chunk_rows, chunk_mib=eng.chunk_mib,
                                    workers=eng.threads)
        ctx = PolicyContext(seed=self.seed, name=policy_name, engine=self.engine, dim=self.world.items.dim,
                            extra={"scenario": sc, "run_dir": run_dir, "generator": self.generator,
                                   "world": self.world, "model": self})
        self.policy_context = ctx
        self.policy = registry.build("policy", policy_cfg, context=ctx)
        self.choice = registry.build("choice", sc.users.choice, seed=self.seed, generator=self.generator)
        self.dynamics = [registry.build("dynamics", d) for d in sc.users.dynamics]
        for d in self.dynamics:
            d.init(self.world)
        self.population = registry.build("population", sc.users.population, seed=self.seed)
        self.creators = (registry.build("creator", sc.creators, seed=self.seed, generator=self.generator)
                         if sc.creators is not None else None)
        self.history = History(self.world.users.n)
        self.log = InteractionLog(sc.retrain.data, sc.retrain.window)
        self.popularity = np.zeros(n_items, np.float64)
        from recloop.analysis.collectors import MetricSuite

        self.metrics = MetricSuite(sc.metrics, seed=self.seed, world=self.world, k=sc.k)
        self.platform = PlatformAgent(self, self.policy)
        self.creator_agent = CreatorsAgent(self, self.creators)
        if restore is not None:
            self.load_state(restore)
        else:
            self._initial_log()
            t0 = time.perf_counter()
            self.policy.fit(self.training_data(), self.world, step=0, rng=component_rng(seed, "fit", 0),
                            warm_start=False)
            self.timings["retrain"].append(time.perf_counter() - t0)

    # -- setup ------------------------------------------------------------------------------------
    def _initial_log(self) -> None:
        w = self.world
        real = self.generator.initial_log(w, component_rng(self.seed, "initial_log"))
        if real is not None:
            self._record(-1, real.users, real.items, real.provenance, initial=True)
            return
        cfg = self.scenario.initial_log
        users = w.users.active_ids()
        m = min(cfg.slate_size, w.items.n)
        for r in range(cfg.interactions_per_user):
            key = derive_key(self.seed, "initial_log", r)
            # a random slate per user: m distinct items via hashed ranks (chunking-invariant)
            exclude = None if self.scenario.users.repeat_consumption else self.history
            slate = self.engine.random_topk(users, m, w.items.n, key, exclude=exclude)
            util = w.true_utility(users, slate)
            pos = self.choice.choose(util, slate >= 0, users, derive_key(self.seed, "initial_choice", r))
            hit = pos >= 0
            items = slate[np.flatnonzero(hit), pos[hit]]
            self._record(-1, users[hit], items, PROVENANCE["organic"], initial=True)

    def _record(self, step, users, items, provenance, initial=False) -> None:
        users = np.asarray(users, np.int64)
        items = np.asarray(items, np.int64)
        if len(users) == 0:
            return
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

    def training_data(self):
        return self.log.training_data(self.world.users.n, self.world.items.n)

    # -- one cycle --------------------------------------------------------------------------------
    def step(self) -> list[tuple[str, str, float]]:
        """One cycle (Mesa advances ``steps``); the metric rows are left in ``last_rows``."""
        t = self.t
        sc = self.scenario
        w = self.world
        tc = time.perf_counter()
        self._cycle_pairs: list[tuple[np.ndarray, np.ndarray]] = []  # what users consume in this cycle
        active = self.population.active_users(w, t)
        n = len(active)
        chosen_pos = np.full(n, -1, np.int64)
        chosen_item = np.full(n, -1, np.int64)
        realised = np.zeros(n, np.float32)
        key = derive_key(self.seed, "choice", t)
        many = getattr(self.choice, "choose_many", None)  # multi-accept models (e.g. EchoTrace replay)
        extra_users: list[np.ndarray] = []
        extra_items: list[np.ndarray] = []

        def on_chunk(sl, items, scores):
            u = active[sl]
            valid = items >= 0
            true_u = np.where(valid, w.true_utility(u, items), 0.0).astype(np.float32)
            perceived = true_u
            for d in self.dynamics:
                perceived = d.adjust(u, items, perceived, w)
            if many is not None:
                accept = many(perceived, valid, u, key, step=t) & valid
                pos = np.where(accept.any(axis=1), np.argmax(accept, axis=1), -1)
                rest = accept.copy()
                rest[np.arange(len(u)), np.maximum(pos, 0)] = False
                r, c = np.nonzero(rest)
                extra_users.append(u[r])
                extra_items.append(items[r, c])
            else:
                pos = self.choice.choose(perceived, valid, u, key)
            hit = pos >= 0
            rows = np.flatnonzero(hit)
            chosen_pos[sl] = pos
            ci = np.full(len(u), -1, np.int64)
            ci[rows] = items[rows, pos[hit]]
            chosen_item[sl] = ci
            ru = np.zeros(len(u), np.float32)
            ru[rows] = true_u[rows, pos[hit]]
            if many is not None:
                ru = np.where(accept, true_u, 0.0).sum(axis=1).astype(np.float32)
            realised[sl] = ru

        t0 = time.perf_counter()
        exclude = None if sc.users.repeat_consumption else self.history
        slates, scores = self.policy.recommend(active, sc.k, w, exclude=exclude, step=t, engine=self.engine,
                                               on_chunk=on_chunk)
        self.timings["scoring"].append(time.perf_counter() - t0)
        pop_before = self.popularity.copy()

        t0 = time.perf_counter()
        clicked = chosen_item >= 0
        self._record(t, active[clicked], chosen_item[clicked], PROVENANCE["recommended"])
        if extra_users:
            self._record(t, np.concatenate(extra_users), np.concatenate(extra_items), PROVENANCE["recommended"])
        if sc.users.organic_rate > 0:
            self._organic(t, active)
        for d in self.dynamics:
            d.update(active, chosen_item, w, t)
        if self.creators is not None:
            self.creators.step(w, t, active, chosen_item)
            if len(self.popularity) < w.items.n:
                self.popularity = np.concatenate([self.popularity, np.zeros(w.items.n - len(self.popularity))])
        self.population.step(w, t, clicked, active)
        self.history.ensure_users(w.users.n)
        pairs = self._cycle_pairs
        consumed = (np.concatenate([u for u, _ in pairs]), np.concatenate([i for _, i in pairs])) if pairs else \
            (np.zeros(0, np.int64), np.zeros(0, np.int64))
        feedback = Feedback(step=t, users=active, slates=slates, chosen_pos=chosen_pos, chosen_item=chosen_item,
                            utility=realised, consumed=consumed)
        if self.policy.online:
            self.policy.update(feedback, w)
        self.timings["update"].append(time.perf_counter() - t0)

        rows: list[tuple[str, str, float]] = []
        if t % sc.metrics.every == 0:
            t0 = time.perf_counter()
            rows = self.metrics.compute(self, feedback, pop_before)
            self.timings["metrics"].append(time.perf_counter() - t0)

        if (t + 1) % sc.retrain.every == 0:
            t0 = time.perf_counter()
            r = sc.retrain
            full = (not r.warm_start) or (r.full_every > 0 and (t + 1) % r.full_every == 0)
            self.policy.fit(self.training_data(), w, step=t + 1, rng=component_rng(self.seed, "fit", t + 1),
                            warm_start=not full)
            self.timings["retrain"].append(time.perf_counter() - t0)
        self.t += 1
        self.timings["cycle"].append(time.perf_counter() - tc)
        self.last_rows = rows  # Mesa's wrapped step() discards return values
        return rows

    def _organic(self, t: int, active: np.ndarray) -> None:
        """Organic consumption outside recommendations: a uniformly drawn unconsumed item."""
        w = self.world
        key = derive_key(self.seed, "organic", t)
        pick = hash_uniform(key, active, 0) < self.scenario.users.organic_rate
        users = active[pick]
        if len(users) == 0:
            return
        items = (hash_u64(key, users, 1) % np.uint64(w.items.n)).astype(np.int64)
        if not self.scenario.users.repeat_consumption:
            keep = self._new_pairs(users, items)
            users, items = users[keep], items[keep]
        self._record(t, users, items, PROVENANCE["organic"])

    # -- checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything a resume needs, as plain values and arrays (see :mod:`recloop.sim.checkpoint`).
        The arrays are the live ones: write or copy the state before the next step."""
        return {
            "t": int(self.t),
            "world": self.world.state_dict(),
            "history": self.history.state_dict(),
            "log": self.log.state_dict(),
            "popularity": self.popularity,
            "policy": self.policy.state_dict(),
            "dynamics": [d.state_dict() for d in self.dynamics],
            "population": self.population.state_dict(),
            "creators": self.creators.state_dict() if self.creators else None,
            "metrics": self.metrics.state_dict(),
            "timings": {k: np.asarray(v, np.float64) for k, v in self.timings.items()},
            "llm": svc.state_dict() if (svc := self.llm_service) is not None else None,
        }

    @property
    def llm_service(self):
        """The run's LLM service, if an LLM stage created one (see recloop.llm.service)."""
        return self.policy_context.extra.get("llm_service")

    def load_state(self, state: dict) -> None:
        """Restore :meth:`state` into this freshly built model. It may be left half-restored when this
        raises (a checkpoint that does not fit this run): build a new model before trying another one."""
        fresh = self.world
        self.t = int(state["t"])
        self.world = World.from_state_dict(state["world"])
        self.history = History.from_state_dict(state["history"])
        self.log = InteractionLog.from_state_dict(state["log"])
        self.popularity = np.array(state["popularity"], copy=True)
        check_restored(self, fresh)
        self.policy_context.extra["world"] = self.world  # components built before the restore follow it
        self.policy.load_state_dict(state["policy"])
        if len(state["dynamics"]) != len(self.dynamics):
            raise CheckpointError(f"it holds {len(state['dynamics'])} user dynamics, this run has {len(self.dynamics)}")
        for d, s in zip(self.dynamics, state["dynamics"]):
            d.load_state_dict(s)
        self.population.load_state_dict(state["population"])
        if self.creators is not None:
            self.creators.load_state_dict(state["creators"])
        self.metrics.load_state_dict(state["metrics"], self.world)
        self.timings = defaultdict(list, {k: np.asarray(v).tolist() for k, v in state.get("timings", {}).items()})
        if self.llm_service is not None:
            self.llm_service.bind_world(self.world)
            if state.get("llm") is not None:
                self.llm_service.load_state_dict(state["llm"])
        self.steps = self.t


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
