#!/usr/bin/env bash
# The main job from a fresh clone: meta-train, export + sign, broker, agent, simulated line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
bash scripts/ensure_mosquitto.sh
exec .venv/bin/python scripts/demo.py "$@"
