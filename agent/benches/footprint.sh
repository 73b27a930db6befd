#!/usr/bin/env bash
# What the agent costs when nothing happens (BENCHMARKS.md, issue 11): `gpulet run`
# (release) on the plugins example (8 simulated GPUs under a budget, tick 1 s) for
# SECONDS (default 60) in four configurations, each built on the one before:
#   sim        the simulator only
#   plugins    + the three shipped plugins
#   mqtt       + MQTT to a local Mosquitto (started here on a free port)
#   service    + the metrics endpoint (scraped every 15 s, as Prometheus does by default)
#              and the control socket (`gpulet status` every 15 s)
# For each: CPU share of one core (utime + stime from /proc/PID/stat over the run, after
# a 5 s warm-up), peak RSS (VmHWM) and threads.
# Usage: agent/benches/footprint.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-120}
cargo build --release --locked -p gpulet >&2
cargo build --locked -p gpulet-plugin-artifacts >&2
PATH="$PATH:/usr/sbin"
dir=$(mktemp -d)
broker=""
trap '[ -n "$broker" ] && kill "$broker" 2>/dev/null; rm -rf "$dir"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" > "$dir/mosquitto.conf"
mosquitto -c "$dir/mosquitto.conf" >/dev/null 2>&1 &
broker=$!

# The plugins example with this run's own state, cache and socket.
base() {
    sed -e "s|^path = \"../target|path = \"$PWD/target|" \
        -e "s|^cache_dir = .*|cache_dir = \"$dir/cache\"|" \
        -e "s|^state_dir = .*|state_dir = \"$dir/state\"|" examples/plugins.toml
}
config() {
    local name=$1
    case $name in
    sim) base | python3 -c 'import re,sys; s=sys.stdin.read(); print(re.sub(r"(?ms)^\[\[plugin\]\].*?(?=^\[sim\])", "", s))' ;;
    plugins) base ;;
    mqtt) base; printf '[mqtt]\nurl = "mqtt://127.0.0.1:%s"\nstate_dir = "%s/mqtt"\n' "$port" "$dir" ;;
    service) base; printf '[mqtt]\nurl = "mqtt://127.0.0.1:%s"\nstate_dir = "%s/mqtt2"\n[metrics]\nenabled = true\nlisten = "127.0.0.1:%s"\n' "$port" "$dir" "$mport" ;;
    esac
    printf '[telemetry]\nsink = "none"\n[socket]\npath = "%s/gpulet.sock"\n' "$dir"
}

hz=$(getconf CLK_TCK)
printf '%-9s %10s %12s %12s %8s\n' config "cpu %" "ms cpu / s" "peak RSS MiB" threads
for name in sim plugins mqtt service; do
    config "$name" > "$dir/$name.toml"
    [ "$name" = service ] || sed -i 's/^\[socket\]$/[socket]\nenabled = false/' "$dir/$name.toml"
    ./target/release/gpulet run --config "$dir/$name.toml" >/dev/null 2>"$dir/$name.log" &
    pid=$!
    sleep 5
    t0=$(awk '{print $14 + $15}' /proc/$pid/stat)
    w0=$(date +%s.%N)
    end=$(( $(date +%s) + secs ))
    while [ "$(date +%s)" -lt "$end" ]; do
        if [ "$name" = service ]; then
            curl -s "127.0.0.1:$mport/metrics" >/dev/null || true
            ./target/release/gpulet status --socket "$dir/gpulet.sock" >/dev/null 2>&1 || true
        fi
        sleep 15 & wait $! || true
    done
    t1=$(awk '{print $14 + $15}' /proc/$pid/stat)
    w1=$(date +%s.%N)
    hwm=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
    threads=$(awk '/Threads/ {print $2}' /proc/$pid/status)
    kill $pid; wait $pid || true
    python3 - "$name" "$t0" "$t1" "$w0" "$w1" "$hz" "$hwm" "$threads" <<'PY'
import sys
name, t0, t1, w0, w1, hz, hwm, threads = sys.argv[1:]
cpu = (float(t1) - float(t0)) / float(hz)
wall = float(w1) - float(w0)
print(f"{name:<9} {100 * cpu / wall:>10.3f} {1000 * cpu / wall:>12.2f} {int(hwm) / 1024:>12.1f} {threads:>8}")
PY
done
