"""Conformance checks per kind (policies, re-rankers, metrics, user models, creators, worlds); see
:mod:`recloop.conformance`. Each builds the component as a run does: from its Params, then bound with a
build context over a tiny seeded world."""

from __future__ import annotations

import copy
import pickle

import numpy as np

from recloop import registry
from recloop.conformance_base import (
    TINY_WORLD,
    check_contract,
    check_state_roundtrip,
    example_config,
    passed,
    tiny_context,
    tiny_log,
    tiny_state,
    tiny_world,
    view_for,
)
from recloop.contracts import CatalogReport, Feedback, HiddenStateError, InteractionReport
from recloop.rng import component_rng, derive_key
from recloop.sim.config import validate_mapping
from recloop.sim.model import FeedbackLoop


def _snapshot(world, data=None) -> list[np.ndarray]:
    arrs = [world.users.prefs.copy(), world.items.attrs.copy(), world.items.genres.copy()]
    if data is not None:
        arrs += [data.users.copy(), data.items.copy()]
    return arrs


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


def _visible(kind: str, name: str, fn, *args, **kwargs):
    """Call ``fn``; a read of hidden state (user preferences) fails the check with the reason."""
    try:
        return fn(*args, **kwargs)
    except HiddenStateError as exc:
        raise AssertionError(f"{kind} {name}: read hidden state through its view: {exc}") from None


# ---------------------------------------------------------------------------------------------- policy
def check_policy(name: str, params: dict | None = None, k: int = 5, seed: int = 3) -> None:
    cfg = example_config("policy", name, params)
    gen, world = tiny_world(seed)
    data = tiny_log(world, seed)
    users = np.arange(world.users.n, dtype=np.int64)

    def make(state=None):
        state = state or tiny_state(world, data)
        pol = registry.build("policy", cfg)
        pol.bind(view_for(pol, tiny_context(seed, state, gen), f"policy '{name}'"))
        return pol

    def fitted(state=None):
        pol = make(state)
        view = pol.context.view
        _visible("policy", name, pol.fit, view.training_data(), view, step=0, rng=component_rng(seed, "fit", 0),
                 warm_start=False)
        return pol

    state = tiny_state(world, data)
    check_contract("policy", name, cfg, tiny_context(seed, state, gen))
    before = _snapshot(world, data)
    pol = fitted()
    view, hist = pol.context.view, pol.context.view.history
    slates, scores = _visible("policy", name, pol.recommend, users, k, view, exclude=hist, step=1)
    assert _same(before, _snapshot(world, data)), f"policy {name}: fit/recommend modified its inputs"
    passed("inputs left unmodified (world, training log)")
    if not pol.uses_ground_truth:
        passed("hidden state unread (preferences and true utility stay hidden)")
    _check_slates(name, slates, scores, users, k, world, hist)
    slates2, _ = fitted().recommend(users, k, fitted().context.view, exclude=hist, step=1)
    assert np.array_equal(slates, slates2), f"policy {name}: not deterministic under a fixed seed"
    passed("seeded determinism")
    _check_reports(name, make, world, data)
    pos = np.where(slates[:, 0] >= 0, 0, -1)
    fb = Feedback(1, users, slates, pos, np.where(pos >= 0, slates[:, 0], -1), np.zeros(len(users), np.float32))
    pol.update(fb, view)
    clone = check_state_roundtrip("policy", name, pol, fitted)
    a, _ = pol.recommend(users, k, view, exclude=hist, step=2)
    b, _ = clone.recommend(users, k, clone.context.view, exclude=hist, step=2)
    assert np.array_equal(a, b), f"policy {name}: checkpoint round-trip changed the recommendations"
    passed("online update and checkpoint round-trip keep the recommendations")


def _check_slates(name, slates, scores, users, k, world, hist) -> None:
    assert slates.shape == (len(users), k), f"policy {name}: slates shape {slates.shape} != {(len(users), k)}"
    assert np.issubdtype(slates.dtype, np.integer), f"policy {name}: slates must be integer item ids"
    assert scores.shape == slates.shape, f"policy {name}: scores shape must match slates"
    passed("output shapes and types (slates, scores)")
    assert ((slates >= -1) & (slates < world.items.n)).all(), f"policy {name}: item ids out of range"
    passed("item ids in range")
    for row in slates:
        v = row[row >= 0]
        assert len(np.unique(v)) == len(v), f"policy {name}: duplicate items in a slate"
    passed("no duplicate items in a slate")
    r, c = hist.pairs(users)
    excluded = set(zip(r.tolist(), c.tolist()))
    shown = {(i, int(it)) for i, row in enumerate(slates) for it in row if it >= 0}
    assert not (shown & excluded), f"policy {name}: recommended excluded (already consumed) items"
    passed("consumed items excluded")


