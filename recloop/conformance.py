"""Conformance kit: the checks every registered component must pass (in the spirit of Gymnasium's
``check_env`` and LensKit's component test mixins).

``check_component(kind, name)`` builds the component from its ``example_params`` (a class attribute,
``{}`` by default) on a tiny seeded world and checks: seeded determinism, output shapes and types,
inputs left unmodified, and the checkpoint round-trip (``state_dict``/``load_state_dict`` through the
npz + JSON checkpoint format of :mod:`recloop.sim.checkpoint`: arrays and plain values only, no pickle).
Third-party plugins call it from their own test suites::

    from recloop.conformance import check_component
    def test_my_policy():
        report = check_component("policy", "my_policy")
        print(report)  # the checks it passed, one per line

``check_component`` returns a :class:`ConformanceReport` (kind, name and the names of the checks passed);
a failed check raises AssertionError naming the component and what went wrong.
"""

from __future__ import annotations

import copy
import pickle
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recloop import registry
from recloop.recommenders.base import Feedback, PolicyContext, TrainingData
from recloop.rng import component_rng, derive_key
from recloop.sim.checkpoint import roundtrip
from recloop.sim.engine import ScoringEngine
from recloop.sim.state import History


@dataclass
class ConformanceReport:
    """What :func:`check_component` checked: the checks the component passed, in order (printable)."""

    kind: str
    name: str
    passed: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.passed)

    def __contains__(self, check: str) -> bool:
        return check in self.passed

    def __str__(self) -> str:
        lines = [f"{self.kind} '{self.name}': {len(self.passed)} conformance checks passed"]
        return "\n".join(lines + [f"  ✓ {c}" for c in self.passed])


_REPORT: ContextVar[ConformanceReport | None] = ContextVar("conformance_report", default=None)


def _passed(check: str) -> None:
    """Record a passed check in the report of the running :func:`check_component` (once per name)."""
    rep = _REPORT.get()
    if rep is not None and check not in rep.passed:
        rep.passed.append(check)


TINY_WORLD = {"type": "chaney", "n_users": 60, "n_items": 80, "dim": 6, "n_creators": 5}


def _params(kind: str, name: str, params: dict | None) -> dict[str, Any]:
    spec = registry.get(kind, name)
    base = dict(getattr(spec.cls, "example_params", {}) or {})
    base.update(params or {})
    return {"type": name, **base}


def tiny_world(seed: int = 0, world: dict | None = None):
    gen = registry.build("world", world or TINY_WORLD)
    return gen, gen.build(component_rng(seed, "world"))


def tiny_log(world, seed: int = 0, per_user: int = 4) -> TrainingData:
    rng = component_rng(seed, "conformance.log")
    n_u, n_i = world.users.n, world.items.n
    users = np.repeat(np.arange(n_u), per_user)
    items = rng.integers(0, n_i, size=len(users))
    return TrainingData(users, items, np.zeros(len(users), np.int32), np.zeros(len(users), np.int8), n_u, n_i)


def _snapshot(world, data: TrainingData | None = None) -> list[np.ndarray]:
    arrs = [world.users.prefs.copy(), world.items.attrs.copy(), world.items.genres.copy()]
    if data is not None:
        arrs += [data.users.copy(), data.items.copy()]
    return arrs


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


def _history(data: TrainingData) -> History:
    h = History(data.n_users)
    h.add(data.users, data.items)
    return h


