#!/usr/bin/env bash
# What `gpulet top` costs watching a large fleet (BENCHMARKS.md, issue 11): a local
# Mosquitto, `gpulet fleet-sim --nodes N` (default 5000, 8 GPUs each, 1 Hz), and beside
# it `gpulet top` for WINDOW seconds (default 60) once the fleet is up: the JSON snapshot
# mode (`--once --json --wait`: the same ingest as the interactive view, no drawing)
# and the interactive view in a tmux terminal (ingest and a redraw every 0.5 s). For
# each: CPU share of one core and peak RSS from /proc, and the snapshot's node count.
# Usage: agent/benches/fleet-top.sh [N] [WINDOW]
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-5000}
window=${2:-60}
PATH="$PATH:/usr/sbin"
cargo build --release --locked -p gpulet >&2
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\n' "$port" > "$dir/mosquitto.conf"
mosquitto -c "$dir/mosquitto.conf" > "$dir/mosquitto.log" 2>&1 &
broker=$!
session="gpulet-top-bench-$$"
trap 'tmux kill-session -t "$session" 2>/dev/null; kill $broker $fleet 2>/dev/null; rm -rf "$dir"' EXIT
sleep 0.5
ulimit -n "$(ulimit -Hn)"
total=$((window * 2 + 60))
./target/release/gpulet fleet-sim --nodes "$n" --broker "mqtt://127.0.0.1:$port" --duration "${total}s" --dir "$dir/outboxes" > "$dir/fleet.json" 2>&1 &
fleet=$!
sleep 30   # every node connected and publishing
cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

./target/release/gpulet top --broker "mqtt://127.0.0.1:$port" --once --json --wait "${window}s" > "$dir/snap.json" &
top=$!
sleep 1; c0=$(cpu $top); t0=$(date +%s.%N)
sleep $((window - 2)); c1=$(cpu $top); t1=$(date +%s.%N); rss=$(awk '/VmHWM/ { print $2 }' "/proc/$top/status")
wait $top
python3 - "$dir/snap.json" "$c0" "$c1" "$t0" "$t1" "$hz" "$rss" once <<'PY'
import json, sys
snap, c0, c1, t0, t1, hz, rss, mode = sys.argv[1:]
s = json.load(open(snap))["summary"]
cpu = (float(c1) - float(c0)) / float(hz) / (float(t1) - float(t0))
print(f"top --once --json: {100*cpu:.1f}% of one core, peak RSS {int(rss)/1024:.0f} MiB; nodes {s['nodes']} ({s['online']} online), {s['messages']} messages")
PY

tmux new-session -d -s "$session" -x 200 -y 50 "./target/release/gpulet top --broker mqtt://127.0.0.1:$port"
sleep 2
top=$(tmux list-panes -t "$session" -F '#{pane_pid}')
c0=$(cpu $top); t0=$(date +%s.%N)
sleep "$window"
c1=$(cpu $top); t1=$(date +%s.%N); rss=$(awk '/VmHWM/ { print $2 }' "/proc/$top/status")
tmux capture-pane -p -t "$session" | head -2
python3 -c "import sys; c0,c1,t0,t1,hz,rss=map(float,sys.argv[1:]); print(f'top (interactive, tmux): {100*(c1-c0)/hz/(t1-t0):.1f}% of one core, peak RSS {rss/1024:.0f} MiB')" "$c0" "$c1" "$t0" "$t1" "$hz" "$rss"
