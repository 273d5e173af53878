#!/usr/bin/env bash
# The device never has torch: build a fresh venv with only the `edge` extra (+ pytest, + onnx for the
# test fixture that writes a bundle with onnx.helper), check torch is not even installable-by-accident,
# and run tests/edge there with EDGE_ASSERT_NO_TORCH=1 (tests/edge/conftest.py fails the session if
# anything imported torch).
#
#   scripts/edge_torch_free_check.sh            # venv in a temp dir, removed afterwards
#   EDGE_VENV=.venv-edge scripts/edge_torch_free_check.sh   # keep/reuse a venv (CI caching)
#   PYTHON=python3.11 ...                        # interpreter to build the venv from
#   extra pytest args are passed through: scripts/edge_torch_free_check.sh -k config
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if [[ -n "${EDGE_VENV:-}" ]]; then
    VENV="$EDGE_VENV"
else
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    VENV="$TMP/venv"
fi

echo "== venv $VENV from $($PYTHON --version)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
# pip's own config on this machine points at the local wheel caches/indexes; nothing else is needed.
# (pip warns about every index directory it cannot find; that noise is filtered, real errors are not)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$REPO[edge]" pytest onnx \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

echo "== torch must not be installed"
"$VENV/bin/python" - <<'PY'
import importlib.util, sys
if importlib.util.find_spec("torch") is not None:
    sys.exit("FAIL: torch is installed in the edge venv (a dependency pulled it in)")
print("ok: no torch")
PY

echo "== edge_agent imports without torch, meta_train or export"
"$VENV/bin/python" - <<'PY'
import sys
import edge_agent.agent, edge_agent.cli, edge_agent.config, edge_agent.model, edge_agent.protocol  # noqa: E401
import edge_agent.simulator, edge_agent.state, edge_agent.transport, edge_agent.verify  # noqa: E401
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "meta_train", "export"))
if bad:
    sys.exit(f"FAIL: imported {bad}")
print("ok:", len(sys.modules), "modules, none of torch/meta_train/export")
PY

echo "== tests/edge in the edge venv"
cd "$REPO"
EDGE_ASSERT_NO_TORCH=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/edge "$@"