def check_policy(name: str, params: dict | None = None, k: int = 5, seed: int = 3) -> None:
    cfg = _params("policy", name, params)
    _, world = tiny_world(seed)
    data = tiny_log(world, seed)
    users = np.arange(world.users.n, dtype=np.int64)
    hist = _history(data)

    def make():
        ctx = PolicyContext(seed=seed, name=name, engine=ScoringEngine("numpy", chunk_rows=17), dim=world.items.dim)
        pol = registry.build("policy", cfg, context=ctx)
        pol.fit(data, world, step=0, rng=component_rng(seed, "fit", 0), warm_start=False)
        return pol

    before = _snapshot(world, data)
    pol = make()
    slates, scores = pol.recommend(users, k, world, exclude=hist, step=1)
    assert _same(before, _snapshot(world, data)), f"policy {name}: fit/recommend modified its inputs"
    _passed("inputs left unmodified (world, training log)")
    assert slates.shape == (len(users), k), f"policy {name}: slates shape {slates.shape} != {(len(users), k)}"
    assert np.issubdtype(slates.dtype, np.integer), f"policy {name}: slates must be integer item ids"
    assert scores.shape == slates.shape, f"policy {name}: scores shape must match slates"
    _passed("output shapes and types (slates, scores)")
    assert ((slates >= -1) & (slates < world.items.n)).all(), f"policy {name}: item ids out of range"
    _passed("item ids in range")
    for row in slates:
        v = row[row >= 0]
        assert len(np.unique(v)) == len(v), f"policy {name}: duplicate items in a slate"
    _passed("no duplicate items in a slate")
    r, c = hist.pairs(users)
    excluded = set(zip(r.tolist(), c.tolist()))
    shown = {(i, int(it)) for i, row in enumerate(slates) for it in row if it >= 0}
    assert not (shown & excluded), f"policy {name}: recommended excluded (already consumed) items"
    _passed("consumed items excluded")
    slates2, _ = make().recommend(users, k, world, exclude=hist, step=1)
    assert np.array_equal(slates, slates2), f"policy {name}: not deterministic under a fixed seed"
    _passed("seeded determinism")
    # online update and checkpoint round-trip
    pos = np.where(slates[:, 0] >= 0, 0, -1)
    fb = Feedback(1, users, slates, pos, np.where(pos >= 0, slates[:, 0], -1), np.zeros(len(users), np.float32))
    pol.update(fb, world)
    state = roundtrip(pol.state_dict())
    clone = make()
    clone.load_state_dict(state)
    a, _ = pol.recommend(users, k, world, exclude=hist, step=2)
    b, _ = clone.recommend(users, k, world, exclude=hist, step=2)
    assert np.array_equal(a, b), f"policy {name}: checkpoint round-trip changed the recommendations"
    _passed("online update and checkpoint round-trip")


def check_choice(name: str, params: dict | None = None, seed: int = 1) -> None:
    """Choice models; one that needs a particular world (e.g. ``replay`` needs a real log) names it in
    an ``example_world`` class attribute."""
    cfg = _params("choice", name, params)
    spec = registry.get("choice", name)
    world_cfg = getattr(spec.cls, "example_world", None)
    generator = None
    n = 200
    if world_cfg is not None:
        generator, w = tiny_world(seed, world_cfg)
        n = w.users.n
    model = registry.build("choice", cfg, seed=seed, generator=generator)
    many = hasattr(model, "choose_many")
    key = derive_key(seed, "choice", 0)

    def call(util, valid, users):
        if many:
            return model.choose_many(util, valid, users, key, step=0)
        return model.choose(util, valid, users, key)

    rng = np.random.default_rng(seed)
    k = 6
    util = rng.random((n, k)).astype(np.float32)
    valid = rng.random((n, k)) > 0.2
    users = np.arange(n, dtype=np.int64)
    u0, v0 = util.copy(), valid.copy()
    out = call(util, valid, users)
    assert np.array_equal(util, u0) and np.array_equal(valid, v0), f"choice {name}: modified its inputs"
    _passed("inputs left unmodified")
    assert np.array_equal(out, call(util, valid, users)), f"choice {name}: not deterministic"
    _passed("seeded determinism")
    cut = n // 3  # chunking invariance: the same users in two parts choose the same
    parts = np.concatenate([call(util[:cut], valid[:cut], users[:cut]), call(util[cut:], valid[cut:], users[cut:])])
    assert np.array_equal(out, parts), f"choice {name}: depends on how users are chunked"
    _passed("chunking invariance")
    pickle.loads(pickle.dumps(model))
    _passed("picklable")
    if many:
        assert out.shape == (n, k) and out.dtype == bool, f"choice {name}: choose_many must return (n, k) bool"
        assert not (out & ~valid).any(), f"choice {name}: accepted an invalid slot"
        _passed("accepts only valid slots ((n, k) bool)")
        return
    assert out.shape == (n,) and np.issubdtype(out.dtype, np.integer), f"choice {name}: positions shape/type"
    assert ((out >= -1) & (out < k)).all(), f"choice {name}: positions out of range"
    picked = out >= 0
    assert valid[np.flatnonzero(picked), out[picked]].all(), f"choice {name}: picked an invalid slot"
    _passed("positions: shape, type, range, valid slots")
    probs = model.probabilities(util, valid)
    if probs is not None:
        assert np.allclose(probs.sum(axis=1), 1.0), f"choice {name}: probabilities do not sum to 1"
        _passed("probabilities sum to 1")


