#!/usr/bin/env bash
# Runs the whole test suite from a fresh machine: installs the Debian packages of the real
# servers the tests start (only those missing; safe to run again), then `cargo test`.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -p nbiot-codecs    # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

# package -> a command it provides
declare -A NEEDED=(
  [mosquitto]=/usr/sbin/mosquitto
  [mosquitto-clients]=mosquitto_pub
  [victoria-metrics]=victoria-metrics
  [prometheus]=promtool
  [prometheus-alertmanager]=prometheus-alertmanager
  [libcoap3-bin]=coap-client-notls
  # tests/ops_systemd.rs: `systemd-analyze verify` of ops/systemd/nbiot-gateway.service
  [systemd]=systemd-analyze
  # tests/ops_backup.rs: the README's online backup, `sqlite3 gateway.db "VACUUM INTO …"`
  [sqlite3]=sqlite3
)
missing=()
for pkg in "${!NEEDED[@]}"; do
  command -v "${NEEDED[$pkg]}" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "test.sh: installing ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # The packages' services are not wanted: the tests start their own instances.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

exec cargo test --workspace "$@"
