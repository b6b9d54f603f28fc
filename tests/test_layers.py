"""The layers import only downwards, and no modules import each other in a cycle (import-linter).

core (registry, errors, contracts, component, rng, limits) <- sim <- agents, recommenders, analysis
<- llm <- CLI and the conformance kit. The contracts are in pyproject.toml ([tool.importlinter]).

The repository maps its folders into the ``recloop`` namespace (``sim/`` is ``recloop.sim``); the
``recloop/`` folder holds symbolic links to them (``recloop/sim -> ../sim``), so ``lint-imports`` run
from the repository root sees the package as installed. The planted-import check runs on a copy laid out
from ``[tool.setuptools] package-dir``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _installed_layout(dest: Path) -> Path:
    for package, folder in CONFIG["tool"]["setuptools"]["package-dir"].items():
        target = dest.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for f in (ROOT / folder).glob("*.py"):
            shutil.copy2(f, target / f.name)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _lint(tree: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the package found under ``tree`` (the repository root, or a copy)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300)


def test_layers_and_no_cycles():
    """What a developer runs: ``lint-imports`` in the repository root."""
    pytest.importorskip("importlinter")
    for package in CONFIG["tool"]["setuptools"]["package-dir"]:
        if package != "recloop":  # recloop/<sub> links to the folder the package maps it to
            assert (ROOT / package.replace(".", "/")).resolve() == (ROOT / CONFIG["tool"]["setuptools"][
                "package-dir"][package]).resolve(), package
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_the_check_catches_an_upward_import(tmp_path):
    pytest.importorskip("importlinter")
    tree = _installed_layout(tmp_path)
    log = tree / "recloop" / "sim" / "log.py"
    upward = "\n\ndef _upward():\n    from recloop.analysis import metrics\n\n    return metrics\n"
    log.write_text(log.read_text() + upward)
    out = _lint(tree)
    assert out.returncode != 0
    assert "recloop.sim is not allowed to import recloop.analysis" in out.stdout
