"""Every registered component passes the conformance kit (recloop.conformance)."""

import pytest

from recloop import registry
from recloop.conformance import CHECKS, ConformanceReport, check_component


def _all():
    out = []
    for kind in CHECKS:
        for name in registry.names(kind):
            out.append(pytest.param(kind, name, id=f"{kind}:{name}"))
    return out


def _csv_params(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    rows = ["user_id,item_id,rating,ts"]
    for u in range(40):
        for i in rng.choice(50, size=8, replace=False):
            rows.append(f"u{u},i{i},{rng.integers(1, 6)},{rng.integers(1000)}")
    path = tmp_path / "ratings.csv"
    path.write_text("\n".join(rows))
    return {"path": str(path), "rating_col": "rating", "timestamp_col": "ts", "dim": 4}


@pytest.mark.parametrize("kind,name", _all())
def test_component_conforms(kind, name, tmp_path):
    params = _csv_params(tmp_path) if (kind, name) == ("world", "interactions_csv") else None
    report = check_component(kind, name, params)
    assert (report.kind, report.name) == (kind, name) and "seeded determinism" in report


def test_every_kind_has_components():
    for kind in registry.KINDS:
        assert registry.names(kind), kind


def test_params_forbid_extra_keys():
    for spec in registry.specs():
        assert spec.params.model_config.get("extra") == "forbid", spec


def test_kit_catches_a_nondeterministic_policy():
    import numpy as np

    from recloop.recommenders.base import Policy
    from recloop.registry import _REGISTRY, register

    @register("policy", "_flaky")
    class Flaky(Policy):
        def score(self, users, world, step=0):
            return np.random.default_rng().random((len(users), world.items.n)).astype(np.float32)

    try:
        with pytest.raises(AssertionError, match="deterministic"):
            check_component("policy", "_flaky")
    finally:
        _REGISTRY["policy"].pop("_flaky")


def test_kit_catches_input_mutation():
    from recloop.recommenders.classic import IdealPolicy
    from recloop.registry import _REGISTRY, register

    @register("policy", "_mutating")
    class Mutating(IdealPolicy):
        def fit(self, data, view, *, step, rng, warm_start):
            view.truth.users.prefs[0] += 1.0  # an oracle sees the truth, and must not change it

    try:
        with pytest.raises(AssertionError, match="modified"):
            check_component("policy", "_mutating")
    finally:
        _REGISTRY["policy"].pop("_mutating")


def test_check_component_reports_what_it_checked():
    """check_component returns a printable report naming every check passed (it used to return None)."""
    report = check_component("policy", "popularity")
    assert isinstance(report, ConformanceReport) and len(report) >= 6
    for check in ("inputs left unmodified (world, training log)", "seeded determinism", "consumed items excluded",
                  "online update and checkpoint round-trip keep the recommendations",
                  "hidden state unread (preferences and true utility stay hidden)"):
        assert check in report.passed
    text = str(report)
    assert text.splitlines()[0] == f"policy 'popularity': {len(report)} conformance checks passed"
    assert "  ✓ seeded determinism" in text.splitlines()
    assert str(check_component("metric", "utility")).count("✓") == 5


def test_kit_catches_a_policy_that_reads_hidden_preferences():
    from recloop.recommenders.base import Policy
    from recloop.registry import _REGISTRY, register

    @register("policy", "_peeking")
    class Peeking(Policy):
        def factors(self, view):
            return view.users.prefs, view.items.attrs, None  # no uses_ground_truth: hidden

    try:
        with pytest.raises(AssertionError, match="hidden state.*users.prefs"):
            check_component("policy", "_peeking")
    finally:
        _REGISTRY["policy"].pop("_peeking")


def test_kit_catches_a_policy_that_writes_the_catalog():
    import numpy as np

    from recloop.recommenders.classic import PopularityPolicy
    from recloop.registry import _REGISTRY, register

    @register("policy", "_writer")
    class Writer(PopularityPolicy):
        def fit(self, data, view, *, step, rng, warm_start):
            view.items.attrs[0] = np.inf  # the view's arrays are read-only

    try:
        with pytest.raises(ValueError, match="read-only"):
            check_component("policy", "_writer")
    finally:
        _REGISTRY["policy"].pop("_writer")


def test_the_kit_checks_the_component_contract_of_every_kind():
    report = check_component("llm_backend", "surrogate")
    assert "typed Params (extra keys forbidden)" in report
    assert "built from Params, bound through the build context (children too)" in report
    assert "checkpoint round-trip (safe format: arrays and plain values)" in report
    pipe = check_component("policy", "pipeline")
    assert "data added only as reports the loop commits" in pipe
