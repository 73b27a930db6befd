#!/usr/bin/env bash
# The job queue's local latencies (BENCHMARKS.md, issue 12): `gpulet run` (release) on 8
# simulated H100s, tick 1 s, with the queue on and its control socket.
# 1. Submit-to-start on an idle node, N times (default 50), at random points of the tick
#    period: from sending `submit` to the job's process running (its `started_ms`, taken
#    by the agent right after the spawn, against the client's clock before sending),
#    and the reply's round trip. Target: under one tick (1 s).
# 2. `jobs` with 1,000 jobs queued (one running job holds all 8 GPUs): the socket
#    request's round trip, and `gpulet jobs --json` as a user runs it (the CLI's start
#    included), 20 times each.
# Usage: agent/benches/jobs-latency.sh [N]
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-50}
cargo build --release --locked -p gpulet >&2
dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null; pkill -f "sleep 3600" 2>/dev/null; rm -rf "$dir"' EXIT
cat > "$dir/c.toml" <<TOML
node = "bench"
backend = "sim"
tick = "1s"
[telemetry]
sink = "none"
[socket]
path = "$dir/gpulet.sock"
[jobs]
enabled = true
dir = "$dir/jobs"
max_queue = 2000
allow_root = true
TOML
./target/release/gpulet run --config "$dir/c.toml" >/dev/null 2>"$dir/log" &
pid=$!
python3 - "$dir/gpulet.sock" "$n" "$PWD/target/release/gpulet" <<'PY'
import json, random, socket, statistics, subprocess, sys, time
path, n, gpulet = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def ask(req):
    s = socket.socket(socket.AF_UNIX); s.connect(path)
    s.sendall((json.dumps(req) + "\n").encode())
    buf = b""
    while not buf.endswith(b"\n"):
        buf += s.recv(1 << 20)
    s.close()
    return json.loads(buf)
for _ in range(100):
    try:
        ask({"op": "jobs"}); break
    except OSError: time.sleep(0.1)
time.sleep(2)
start, rtt = [], []
for i in range(n):
    time.sleep(random.uniform(0, 1))
    t0 = time.time() * 1000
    r = ask({"op": "submit", "command": ["true"], "cwd": "/tmp"})
    t1 = time.time() * 1000
    job = r["job"]
    if job["started_ms"] is None:
        for _ in range(40):
            time.sleep(0.05)
            job = ask({"op": "job", "job": job["id"]})["job"]
            if job["started_ms"] is not None: break
    start.append(job["started_ms"] - t0)
    rtt.append(t1 - t0)
def show(name, xs):
    xs = sorted(xs)
    p = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]
    print(f"{name}: n={len(xs)} p50={p(0.5):.1f} ms p99={p(0.99):.1f} ms max={xs[-1]:.1f} ms")
show("submit to start (idle node)", start)
show("submit round trip", rtt)
# 1,000 queued behind a job that holds every GPU.
ask({"op": "submit", "command": ["sleep", "3600"], "cwd": "/tmp", "gpus": 8})
for i in range(1000):
    r = ask({"op": "submit", "command": ["true"], "cwd": "/tmp", "gpus": 8, "env": {"I": str(i)}})
    assert r["ok"], r
listed = ask({"op": "jobs"})
assert len(listed["jobs"]) == 1001, len(listed["jobs"])
socket_ms, cli_ms = [], []
for _ in range(20):
    t0 = time.perf_counter(); ask({"op": "jobs"}); socket_ms.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    subprocess.run([gpulet, "jobs", "--json", "--socket", path], check=True, stdout=subprocess.DEVNULL)
    cli_ms.append((time.perf_counter() - t0) * 1000)
show("jobs with 1,001 jobs, socket round trip", socket_ms)
show("gpulet jobs --json with 1,001 jobs", cli_ms)
PY
