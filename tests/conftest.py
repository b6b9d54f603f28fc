import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:  # torch is optional for most tests
    pass

TINY = """
name: tiny
seed: 3
steps: 12
k: 5
world: {type: chaney, n_users: 150, n_items: 120, dim: 8, n_creators: 6}
users:
  choice: {type: mnl, temperature: 0.02, no_click_utility: 0.05, position_bias: 0.5}
  dynamics: [{type: drift, rate: 0.05}]
creators: {type: trecs, creation_prob: 0.2}
policies:
  pop: {type: popularity}
  ideal: {type: ideal}
  mf: {type: als, factors: 8, iterations: 5}
retrain: {every: 3}
initial_log: {interactions_per_user: 3}
metrics: {pairs: 50, user_sample: 60, regret_sample: 30}
output: {checkpoint_every: 4, flush_every: 2}
"""


@pytest.fixture
def write_yaml(tmp_path: Path):
    def _write(text: str, name: str = "scenario.yaml") -> Path:
        p = tmp_path / name
        p.write_text(textwrap.dedent(text))
        return p

    return _write


@pytest.fixture
def tiny_yaml(write_yaml) -> Path:
    return write_yaml(TINY, "tiny.yaml")
