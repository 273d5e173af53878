#!/usr/bin/env bash
# tests/edge/test_egress.py runs the agent under `strace -f -e trace=network` to prove it contacts
# nothing but the broker; without strace that test skips, so CI must have it.
set -euo pipefail
if command -v strace >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing strace (apt-get)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q strace >/dev/null 2>&1 || {
    apt-get update -q >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q strace >/dev/null
  }
else
  echo "strace is needed for the egress test: install it with 'sudo apt-get install -y strace'" >&2
  exit 1
fi
