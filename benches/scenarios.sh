#!/usr/bin/env bash
# The end-to-end scenarios of BENCHMARKS.md (issue #8): a real gateway pinned to one core,
# nbiot-load pinned to the other, a fresh store per run. Prints one JSON summary per run
# (nbiot-load --json) to stdout and keeps every run's files under $OUT.
#
#   cargo build --release --bins
#   benches/scenarios.sh max        [RUNS]   # CoAP CON saturated: the maximum committed rate
#   benches/scenarios.sh ramp       [RUNS]   # FROM..TO (2000..20000/s) over 60 s, per-second timeline
#   benches/scenarios.sh steady RATE [RUNS]  # CoAP CON at a fixed rate (use 70 % of max)
#   benches/scenarios.sh mqtt RATE  [RUNS]   # MQTT QoS 1 via Mosquitto: gateway, then mosquitto_sub
#   benches/scenarios.sh memory     [RUNS]   # 100k devices, every one sending: RSS per device
#   benches/scenarios.sh million    [RUNS]   # 1M devices registered, then load
#   benches/scenarios.sh overload MAX [RUNS] # 0.7x MAX, 3x MAX surge for SURGE (60s), 0.7x MAX
#   benches/scenarios.sh soak RATE DURATION  # e.g. soak 5000 60m: flat RSS/fds, zero loss
#
# Environment: BIN (default target/release), OUT (default /tmp/nbiot-bench), PAYLOAD
# (em300-th | em400), DURATION (steady/max runs, default 30s), SURGE (default 60s),
# GW_CPU / LOAD_CPU (default 0 / 1), QUIET (seconds to wait for no compiler to run, 120),
# KEEP=1 (keep each run's store; by default it is deleted after the run),
# STORE_EXTRA (more [store] keys, e.g. 'commit_interval = "1ms"').
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}
OUT=${OUT:-/tmp/nbiot-bench}
PAYLOAD=${PAYLOAD:-em300-th}
DURATION=${DURATION:-30s}
SURGE=${SURGE:-60s}
GW_CPU=${GW_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
QUIET=${QUIET:-120}
COAP_PORT=${COAP_PORT:-15683}
HTTP_PORT=${HTTP_PORT:-18080}
MQTT_PORT=${MQTT_PORT:-11883}
case $PAYLOAD in
  em300-th) PROFILE=milesight-em300-th-nb ;;
  em400) PROFILE=milesight-em400-nb ;;
  *) echo "unknown PAYLOAD $PAYLOAD" >&2; exit 2 ;;
esac
mkdir -p "$OUT"

# Waits (at most $QUIET s) until no compiler runs: the machine is shared.
quiet() {
  for _ in $(seq 1 "$QUIET"); do
    if ! pgrep -x rustc >/dev/null && ! pgrep -x cc1 >/dev/null; then return 0; fi
    sleep 1
  done
  echo "warning: compilers still running; measuring anyway" >&2
}

