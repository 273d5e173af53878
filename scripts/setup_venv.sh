#!/usr/bin/env bash
# Create .venv (once) with the workstation, edge and dev extras. torch is pinned to exactly 2.13.0 in
# pyproject.toml: an open range would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e '.[train,edge,dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
