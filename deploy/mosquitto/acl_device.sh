#!/usr/bin/env bash
# Print the ACL block of one edge agent: acl_device.sh <line> <device>  >> /etc/mosquitto/acl
# <device> is the agent's broker.username, <device>-out its broker.outbound_username,
# topic_prefix factory/<line>/<device>. Least privilege: inputs read-only, outputs write-only.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 <line> <device>" >&2
  exit 2
fi
line=$1 device=$2
case "$line$device" in
  *[!A-Za-z0-9_.-]*|'') echo "line and device: letters, digits, '_', '.', '-' only" >&2; exit 2 ;;
esac
prefix="factory/$line/$device"
cat <<ACL

user $device
topic read $prefix/samples
topic read $prefix/labels
topic read $prefix/context
topic read $prefix/commands
topic write $prefix/status

user $device-out
topic write $prefix/predictions
topic write $prefix/alarms
topic write $prefix/errors
topic write $prefix/status
ACL
