"""recloop: simulate recommender feedback loops at scale.

The installable namespace maps the repository's top-level folders:
``recloop.sim`` (engine, config, run store), ``recloop.agents`` (users and creators),
``recloop.recommenders`` (policies), ``recloop.analysis`` (metrics and plots) and
``recloop.scenarios`` (shipped YAML scenarios).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_scenario", "run_scenario"]


def load_scenario(path, overrides=None):
    """Load and validate a scenario YAML file (resolving ``extends:``)."""
    from recloop.sim.config import load_scenario as _load

    return _load(path, overrides=overrides)


def run_scenario(scenario, out, **kwargs):
    """Run a scenario (a path or a loaded :class:`~recloop.sim.config.Scenario`) into ``out``."""
    from recloop.sim.runner import run_scenario as _run

    return _run(scenario, out, **kwargs)
