#!/usr/bin/env bash
# Run "$@" in a private mount namespace whose /sys/class/drm holds a fake, half-described GPU card.
# onnxruntime 1.32 then prints its coloured "Failed to detect devices" warning on stderr at import,
# the way it does on devices with unusual DRM drivers. Needs root (unshare -m); the namespace and its
# mounts vanish with the process. Usage: unshare -m bash fake_gpu_sysfs.sh CMD...
set -euo pipefail
real=$(mktemp -d)
mount --bind /sys/class "$real"
mount -t tmpfs none /sys/class
for d in "$real"/*; do
  mkdir -p "/sys/class/$(basename "$d")"
  mount --bind "$d" "/sys/class/$(basename "$d")"
done
mkdir -p /sys/class/drm/card0/device
echo 0x8086 > /sys/class/drm/card0/device/vendor
exec "$@"
