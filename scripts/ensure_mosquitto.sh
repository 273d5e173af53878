#!/usr/bin/env bash
# The tests and the demo start their own mosquitto on a free port; they only need the binary.
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing mosquitto (apt-get)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto >/dev/null 2>&1 || {
    apt-get update -q >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto >/dev/null
  }
  # The Debian package starts a system broker on 1883; ours run on free ports, so it is not needed.
  (systemctl disable --now mosquitto >/dev/null 2>&1 || service mosquitto stop >/dev/null 2>&1 || true)
else
  echo "mosquitto is required: install it with 'sudo apt-get install -y mosquitto' (Debian/Ubuntu)" >&2
  exit 1
fi
