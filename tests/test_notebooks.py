"""The shipped notebooks execute headless from top to bottom (nbclient, a fresh kernel each).

Each notebook runs its own short simulation in a temporary folder (the LLM notebook uses the surrogate
LLM, so no model is needed) and must finish within its time limit. Add new notebooks to NOTEBOOKS.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
#: (file, time limit in seconds for the whole notebook)
NOTEBOOKS = [
    ("01-quickstart.ipynb", 240),
    ("02-llm-risks.ipynb", 240),
    ("03-conformal-validity.ipynb", 240),
]


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(n for n, _ in NOTEBOOKS)


@pytest.mark.slow
@pytest.mark.parametrize("name,limit", NOTEBOOKS, ids=[n for n, _ in NOTEBOOKS])
def test_notebook_executes(name, limit, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    path = NOTEBOOK_DIR / name
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=limit,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    t0 = time.perf_counter()
    client.execute()
    wall = time.perf_counter() - t0
    assert wall < limit
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    # every code cell ran
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code" and c.source.strip())
    if name == "02-llm-risks.ipynb":
        text = "".join(
            o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
        )
        assert "llm_prof_hall" in text and "llm_hall_rate" in text and "calls" in text
        images = [
            o
            for c in nb.cells
            if c.cell_type == "code"
            for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})
        ]
        assert len(images) >= 3
