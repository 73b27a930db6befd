#!/usr/bin/env bash
# Log lines per hour in steady state (BENCHMARKS.md, issue 11): `gpulet run` (release)
# with examples/plugins.toml (a simulated node under a budget with the three shipped
# plugins) at the default log level for SECONDS (default 720: past the first 10-minute
# summary), counting the lines after the first minute and scaling them to an hour.
# Usage: agent/benches/log-volume.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-720}
cargo build --release --locked -p gpulet >&2
cargo build --locked -p gpulet-plugin-artifacts >&2
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
# The example's state and cache folders are the system's; keep this run's apart.
sed -e "s|^path = \"../target|path = \"$PWD/target|" examples/plugins.toml > "$dir/plugins.toml"
python3 - "$dir/plugins.toml" "$dir" <<'PY'
import re, sys
p, d = sys.argv[1], sys.argv[2]
s = open(p).read()
s = re.sub(r'(?m)^cache_dir = .*$', f'cache_dir = "{d}/cache"', s)
s = re.sub(r'(?m)^state_dir = .*$', f'state_dir = "{d}/state"', s)
if 'cache_dir' not in s:
    s = s.replace('[plugins]', f'[plugins]\ncache_dir = "{d}/cache"\nstate_dir = "{d}/state"', 1)
open(p, 'w').write(s)
PY
start=$(date +%s.%N)
timeout --signal=TERM "$secs" ./target/release/gpulet run --config "$dir/plugins.toml" \
    > /dev/null 2> "$dir/log" || true
python3 - "$dir/log" "$secs" <<'PY'
import sys, datetime
path, secs = sys.argv[1], float(sys.argv[2])
lines = [l for l in open(path) if l.strip()]
def ts(l):
    return datetime.datetime.fromisoformat(l.split()[0].replace('Z', '+00:00'))
t0 = ts(lines[0])
steady = [l for l in lines if (ts(l) - t0).total_seconds() >= 60]
levels = {}
for l in lines:
    lv = l.split()[1]
    levels[lv] = levels.get(lv, 0) + 1
hours = (secs - 60) / 3600
print(f"{len(lines)} lines in {secs:.0f} s ({levels}); after the first minute: {len(steady)} lines"
      f" = {len(steady) / hours:.0f} lines an hour")
PY