def check_dynamics(name: str, params: dict | None = None, seed: int = 2) -> None:
    cfg = _params("dynamics", name, params)
    _, world = tiny_world(seed)

    def run_once():
        w = copy.deepcopy(world)
        d = registry.build("dynamics", cfg)
        d.init(w)
        users = np.arange(w.users.n, dtype=np.int64)
        rng = np.random.default_rng(seed)
        slates = rng.integers(0, w.items.n, size=(w.users.n, 4))
        util = w.true_utility(users, slates)
        u0 = util.copy()
        adj = d.adjust(users, slates, util, w)
        assert np.array_equal(util, u0), f"dynamics {name}: adjust modified its input utilities"
        assert adj.shape == util.shape, f"dynamics {name}: adjust changed the shape"
        _passed("adjust leaves its input unmodified and keeps the shape")
        chosen = np.where(rng.random(w.users.n) < 0.7, slates[:, 0], -1)
        d.update(users, chosen, w, 0)
        state = roundtrip(d.state_dict())
        d2 = registry.build("dynamics", cfg)
        d2.init(w)
        d2.load_state_dict(state)
        assert np.allclose(d2.adjust(users, slates, util, w), d.adjust(users, slates, util, w)), \
            f"dynamics {name}: checkpoint round-trip changed the state"
        _passed("checkpoint round-trip")
        return w.users.prefs.copy(), adj

    a, b = run_once(), run_once()
    assert np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1]), f"dynamics {name}: not deterministic"
    _passed("seeded determinism")


def check_population(name: str, params: dict | None = None, seed: int = 4) -> None:
    cfg = _params("population", name, params)

    def run_once():
        _, w = tiny_world(seed)
        p = registry.build("population", cfg, seed=seed)
        out = []
        for t in range(3):
            act = p.active_users(w, t)
            assert np.all(np.diff(act) > 0), f"population {name}: active ids must be sorted and unique"
            _passed("active ids sorted and unique")
            p.step(w, t, np.ones(len(act), bool), act)
            out.append(act)
        return out, w.users.n

    a, b = run_once(), run_once()
    assert a[1] == b[1] and all(np.array_equal(x, y) for x, y in zip(a[0], b[0])), \
        f"population {name}: not deterministic"
    _passed("seeded determinism")


def check_creator(name: str, params: dict | None = None, seed: int = 5) -> None:
    cfg = _params("creator", name, params)

    def run_once():
        gen, w = tiny_world(seed)
        c = registry.build("creator", cfg, seed=seed, generator=gen)
        users = np.arange(w.users.n, dtype=np.int64)
        chosen = np.arange(w.users.n, dtype=np.int64) % w.items.n
        new = c.step(w, 0, users, chosen)
        assert np.issubdtype(np.asarray(new).dtype, np.integer), f"creator {name}: new item ids must be integers"
        assert w.items.n == len(w.items.titles), f"creator {name}: titles out of sync with items"
        _passed("new item ids are integers, one title per item")
        roundtrip(c.state_dict())
        _passed("checkpoint round-trip (state_dict)")
        return w.items.n, (w.creators.profiles.copy() if w.creators is not None else None)

    a, b = run_once(), run_once()
    assert a[0] == b[0] and (a[1] is None or np.array_equal(a[1], b[1])), f"creator {name}: not deterministic"
    _passed("seeded determinism")


def check_world(name: str, params: dict | None = None, seed: int = 6) -> None:
    cfg = _params("world", name, params)
    gen = registry.build("world", cfg)
    w1 = gen.build(component_rng(seed, "world"))
    w2 = registry.build("world", cfg).build(component_rng(seed, "world"))
    assert np.array_equal(w1.users.prefs, w2.users.prefs), f"world {name}: not deterministic"
    assert np.array_equal(w1.items.attrs, w2.items.attrs), f"world {name}: not deterministic"
    _passed("seeded determinism")
    assert w1.users.prefs.dtype == np.float32 and w1.items.attrs.dtype == np.float32, f"world {name}: use float32"
    _passed("float32 arrays")
    assert w1.users.dim == w1.items.dim, f"world {name}: users and items must share the latent dimension"
    _passed("shared latent dimension")
    assert len(w1.items.titles) == w1.items.n, f"world {name}: one title per item"
    _passed("one title per item")
    g = w1.items.genres[: w1.items.n]
    assert np.allclose(g.sum(axis=1), 1.0, atol=1e-4), f"world {name}: genre rows must sum to 1"
    _passed("genre rows sum to 1")


