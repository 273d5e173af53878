#!/usr/bin/env bash
# The whole test suite, from a fresh clone: venv, mosquitto, pytest, then the torch-free edge install.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
bash scripts/ensure_mosquitto.sh
bash scripts/ensure_strace.sh
export CWRU_DATA=${CWRU_DATA:-$(cd .. && pwd)/shared/data/cwru}
.venv/bin/python -m pytest -q "$@"
if [ $# -eq 0 ]; then
  bash scripts/edge_torch_free_check.sh
fi
