"""The run store's interactions.parquet: what users consumed (step, user, item, position, provenance),
consistent with the loop's own counts, capped, optional, and identical after a resume."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_checkpoints import SCENARIO

from recloop.cli import main
from recloop.sim.config import load_scenario
from recloop.sim.model import FeedbackLoop
from recloop.sim.runner import run_scenario

KEY = "mf__seed3"


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inter")
    (d / "s.yaml").write_text(textwrap.dedent(SCENARIO))
    run_scenario(d / "s.yaml", d / "full", progress=False)
    return d / "full"


def test_rows_are_what_the_loop_counted(tmp_path):
    """Every consumed pair is a row: the items' counts equal the growth of the loop's popularity, and
    recommended rows sit at a slate position."""
    (tmp_path / "s.yaml").write_text(textwrap.dedent(SCENARIO))
    sc = load_scenario(tmp_path / "s.yaml")
    model = FeedbackLoop(sc, "mf", sc.policy_configs()["mf"], 3)
    before = model.popularity.copy()
    items, positions, provenance = [], [], []
    for _ in range(6):
        model.step()
        rows = model.cycle_interactions()
        assert len(np.unique(rows["user"] * 10**6 + rows["item"])) == len(rows["user"])
        items.append(rows["item"])
        positions.append(rows["position"])
        provenance.append(rows["provenance"])
    items = np.concatenate(items)
    grown = model.popularity - np.pad(before, (0, len(model.popularity) - len(before)))
    assert len(items) > 100
    np.testing.assert_array_equal(np.bincount(items, minlength=len(grown)), grown)
    pos = np.concatenate(positions)
    assert pos.min() >= 0 and pos.max() < sc.k  # all recommended in this scenario (no organic picks)
    assert set(np.concatenate(provenance).tolist()) == {1}


def test_file_columns_and_counts(full):
    inter = pl.read_parquet(full / "interactions.parquet")
    assert inter.columns == ["policy", "seed", "step", "user", "item", "position", "provenance"]
    assert inter.schema["position"] == pl.Int16
    assert inter["step"].min() == 0 and inter["step"].max() == 11
    assert inter["provenance"].unique().to_list() == ["recommended"]
    assert inter.is_duplicated().sum() == 0
    assert inter["step"].is_sorted()


def test_resume_writes_the_same_interactions(full, tmp_path, capsys):
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for name in ("metrics.parquet", "interactions.parquet"):
        (cut / name).unlink()
    for p in (cut / "checkpoints" / KEY).iterdir():
        if int(p.stem.split("_")[1]) > 4:
            p.unlink()
    man = json.loads((cut / "manifest.json").read_text())
    man["status"] = man["runs"][KEY]["status"] = "running"
    (cut / "manifest.json").write_text(json.dumps(man))
    main(["resume", str(cut), "--no-progress"])
    a = pl.read_parquet(full / "interactions.parquet")
    b = pl.read_parquet(cut / "interactions.parquet")
    assert a.equals(b)


def test_cap_and_switch(tmp_path):
    text = textwrap.dedent(SCENARIO).replace("keep_checkpoints: 5}", "keep_checkpoints: 5, interactions_max_rows: 300}")
    (tmp_path / "cap.yaml").write_text(text)
    man = run_scenario(tmp_path / "cap.yaml", tmp_path / "cap", progress=False)
    inter = pl.read_parquet(tmp_path / "cap" / "interactions.parquet")
    cut = man["runs"][KEY]["interactions_truncated_from_step"]
    assert 0 < len(inter) <= 300 and inter["step"].max() == cut - 1
    (tmp_path / "off.yaml").write_text(text.replace("interactions_max_rows: 300", "interactions: false"))
    run_scenario(tmp_path / "off.yaml", tmp_path / "off", progress=False)
    assert not (tmp_path / "off" / "interactions.parquet").exists()
