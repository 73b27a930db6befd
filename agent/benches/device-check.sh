#!/usr/bin/env bash
# The device check (issue 5), for a machine with NVIDIA GPUs: what the NVML backend sees
# and does on real hardware, next to nvidia-smi. Results go to $OUT (the device tool's
# output folder) or ./device-check-out. Nothing here needs root; setting a power limit
# does, and without it the permission error is what gets recorded.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-device-check-out}
mkdir -p "$out"
exec > >(tee "$out/device-check.log") 2>&1

cargo build --release --locked -p gpulet
bin=$PWD/target/release/gpulet
nvidia-smi -L | tee "$out/nvidia-smi-L.txt"

echo "== inventory"
"$bin" inventory --backend nvml | tee "$out/inventory.txt"
"$bin" inventory --backend nvml --json > "$out/inventory.json"

echo "== 30 s of telemetry at 10 Hz, next to nvidia-smi at 10 Hz"
cat > "$out/run.toml" <<TOML
backend = "nvml"
tick = "100ms"
[telemetry]
sink = "file"
path = "telemetry.jsonl"
[nvml]
state_dir = "nvml-state"
[calibration]
file = "calibration.json"
TOML
nvidia-smi --query-gpu=timestamp,index,power.draw,power.limit,temperature.gpu,utilization.gpu,clocks.sm,memory.used \
    --format=csv -lms 100 > "$out/nvidia-smi.csv" &
smi=$!
"$bin" run --config "$out/run.toml" --ticks 300 2> "$out/run.log" &
agent=$!
sleep 28
ps -o pid,rss,vsz,cputime,etimes,args -p "$agent" | tee "$out/agent-ps.txt" || true
wait "$agent"
kill "$smi" || true
echo "records: $(wc -l < "$out/telemetry.jsonl")"
python3 - "$out" <<'PY'
import csv, json, sys, statistics
out = sys.argv[1]
recs = [json.loads(l) for l in open(f"{out}/telemetry.jsonl")]
print("agent tick_us: median", statistics.median(r["agent"]["tick_us"] for r in recs[1:]),
      "max", max(r["agent"]["tick_us"] for r in recs[1:]))
smi = {}
for row in csv.reader(open(f"{out}/nvidia-smi.csv")):
    if row[0].startswith("timestamp"):
        continue
    try:
        smi.setdefault(int(row[1]), []).append(float(row[2].split()[0]))
    except (ValueError, IndexError):
        pass
for g in sorted(smi):
    ours = [r["gpus"][g]["power_w"] for r in recs if r["gpus"][g]["power_w"] is not None]
    print(f"GPU {g}: mean power gpulet {statistics.mean(ours):.1f} W, nvidia-smi {statistics.mean(smi[g]):.1f} W")
PY

echo "== set a power limit on GPU 0 and put it back"
orig=$(nvidia-smi -i 0 --query-gpu=power.limit --format=csv,noheader,nounits | cut -d. -f1)
min=$(nvidia-smi -i 0 --query-gpu=power.min_limit --format=csv,noheader,nounits | cut -d. -f1)
target=$(( (orig + min) / 2 ))
for w in "$target" "$orig"; do
    printf 'backend = "nvml"\ntick = "100ms"\n[telemetry]\nsink = "stdout"\n[nvml]\nstate_dir = "nvml-state"\n[[power.gpu]]\nindex = 0\nlimit_w = %s\n' "$w" > "$out/limit.toml"
    "$bin" run --config "$out/limit.toml" --ticks 5 2>> "$out/limit.log" \
        | grep -o '"kind":"limit-[a-z]*"[^}]*' | tee -a "$out/limit-events.txt" || true
    nvidia-smi -i 0 --query-gpu=power.limit --format=csv,noheader | tee -a "$out/limit-events.txt"
done

echo "== diag (CUDA: memory written and read back, the kernel checked against the CPU)"
"$bin" diag 2>&1 | tee "$out/diag.txt" || true

echo "== calibrate (5 limits, 2 s warm-up and 4 s measured each; the limits are put back)"
"$bin" calibrate --config "$out/run.toml" --steps 5 --warmup 2s --measure 4s 2>&1 \
    | tee "$out/calibrate.txt" || true
nvidia-smi --query-gpu=index,power.limit --format=csv | tee "$out/limits-after.txt"
echo "done: $out"