GW_PID=
# start_gw DIR [MQTT_SECTION]: a gateway on a fresh store, pinned to $GW_CPU.
start_gw() {
  local dir=$1 mqtt=${2:-'[mqtt]
mode = "off"'}
  GW_DIR=$dir
  rm -rf "$dir" && mkdir -p "$dir"
  cat >"$dir/gw.toml" <<EOF
[coap]
listen = "127.0.0.1:$COAP_PORT"
$mqtt
[http]
listen = "127.0.0.1:$HTTP_PORT"
[store]
path = "$dir/gateway.db"
${STORE_EXTRA:-}
[profiles]
dir = "$ROOT/device-profiles"
EOF
  RUST_LOG=${RUST_LOG:-warn} taskset -c "$GW_CPU" "$BIN/nbiot-gateway" run --config "$dir/gw.toml" >"$dir/gateway.log" 2>&1 &
  GW_PID=$!
  for _ in $(seq 1 300); do
    if curl -fsS "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "gateway did not start; see $dir/gateway.log" >&2
  exit 1
}

# Stops the gateway; its store is deleted unless KEEP=1 (a run writes gigabytes).
stop_gw() {
  if [ -n "$GW_PID" ]; then
    kill -TERM "$GW_PID" 2>/dev/null || true
    wait "$GW_PID" 2>/dev/null || true
    GW_PID=
  fi
  if [ "${KEEP:-0}" != 1 ] && [ -n "${GW_DIR:-}" ]; then
    rm -f "$GW_DIR"/gateway.db "$GW_DIR"/gateway.db-wal "$GW_DIR"/gateway.db-shm
  fi
}
trap 'stop_gw; [ -n "${MOSQ_PID:-}" ] && kill "$MOSQ_PID" 2>/dev/null; true' EXIT

# nbiot-load prints its summary even when a check fails (it then exits non-zero): keep
# going, the summary says what failed.
load() {
  taskset -c "$LOAD_CPU" "$BIN/nbiot-load" --coap "127.0.0.1:$COAP_PORT" --api "http://127.0.0.1:$HTTP_PORT" \
    --payload "$PAYLOAD" --profile "$PROFILE" --gateway-pid "$GW_PID" --json "$@" ||
    echo "nbiot-load: a check failed (see its summary)" >&2
}

scenario=${1:-}
shift || true
case $scenario in
  max)
    # Offered well above capacity: committed/s is the maximum sustained rate.
    for run in $(seq 1 "${1:-3}"); do
      quiet; start_gw "$OUT/max-$run"
      load --register --devices 10000 --rate "${RATE:-40000}" --duration "$DURATION" --max-retransmit 1 \
        --verify-db "$OUT/max-$run/gateway.db"
      stop_gw
    done ;;
  ramp)
    # A linear ramp: the per-window timeline shows where 5.03s and latency start.
    for run in $(seq 1 "${1:-1}"); do
      quiet; start_gw "$OUT/ramp-$run"
      load --register --devices 10000 --ramp "${FROM:-2000}:${TO:-20000}:60s" --timeline \
        --verify-db "$OUT/ramp-$run/gateway.db"
      stop_gw
    done ;;
  steady)
    rate=$1
    for run in $(seq 1 "${2:-3}"); do
      quiet; start_gw "$OUT/steady-$run"
      load --register --devices 10000 --rate "$rate" --duration "$DURATION" --metrics \
        --verify-db "$OUT/steady-$run/gateway.db"
      stop_gw
    done ;;
  mqtt)
    rate=$1
    for run in $(seq 1 "${2:-3}"); do
      dir="$OUT/mqtt-$run"; rm -rf "$dir"; mkdir -p "$dir/mosq"
      cat >"$dir/mosquitto.conf" <<EOF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages 1000
max_queued_messages 1000000
EOF
      quiet
      taskset -c "$LOAD_CPU" mosquitto -c "$dir/mosquitto.conf" >"$dir/mosquitto.log" 2>&1 &
      MOSQ_PID=$!
      sleep 0.5
      start_gw "$dir/gw" "[mqtt]
mode = \"external\"
url = \"mqtt://127.0.0.1:$MQTT_PORT\""
      load --mode mqtt --mqtt "mqtt://127.0.0.1:$MQTT_PORT" --register --devices 10000 --rate "$rate" \
        --duration "$DURATION" --metrics --verify-db "$dir/gw/gateway.db" --verify-wait 120s
      stop_gw
      # The same load, consumed by mosquitto_sub -q 1 on the gateway's core.
      taskset -c "$LOAD_CPU" "$BIN/nbiot-load" --mode mqtt --mqtt "mqtt://127.0.0.1:$MQTT_PORT" --payload "$PAYLOAD" \
        --devices 10000 --rate "$rate" --duration "$DURATION" --mqtt-baseline-sub --baseline-cpu "$GW_CPU" --json
      kill "$MOSQ_PID"; wait "$MOSQ_PID" 2>/dev/null || true; MOSQ_PID=
    done ;;
  memory)
    # 100k devices, each sending twice within the run (the dedup window holds them all).
    for run in $(seq 1 "${1:-3}"); do
      quiet; start_gw "$OUT/memory-$run"
      load --register --devices 100000 --rate 5000 --duration 40s --verify-db "$OUT/memory-$run/gateway.db"
      stop_gw
    done ;;
  million)
    for run in $(seq 1 "${1:-1}"); do
      quiet; start_gw "$OUT/million-$run"
      load --register --devices 1000000 --rate 5000 --duration 30s --verify-db "$OUT/million-$run/gateway.db"
      stop_gw
    done ;;
  overload)
    max=$1
    lo=$(( max * 7 / 10 )); hi=$(( max * 3 ))
    for run in $(seq 1 "${2:-3}"); do
      quiet; start_gw "$OUT/overload-$run"
      load --register --devices 20000 --schedule "$lo:20s,$hi:$SURGE,$lo:60s" --timeline \
        --verify-db "$OUT/overload-$run/gateway.db"
      stop_gw
    done ;;
  soak)
    rate=$1 duration=$2
    quiet; start_gw "$OUT/soak"
    devices=$(( rate * 2 ))
    load --register --devices "$devices" --rate "$rate" --duration "$duration" --window 10s --timeline \
      --metrics --verify-db "$OUT/soak/gateway.db"
    stop_gw ;;
  *)
    sed -n '2,20p' "$0"; exit 2 ;;
esac
