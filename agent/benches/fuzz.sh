#!/usr/bin/env bash
# The fuzz targets (fuzz/, cargo-fuzz layout), each for a bounded time, reporting the
# executions run (BENCHMARKS.md). Installs cargo-fuzz if missing. libFuzzer's
# instrumentation flags are nightly-only; the pinned stable toolchain accepts them with
# RUSTC_BOOTSTRAP=1 (this is a test tool, never how gpulet itself is built).
# Usage: agent/benches/fuzz.sh [SECONDS per target, default 60]
set -euo pipefail
cd "$(dirname "$0")/../../fuzz"
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz >&2
export RUSTC_BOOTSTRAP=1
for t in command outbox; do
    # A copy of the committed corpus: what the run finds stays out of the tree.
    work=$(mktemp -d)
    cp corpus/$t/* "$work/"
    cargo fuzz run --sanitizer none "$t" "$work" -- -max_total_time="$secs" -print_final_stats=1 2>&1 |
        grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)|ERROR|panicked' || true
    rm -rf "$work"
done
