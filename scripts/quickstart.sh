#!/usr/bin/env bash
# Set up, then run the quickstart recipe on the bundled default model and data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
d2d run recipes/quickstart.yaml "$@"
