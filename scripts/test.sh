#!/usr/bin/env bash
# Set up, then run the tests: the fast tier, then the slow tier on the bundled real models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
$PY -m pytest -q
$PY -m pytest -q -m slow