def check_reranker(name: str, params: dict | None = None, seed: int = 7) -> None:
    cfg = _params("reranker", name, params)
    _, world = tiny_world(seed)
    data = tiny_log(world, seed)
    rng = np.random.default_rng(seed)
    n, m, k = 30, 12, 5
    users = np.arange(n, dtype=np.int64)
    cand = np.stack([rng.choice(world.items.n, size=m, replace=False) for _ in range(n)])
    cand[0, -3:] = -1
    scores = rng.random((n, m)).astype(np.float32)
    scores[cand < 0] = -np.inf
    c0, s0 = cand.copy(), scores.copy()

    def make():
        r = registry.build("reranker", cfg, context=PolicyContext(seed=seed, engine=ScoringEngine("numpy")))
        if hasattr(r, "fit"):
            r.fit(data, world, step=0, rng=component_rng(seed, "fit", 0), warm_start=False)
        return r

    hist = _history(data)
    out = make().rerank(users, cand, scores, k, world, step=0, history=hist)
    assert np.array_equal(cand, c0) and np.array_equal(scores, s0), f"reranker {name}: modified its inputs"
    _passed("inputs left unmodified")
    assert out.shape == (n, k), f"reranker {name}: output shape {out.shape} != {(n, k)}"
    _passed("output shape")
    for i in range(n):
        v = out[i][out[i] >= 0]
        assert set(v.tolist()) <= set(cand[i][cand[i] >= 0].tolist()), f"reranker {name}: item not a candidate"
        assert len(np.unique(v)) == len(v), f"reranker {name}: duplicate items"
    _passed("only candidates, no duplicates")
    out2 = make().rerank(users, cand, scores, k, world, step=0, history=hist)
    assert np.array_equal(out, out2), f"reranker {name}: not deterministic"
    _passed("seeded determinism")


def check_metric(name: str, params: dict | None = None, seed: int = 8) -> None:
    """Metrics are checked inside a short real run: rows well-formed, documented, deterministic."""
    from recloop.sim.config import validate_mapping
    from recloop.sim.model import FeedbackLoop

    cfg = _params("metric", name, params)
    sc = validate_mapping({"world": TINY_WORLD, "policy": {"type": "random"}, "steps": 3, "k": 4,
                           "metrics": {"include": [cfg["type"]], "pairs": 20, "user_sample": 30, "regret_sample": 10}})

    def run_once():
        m = FeedbackLoop(sc, "random", sc.policy, seed)
        rows = []
        for _ in range(3):
            m.step()
            rows.extend(m.last_rows)
        return m, rows

    m, rows = run_once()
    spec = registry.get("metric", name)
    documented = set(getattr(spec.cls, "METRICS", {}))
    for metric, group, value in rows:
        assert isinstance(metric, str) and isinstance(group, str), f"metric {name}: names must be strings"
        assert isinstance(value, float), f"metric {name}: values must be floats"
        assert metric in documented, f"metric {name}: '{metric}' is not documented in METRICS"
        assert metric == metric.lower() and " " not in metric, f"metric {name}: '{metric}' must be snake_case"
    _passed("rows well-formed and documented in METRICS")
    _, rows2 = run_once()
    assert [(a, b) for a, b, _ in rows] == [(a, b) for a, b, _ in rows2], f"metric {name}: rows differ between runs"
    same = np.allclose([v for *_, v in rows], [v for *_, v in rows2], equal_nan=True)
    assert same, f"metric {name}: not deterministic"
    _passed("seeded determinism")
    roundtrip(m.metrics.state_dict())
    _passed("checkpoint round-trip (state_dict)")


CHECKS = {
    "policy": check_policy,
    "choice": check_choice,
    "dynamics": check_dynamics,
    "population": check_population,
    "creator": check_creator,
    "world": check_world,
    "reranker": check_reranker,
    "metric": check_metric,
}


def check_component(kind: str, name: str, params: dict | None = None) -> ConformanceReport:
    """Run the conformance checks for one registered component; returns the report of the checks it
    passed (``print(report)`` lists them) and raises AssertionError on the first failure."""
    if kind not in CHECKS:
        raise ValueError(f"no conformance checks for kind {kind!r}; kinds: {', '.join(CHECKS)}")
    report = ConformanceReport(kind, name)
    token = _REPORT.set(report)
    try:
        CHECKS[kind](name, params)
    finally:
        _REPORT.reset(token)
    return report
