"""The registry: one class per id, internal ImportErrors surface, plugins that fail name themselves,
and a scenario without LLM stages never imports torch or transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from recloop import registry
from recloop.recommenders.base import Policy
from recloop.registry import register


def test_a_second_class_cannot_take_a_registered_name():
    assert "popularity" in registry.names("policy")  # the built-ins are loaded
    with pytest.raises(ValueError, match="already registered"):

        @register("policy", "popularity")
        class Impostor(Policy):
            pass

    assert registry.get("policy", "popularity").cls.__name__ != "Impostor"


def test_the_same_class_registered_again_replaces_itself():
    for _ in range(2):  # a re-run notebook cell or a reloaded module defines the class anew

        @register("policy", "_twice")
        class Twice(Policy):
            pass

    assert registry.get("policy", "_twice").cls is Twice
    del registry._REGISTRY["policy"]["_twice"]


def test_an_import_error_inside_a_builtin_module_is_not_swallowed(monkeypatch):
    monkeypatch.setattr(registry, "BUILTIN_MODULES", (*registry.BUILTIN_MODULES, "recloop.no_such_module"))
    monkeypatch.setitem(registry._LOADED, "builtins", False)
    with pytest.raises(ModuleNotFoundError, match="recloop.no_such_module"):
        registry.load_builtins()


def test_a_broken_plugin_names_itself(monkeypatch):
    class BrokenEntryPoint:
        name, value = "acme", "acme_recs.policies"

        def load(self):
            raise ImportError("No module named 'acme_recs'")

    monkeypatch.setattr(registry, "entry_points", lambda group: [BrokenEntryPoint()])
    monkeypatch.setitem(registry._LOADED, "plugins", False)
    with pytest.raises(ImportError, match="plugin entry point 'acme' .*acme_recs"):
        registry.load_plugins()


def test_a_scenario_without_llm_stages_imports_no_torch_or_transformers(tmp_path):
    code = (
        "import sys\n"
        "from recloop import load_scenario, run_scenario\n"
        "sc = load_scenario('quickstart', overrides={'steps': 2, 'replicates': 1, 'world.n_users': 200})\n"
        f"run_scenario(sc, {str(tmp_path / 'run')!r}, progress=False)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
