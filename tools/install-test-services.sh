#!/usr/bin/env bash
# The real servers the tests talk to: Debian's Mosquitto (MQTT broker) and Chromium (the
# live view's browser test). Tests start their own instances on free loopback ports; a
# missing one makes its tests skip on a developer machine and fail in CI.
set -euo pipefail
need=()
[ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  # not root, or not Debian: the package still installs; the tests that need these skip
  echo "note: ${need[*]} not installed; as root on Debian: apt-get install ${need[*]}" >&2
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
