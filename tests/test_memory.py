"""Memory stays flat on long runs: peak RSS after ~200 cycles and after 1,000 cycles of a small
scenario differ by less than a small bound (histories are log-structured and deduplicated, the training
log is windowed, per-cycle buffers are reused or dropped)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCENARIO = """
name: memory-flat
seed: 1
steps: 1000
k: 5
world: {type: gaussian_clusters, n_users: 400, n_items: 200, dim: 8, n_clusters: 4, n_creators: 0}
users:
  choice: {type: mnl, temperature: 0.1, no_click_utility: 0.3}
  dynamics: [{type: drift, rate: 0.02}]
  repeat_consumption: true
  organic_rate: 0.05
policy: {type: content}
retrain: {every: 5, warm_start: true, data: window, window: 20}
initial_log: {interactions_per_user: 2, slate_size: 8}
metrics: {pairs: 100, user_sample: 100, regret_sample: 50}
output: {checkpoint_every: 0}
"""

CHILD = """
import json, resource, sys
from recloop.sim.config import load_scenario
from recloop.sim.model import FeedbackLoop

def rss_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0

sc = load_scenario(sys.argv[1])
m = FeedbackLoop(sc, "content", sc.policy, sc.seed)
out = {}
for t in range(1, sc.steps + 1):
    m.step()
    if t in (200, sc.steps):
        out[t] = {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "now": rss_mb(),
                  "history_nnz": int(m.history.nnz), "segments": len(m.history.segments),
                  "log_chunks": len(m.log.chunks)}
print(json.dumps(out))
"""


def test_peak_rss_flat_over_1000_cycles(tmp_path):
    scen = tmp_path / "memory.yaml"
    scen.write_text(textwrap.dedent(SCENARIO))
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    p = subprocess.run([sys.executable, str(script), str(scen)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    early, late = res["200"], res["1000"]
    print(res)
    assert late["peak"] - early["peak"] < 30.0, res
    assert late["now"] - early["now"] < 30.0, res
    assert late["log_chunks"] <= 2 * 20  # the training log is windowed (recommended + organic chunks)
    assert late["segments"] <= 16  # log-structured merge keeps few history segments
    assert late["history_nnz"] <= 400 * 200  # histories are sets