def _check_reports(name, make, world, data) -> None:
    """``produce`` returns reports only (no writes), and the loop can commit them in order."""
    w = copy.deepcopy(world)
    state = tiny_state(w, data)
    pol = make(state)
    n_items, n_log = w.items.n, len(state.log.training_data(w.users.n, w.items.n))
    reports = _visible("policy", name, pol.produce, pol.context.view, step=0)
    assert w.items.n == n_items and len(state.log.training_data(w.users.n, w.items.n)) == n_log, \
        f"policy {name}: produce() wrote to the catalog or the log (return reports instead)"
    for rep in reports:
        if isinstance(rep, CatalogReport):
            assert rep.first_id == w.items.n, f"policy {name}: catalog report ids must continue the catalog"
            ids = w.items.append(rep.attrs, rep.genres, list(rep.titles), rep.creator, rep.group, rep.step)
            assert np.array_equal(ids, rep.ids), f"policy {name}: catalog report ids do not match"
        else:
            assert isinstance(rep, InteractionReport), f"policy {name}: produce() returned {type(rep).__name__}"
            assert len(rep.users) == len(rep.items), f"policy {name}: interaction report columns differ"
            assert (rep.items < w.items.n).all() and (rep.users < w.users.n).all(), \
                f"policy {name}: interaction report refers to unknown users or items"
    passed("data added only as reports the loop commits")


# -------------------------------------------------------------------------------------------- reranker
def check_reranker(name: str, params: dict | None = None, seed: int = 7) -> None:
    cfg = example_config("reranker", name, params)
    gen, world = tiny_world(seed)
    data = tiny_log(world, seed)
    rng = np.random.default_rng(seed)
    n, m, k = 30, 12, 5
    users = np.arange(n, dtype=np.int64)
    cand = np.stack([rng.choice(world.items.n, size=m, replace=False) for _ in range(n)])
    cand[0, -3:] = -1
    scores = rng.random((n, m)).astype(np.float32)
    scores[cand < 0] = -np.inf
    c0, s0 = cand.copy(), scores.copy()
    check_contract("reranker", name, cfg, tiny_context(seed, tiny_state(world, data), gen))

    def make():
        ctx = tiny_context(seed, tiny_state(world, data), gen)
        r = registry.build("reranker", cfg)
        r.bind(view_for(r, ctx, f"reranker '{name}'"))
        r.fit(data, r.context.view, step=0, rng=component_rng(seed, "fit", 0), warm_start=False)
        return r

    r = make()
    view = r.context.view
    out = _visible("reranker", name, r.rerank, users, cand, scores, k, view, step=0, history=view.history)
    assert np.array_equal(cand, c0) and np.array_equal(scores, s0), f"reranker {name}: modified its inputs"
    passed("inputs left unmodified")
    assert out.shape == (n, k), f"reranker {name}: output shape {out.shape} != {(n, k)}"
    passed("output shape")
    for i in range(n):
        v = out[i][out[i] >= 0]
        assert set(v.tolist()) <= set(cand[i][cand[i] >= 0].tolist()), f"reranker {name}: item not a candidate"
        assert len(np.unique(v)) == len(v), f"reranker {name}: duplicate items"
    passed("only candidates, no duplicates")
    r2 = make()
    out2 = r2.rerank(users, cand, scores, k, r2.context.view, step=0, history=r2.context.view.history)
    assert np.array_equal(out, out2), f"reranker {name}: not deterministic"
    passed("seeded determinism")
    check_state_roundtrip("reranker", name, r, make)


