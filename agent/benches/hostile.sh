#!/usr/bin/env bash
# Hostile plugins against the tick rate (BENCHMARKS.md, issue 10): `gpulet run` (release)
# on a simulated 8-GPU node at the nominal 1 s tick for N ticks (default 60), once with no
# plugin and once with seven misbehaving ones (the fixture's trap, trap-once, print,
# print-loop, sleep, kv-flood and huge modes, each with a 20 ms deadline and a quarantine
# threshold of 100 faults, so they fault on every tick). Reports the mean tick period from
# the records' timestamps, side by side, and the slowest tick.
# Usage: agent/benches/hostile.sh [TICKS]
set -euo pipefail
cd "$(dirname "$0")/../.."
ticks=${1:-60}
cargo build --release --locked -p gpulet >&2
# Builds the plugins (plugins/artifacts' build script) into target/plugins.
cargo build --locked -p gpulet-plugin-artifacts >&2
fixture=$PWD/target/plugins/wasm32-wasip2/plugin/fixture.wasm
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
node='[[sim.gpu]]
preset = "h100-sxm"
workload = "training"
count = 8
[power]
budget_w = 4000
[plugins]
cache_dir = "c"
state_dir = "s"
max_failures = 100'
printf '%s\n' "$node" > "$dir/none.toml"
printf '%s\n' "$node" > "$dir/hostile.toml"
for m in trap trap-once print print-loop sleep kv-flood huge; do
    printf '[[plugin]]\nname = "%s"\npath = "%s"\nconfig = { mode = "%s" }\ngrants = ["lower"]\n' \
        "$m" "$fixture" "$m" >> "$dir/hostile.toml"
done
run() {
    ./target/release/gpulet run --config "$dir/$1.toml" --ticks "$ticks" 2>/dev/null > "$dir/$1.jsonl"
    python3 - "$1" "$dir/$1.jsonl" "$ticks" <<'PY'
import json, sys
name, path, ticks = sys.argv[1], sys.argv[2], int(sys.argv[3])
recs = [json.loads(l) for l in open(path)]
ts = [r["ts_ms"] for r in recs]
faults = sum(1 for r in recs for e in r.get("events", []) if e["kind"] == "plugin-fault")
period = (ts[-1] - ts[0]) / (len(ts) - 1)
slowest = max(r["agent"]["tick_us"] for r in recs)
print(f"{name:8} {len(recs)} ticks, mean period {period:.1f} ms ({(period / 1000 - 1) * 100:+.2f}% of nominal), "
      f"slowest tick {slowest / 1000:.1f} ms, {faults} plugin faults")
PY
}
run none
run hostile
