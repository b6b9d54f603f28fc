"""The README's "Extending" example is real: its code registers a policy usable from YAML."""

import re
from pathlib import Path

import polars as pl

from recloop.conformance import check_component
from recloop.registry import _REGISTRY
from recloop.sim.runner import run_scenario

README = Path(__file__).resolve().parents[1] / "README.md"


def _extending_blocks():
    text = README.read_text()
    section = text.split("## Extending", 1)[1].split("\n## ", 1)[0]
    py = re.findall(r"```python\n(.*?)```", section, re.S)
    yml = re.findall(r"```yaml\n(.*?)```", section, re.S)
    return py[0], yml[0]


def test_readme_policy_example(write_yaml, tmp_path):
    code, yaml_block = _extending_blocks()
    assert 20 <= len(code.strip().splitlines()) <= 40
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    try:
        report = check_component("policy", "last_item")
        assert "seeded determinism" in report and "checkpoint round-trip" in str(report)
        p = write_yaml("world: {type: chaney, n_users: 80, n_items: 60, dim: 6}\nsteps: 5\nk: 4\n" + yaml_block)
        run_scenario(p, tmp_path / "run", progress=False)
        df = pl.read_parquet(tmp_path / "run" / "metrics.parquet")
        assert set(df["policy"].unique()) == {"last_item"}
        assert df.filter(pl.col("metric") == "utility")["value"].sum() > 0
    finally:
        _REGISTRY["policy"].pop("last_item", None)
