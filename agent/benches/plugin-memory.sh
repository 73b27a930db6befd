#!/usr/bin/env bash
# The agent's memory with a policy that carries an interpreter (BENCHMARKS.md, issue 13):
# `gpulet run` on a simulated 8 × H100 node with one power plugin, Python
# (examples/python-policy), JavaScript (examples/js-policy, with and without
# `recycle_mib`) or Rust (idle-saver), ticking every 20 ms for SECONDS (default 120,
# ~6,000 calls). For each: the first run, which compiles into an empty cache (its peak is
# the compiler; its resident set once it is done), then a restart from the cache: peak
# and final resident set, split anonymous / file-backed, from /proc/PID/status.
# Usage: agent/benches/plugin-memory.sh [SECONDS]   (BIN=path/to/gpulet to skip the build)
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-120}
if [ -z "${BIN:-}" ]; then
    cargo build --release --locked -p gpulet >&2
    BIN=$PWD/target/release/gpulet
fi
for ex in python-policy js-policy; do
    [ -f "examples/$ex/policy.wasm" ] || "examples/$ex/build.sh" >&2
done
# The building of gpulet builds the shipped plugins here (plugins/artifacts).
rust=$PWD/target/plugins/wasm32-wasip2/plugin/idle_saver.wasm
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

# run NAME WASM MEMORY_MIB EXTRA SECONDS: start the agent, wait, print its /proc figures.
run() {
    cat > "$dir/$1.toml" <<TOML
tick = "20ms"
[socket]
enabled = false
[[sim.gpu]]
preset = "h100-sxm"
workload = "training"
count = 8
[plugins]
cache_dir = "cache-$1"
state_dir = "state-$1"
[[plugin]]
name = "policy"
path = "$2"
grants = ["lower", "raise"]
memory_mib = $3
deadline = "100ms"
$4
TOML
    (cd "$dir" && exec "$BIN" run --config "$1.toml" --log-level warn > "$1.out" 2>&1) &
    local pid=$!
    sleep "$5"
    local pid_agent
    pid_agent=$(pgrep -P "$pid" -f "gpulet run" || echo "$pid")
    awk '/VmHWM|VmRSS|RssAnon|RssFile/ { printf "%s %.1f MB  ", $1, $2 / 1000 }' "/proc/$pid_agent/status"
    kill -INT "$pid_agent" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    printf 'faults %s\n' "$(grep -o '"plugin_faults":[0-9]*' "$dir/$1.out" | tail -1 | cut -d: -f2)"
}

for spec in "python $PWD/examples/python-policy/policy.wasm 32 x" \
            "js $PWD/examples/js-policy/policy.wasm 256 x" \
            "js-recycled $PWD/examples/js-policy/policy.wasm 256 recycle_mib=16" \
            "rust $rust 64 x"; do
    read -r name wasm mib extra <<< "$spec"
    [ -n "$wasm" ] && [ -f "$wasm" ] || { echo "$name: no component ($wasm)"; continue; }
    [ "$extra" = x ] && extra=""
    extra=${extra/=/ = }
    printf '%-12s first run (compiles), after 90 s:  ' "$name"; run "$name" "$wasm" "$mib" "$extra" 90
    printf '%-12s from the cache, after %s s:     ' "$name" "$secs"; run "$name" "$wasm" "$mib" "$extra" "$secs"
done