# ---------------------------------------------------------------------------------------------- metric
def check_metric(name: str, params: dict | None = None, seed: int = 8) -> None:
    """Metrics are checked inside a short real run: rows well-formed, documented, deterministic."""
    cfg = example_config("metric", name, params)
    gen, world = tiny_world(seed)
    check_contract("metric", name, cfg, tiny_context(seed, tiny_state(world), gen))
    sc = validate_mapping({"world": TINY_WORLD, "policy": {"type": "random"}, "steps": 3, "k": 4,
                           "metrics": {"include": [cfg], "pairs": 20, "user_sample": 30, "regret_sample": 10}})

    def run_once():
        m = FeedbackLoop(sc, "random", sc.policy, seed)
        rows = []
        for _ in range(3):
            m.step()
            rows.extend(m.last_rows)
        return m, rows

    m, rows = run_once()
    documented = set(getattr(registry.get("metric", name).cls, "METRICS", {}))
    for metric, group, value in rows:
        assert isinstance(metric, str) and isinstance(group, str), f"metric {name}: names must be strings"
        assert isinstance(value, float), f"metric {name}: values must be floats"
        assert metric in documented, f"metric {name}: '{metric}' is not documented in METRICS"
        assert metric == metric.lower() and " " not in metric, f"metric {name}: '{metric}' must be snake_case"
    passed("rows well-formed and documented in METRICS")
    _, rows2 = run_once()
    assert [(a, b) for a, b, _ in rows] == [(a, b) for a, b, _ in rows2], f"metric {name}: rows differ between runs"
    same = np.allclose([v for *_, v in rows], [v for *_, v in rows2], equal_nan=True)
    assert same, f"metric {name}: not deterministic"
    passed("seeded determinism")
    comp = m.metrics.components[0]
    check_state_roundtrip("metric", name, comp, lambda: registry.build("metric", cfg, m.context))


# --------------------------------------------------------------------------------------- users, world
def check_choice(name: str, params: dict | None = None, seed: int = 1) -> None:
    """Choice models; one that needs a particular world (e.g. ``replay`` needs a real log) names it in
    an ``example_world`` class attribute."""
    cfg = example_config("choice", name, params)
    gen, w = tiny_world(seed, getattr(registry.get("choice", name).cls, "example_world", None))
    n = w.users.n if gen.registry_name != TINY_WORLD["type"] else 200
    model = check_contract("choice", name, cfg, tiny_context(seed, tiny_state(w), gen))
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
    passed("inputs left unmodified")
    assert np.array_equal(out, call(util, valid, users)), f"choice {name}: not deterministic"
    passed("seeded determinism")
    cut = n // 3  # chunking invariance: the same users in two parts choose the same
    parts = np.concatenate([call(util[:cut], valid[:cut], users[:cut]), call(util[cut:], valid[cut:], users[cut:])])
    assert np.array_equal(out, parts), f"choice {name}: depends on how users are chunked"
    passed("chunking invariance")
    pickle.loads(pickle.dumps(model))  # worker processes receive it (never a checkpoint format)
    passed("picklable (for worker processes)")
    if many:
        assert out.shape == (n, k) and out.dtype == bool, f"choice {name}: choose_many must return (n, k) bool"
        assert not (out & ~valid).any(), f"choice {name}: accepted an invalid slot"
        passed("accepts only valid slots ((n, k) bool)")
        return
    assert out.shape == (n,) and np.issubdtype(out.dtype, np.integer), f"choice {name}: positions shape/type"
    assert ((out >= -1) & (out < k)).all(), f"choice {name}: positions out of range"
    picked = out >= 0
    assert valid[np.flatnonzero(picked), out[picked]].all(), f"choice {name}: picked an invalid slot"
    passed("positions: shape, type, range, valid slots")
    probs = model.probabilities(util, valid)
    if probs is not None:
        assert np.allclose(probs.sum(axis=1), 1.0), f"choice {name}: probabilities do not sum to 1"
        passed("probabilities sum to 1")


