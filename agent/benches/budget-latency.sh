#!/usr/bin/env bash
# How soon a budget decrease is in force (BENCHMARKS.md, issue 11): `gpulet run`
# (release) on the plugins example (8 simulated H100s, three plugins, tick 1 s) with its
# control socket; N times (default 50), at a random point of the tick period, the budget
# is lowered (3360 W -> 2400 W) over the socket, and the time is taken from sending the
# request to the first status whose enforced limits (read back from the GPUs) fit the new
# budget; the budget is then raised again. Before the change in issue 11 a decrease waited
# for the next tick: up to a whole tick period (1 s).
# Usage: agent/benches/budget-latency.sh [N]
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-50}
cargo build --release --locked -p gpulet >&2
cargo build --locked -p gpulet-plugin-artifacts >&2
dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
sed -e "s|^path = \"../target|path = \"$PWD/target|" \
    -e "s|^cache_dir = .*|cache_dir = \"$dir/cache\"|" \
    -e "s|^state_dir = .*|state_dir = \"$dir/state\"|" examples/plugins.toml > "$dir/c.toml"
printf '[telemetry]\nsink = "none"\n[socket]\npath = "%s/gpulet.sock"\n' "$dir" >> "$dir/c.toml"
./target/release/gpulet run --config "$dir/c.toml" >/dev/null 2>"$dir/log" &
pid=$!
python3 - "$dir/gpulet.sock" "$n" <<'PY'
import json, random, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
def ask(req):
    s = socket.socket(socket.AF_UNIX); s.connect(path)
    s.sendall((json.dumps(req) + "\n").encode())
    buf = b""
    while not buf.endswith(b"\n"):
        buf += s.recv(65536)
    s.close()
    return json.loads(buf)
for _ in range(100):
    try:
        if ask({"op": "status"})["status"]["ticks"] > 3: break
    except OSError: pass
    time.sleep(0.1)
lat = []
for i in range(n):
    time.sleep(random.uniform(1.0, 2.0))          # a random phase of the 1 s tick
    t0 = time.monotonic()
    assert ask({"op": "set-power-budget", "watts": 2400})["ok"]
    while True:
        st = ask({"op": "status"})["status"]
        if sum(g["limit_w"] for g in st["gpus"]) <= 2400 + 1e-6: break
    lat.append((time.monotonic() - t0) * 1000)
    ask({"op": "set-power-budget", "watts": None})
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
print(f"decreases: {len(lat)}  p50 {q(0.5):.1f} ms  p90 {q(0.9):.1f} ms  p99 {q(0.99):.1f} ms  max {lat[-1]:.1f} ms  (tick period 1000 ms)")
PY
