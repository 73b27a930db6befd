#!/usr/bin/env bash
# The fleet benchmark (BENCHMARKS.md): a local Mosquitto, then `gpulet fleet-sim` with N
# nodes for D, reporting the fleet process's figures and the broker's CPU and memory.
# Usage: agent/benches/fleet-sim.sh N [DURATION] [extra fleet-sim flags, e.g. --fsync]
# BROKER_EXTRA adds lines to the broker's config (e.g. 'max_queued_messages 0').
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:?usage: fleet-sim.sh N [DURATION] [flags]}
duration=${2:-60s}
shift $(( $# >= 2 ? 2 : 1 ))
PATH="$PATH:/usr/sbin"
cargo build --release --locked -p gpulet >&2
dir=$(mktemp -d)
chmod 755 "$dir"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# A stock broker: defaults but for the listener (and anonymous access, on loopback).
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n%b\n' "$port" "${BROKER_EXTRA:-}" > "$dir/mosquitto.conf"
mosquitto -c "$dir/mosquitto.conf" > "$dir/mosquitto.log" 2>&1 &
broker=$!
trap 'kill $broker 2>/dev/null; rm -rf "$dir"' EXIT
sleep 0.5
ticks() { awk '{ print $14 + $15 }' "/proc/$broker/stat"; }
t0=$(date +%s.%N); c0=$(ticks)
ulimit -n "$(ulimit -Hn)"
rc=0
./target/release/gpulet fleet-sim --nodes "$n" --broker "mqtt://127.0.0.1:$port" --duration "$duration" --dir "$dir/outboxes" "$@" || rc=$?
t1=$(date +%s.%N); c1=$(ticks)
rss=$(awk '/VmHWM/ { print $2 }' "/proc/$broker/status")
awk -v c="$((c1 - c0))" -v t0="$t0" -v t1="$t1" -v rss="$rss" \
    'BEGIN { printf "mosquitto: %.1f%% of one core over the whole run, peak RSS %.0f MiB\n", c / (t1 - t0), rss / 1024 }'
echo "mosquitto: $(grep -c 'dropped' "$dir/mosquitto.log" || true) log lines about dropped messages"
exit $rc