def check_dynamics(name: str, params: dict | None = None, seed: int = 2) -> None:
    cfg = example_config("dynamics", name, params)
    gen, world = tiny_world(seed)
    check_contract("dynamics", name, cfg, tiny_context(seed, tiny_state(copy.deepcopy(world)), gen))

    def run_once():
        w = copy.deepcopy(world)
        ctx = tiny_context(seed, tiny_state(w), gen)
        d = registry.build("dynamics", cfg, ctx)  # bound: state allocated for the world's users
        users = np.arange(w.users.n, dtype=np.int64)
        rng = np.random.default_rng(seed)
        slates = rng.integers(0, w.items.n, size=(w.users.n, 4))
        util = w.true_utility(users, slates)
        u0 = util.copy()
        adj = d.adjust(users, slates, util, w)
        assert np.array_equal(util, u0), f"dynamics {name}: adjust modified its input utilities"
        assert adj.shape == util.shape, f"dynamics {name}: adjust changed the shape"
        passed("adjust leaves its input unmodified and keeps the shape")
        chosen = np.where(rng.random(w.users.n) < 0.7, slates[:, 0], -1)
        d.update(users, chosen, w, 0)
        d2 = check_state_roundtrip("dynamics", name, d, lambda: registry.build("dynamics", cfg, ctx))
        assert np.allclose(d2.adjust(users, slates, util, w), d.adjust(users, slates, util, w)), \
            f"dynamics {name}: checkpoint round-trip changed the state"
        return w.users.prefs.copy(), adj

    a, b = run_once(), run_once()
    assert np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1]), f"dynamics {name}: not deterministic"
    passed("seeded determinism")


def check_population(name: str, params: dict | None = None, seed: int = 4) -> None:
    cfg = example_config("population", name, params)

    def run_once():
        gen, w = tiny_world(seed)
        ctx = tiny_context(seed, tiny_state(w), gen)
        p = check_contract("population", name, cfg, ctx)
        out = []
        for t in range(3):
            act = p.active_users(w, t)
            assert np.all(np.diff(act) > 0), f"population {name}: active ids must be sorted and unique"
            passed("active ids sorted and unique")
            p.step(w, t, np.ones(len(act), bool), act)
            out.append(act)
        check_state_roundtrip("population", name, p, lambda: registry.build("population", cfg, ctx))
        return out, w.users.n

    a, b = run_once(), run_once()
    assert a[1] == b[1] and all(np.array_equal(x, y) for x, y in zip(a[0], b[0])), \
        f"population {name}: not deterministic"
    passed("seeded determinism")


def check_creator(name: str, params: dict | None = None, seed: int = 5) -> None:
    cfg = example_config("creator", name, params)

    def run_once():
        gen, w = tiny_world(seed)
        ctx = tiny_context(seed, tiny_state(w), gen)
        c = check_contract("creator", name, cfg, ctx)
        users = np.arange(w.users.n, dtype=np.int64)
        chosen = np.arange(w.users.n, dtype=np.int64) % w.items.n
        new = c.step(w, 0, users, chosen)
        assert np.issubdtype(np.asarray(new).dtype, np.integer), f"creator {name}: new item ids must be integers"
        assert w.items.n == len(w.items.titles), f"creator {name}: titles out of sync with items"
        passed("new item ids are integers, one title per item")
        check_state_roundtrip("creator", name, c, lambda: registry.build("creator", cfg, ctx))
        return w.items.n, (w.creators.profiles.copy() if w.creators is not None else None)

    a, b = run_once(), run_once()
    assert a[0] == b[0] and (a[1] is None or np.array_equal(a[1], b[1])), f"creator {name}: not deterministic"
    passed("seeded determinism")


def check_world(name: str, params: dict | None = None, seed: int = 6) -> None:
    cfg = example_config("world", name, params)
    gen = registry.build("world", cfg)
    w1 = gen.build(component_rng(seed, "world"))
    check_contract("world", name, cfg, tiny_context(seed, tiny_state(w1), gen))
    w2 = registry.build("world", cfg).build(component_rng(seed, "world"))
    assert np.array_equal(w1.users.prefs, w2.users.prefs), f"world {name}: not deterministic"
    assert np.array_equal(w1.items.attrs, w2.items.attrs), f"world {name}: not deterministic"
    passed("seeded determinism")
    assert w1.users.prefs.dtype == np.float32 and w1.items.attrs.dtype == np.float32, f"world {name}: use float32"
    passed("float32 arrays")
    assert w1.users.dim == w1.items.dim, f"world {name}: users and items must share the latent dimension"
    passed("shared latent dimension")
    assert len(w1.items.titles) == w1.items.n, f"world {name}: one title per item"
    passed("one title per item")
    g = w1.items.genres[: w1.items.n]
    assert np.allclose(g.sum(axis=1), 1.0, atol=1e-4), f"world {name}: genre rows must sum to 1"
    passed("genre rows sum to 1")
    check_state_roundtrip("world", name, gen, lambda: registry.build("world", cfg))


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
