"""Conformance kit: the checks every registered component must pass (in the spirit of Gymnasium's
``check_env`` and LensKit's component test mixins).

``check_component(kind, name)`` builds the component from its ``example_params`` (a class attribute,
``{}`` by default) and checks, for every kind:

* the component contract: a :class:`~recloop.component.Component` with typed ``Params`` (extra keys
  forbidden), built from its Params alone and bound through the :class:`~recloop.contracts.BuildContext`
  (its children too);
* the checkpoint round-trip (``state_dict``/``load_state_dict`` through the npz + JSON checkpoint format
  of :mod:`recloop.sim.checkpoint`: arrays and plain values only, no pickle);

and then the checks of its kind (:mod:`recloop.conformance_kinds`, :mod:`recloop.conformance_llm`):
seeded determinism, output shapes and types, inputs left unmodified, chunking invariance, hidden state
left unread (a policy sees only its platform view), reports well formed. Third-party plugins call it from
their own test suites::

    from recloop.conformance import check_component
    def test_my_policy():
        report = check_component("policy", "my_policy")
        print(report)  # the checks it passed, one per line

``check_component`` returns a :class:`ConformanceReport` (kind, name and the names of the checks passed);
a failed check raises AssertionError naming the component and what went wrong.
"""

from __future__ import annotations

from recloop.conformance_base import _REPORT, ConformanceReport, tiny_world
from recloop.conformance_kinds import CHECKS as _KIND_CHECKS
from recloop.conformance_llm import CHECKS as _LLM_CHECKS

__all__ = ["CHECKS", "ConformanceReport", "check_component", "tiny_world"]

#: kind → check function; every kind of :data:`recloop.registry.KINDS` has one
CHECKS = {**_KIND_CHECKS, **_LLM_CHECKS}


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
