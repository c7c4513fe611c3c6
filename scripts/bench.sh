#!/usr/bin/env bash
# All of BENCHMARKS.md in one command (issue 5): criterion micro-benches, the in-process ORT ceiling, and the
# end-to-end / cold-start / scale / batching runs against the release server (loopback only, bounded in time).
#
#   scripts/bench.sh            full run (~20 min on 2 shared cores): builds release, writes bench-out/results/tables.md
#   scripts/bench.sh --smoke    tiny counts, no release build: reuses the debug build `cargo test` made
#                               (well under 2 minutes once that build exists); fails only when something is broken
#                               (a crash, a non-2xx answer), never on a number.
#
# Environment: LORKD_BENCH_TASK (warm expert, default retina), LORKD_BENCH_PACKAGE (default models/medmnist-lorkd),
# LORKD_BENCH_DURATION (seconds per wrk run, default 6), LORKD_BENCH_REPEATS (interleaved rounds, default 3), LORKD_BENCH_COUNTS (synthetic packages, default
# 10,100,1000). Outputs under bench-out/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1

export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$root/.ort/lib/libonnxruntime.so.1.31.1}"
package="${LORKD_BENCH_PACKAGE:-models/medmnist-lorkd}"
task="${LORKD_BENCH_TASK:-retina}"
python=.venv/bin/python
[ -x "$python" ] || { echo "bench: .venv missing; run scripts/setup.sh first" >&2; exit 1; }
[ -f "$ORT_DYLIB_PATH" ] || { echo "bench: ONNX Runtime not at $ORT_DYLIB_PATH; run scripts/setup.sh" >&2; exit 1; }
if ! command -v wrk >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bench: installing wrk (Debian package)"
    apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq wrk >/dev/null; }
  else
    echo "bench: wrk not found (apt-get install wrk)" >&2; exit 1
  fi
fi

if [ $smoke = 1 ]; then
  out=bench-out/smoke
else
  out=bench-out/results
fi
rm -rf "$out" "$root/bench-out/criterion-$smoke"
mkdir -p "$out"
export CRITERION_HOME="$root/bench-out/criterion-$smoke"

{
  echo "date:    $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "git:     $(git rev-parse --short HEAD)$(git diff --quiet -- src Cargo.toml || echo ' (src has uncommitted changes)')"
  echo "nproc:   $(nproc)"
  echo "cpu:     $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "memory:  $(free -g | awk '/Mem:/ {print $2 " GiB total, " $7 " GiB available"}')"
  echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min) at start"
  echo "others:  $(ps -eo pcpu,comm --sort=-pcpu | awk 'NR>1 && $1>20 {printf "%s (%s%% CPU) ", $2, $1}')"
} > "$out/machine.txt"
cat "$out/machine.txt"

echo "== merged standalone expert ($task) and synthetic packages"
.venv/bin/lorkd-train export-merged --package "$package" --task "$task" --out "bench-out/merged-$task.onnx" >/dev/null
if [ $smoke = 1 ]; then counts=10; else counts="${LORKD_BENCH_COUNTS:-10,100,1000}"; fi
cold_experts=$([ $smoke = 1 ] && echo 10 || echo 100)
$python scripts/bench/gen_packages.py --source "$package" --out bench-out/packages --counts "$counts,$cold_experts"

export LORKD_BENCH_PACKAGE="$package" LORKD_BENCH_TASK="$task" LORKD_BENCH_MERGED="$root/bench-out/merged-$task.onnx"
export LORKD_BENCH_OUT="$root/$out/ceiling.json"
if [ $smoke = 1 ]; then
  echo "== criterion + ceiling, test mode (debug build of cargo test)"
  cargo test --locked --bench micro --bench ceiling 2>&1 | tee "$out/cargo-bench.log" | grep -v '^\s*$' | tail -40
  binary=target/debug/lorkd
  [ -x "$binary" ] || cargo test --locked --no-run >/dev/null
  e2e_args=(--duration 1 --warmup 1 --repeats 1 --concurrency 1,8 --counts 10 --starts 1 --cold-requests 6
            --cold-experts "$cold_experts" --execution-counts 3,10 --modes auto,mixed --check)
else
  echo "== release build"
  cargo build --release --locked --bin lorkd
  binary=target/release/lorkd
  echo "== criterion micro-benches"
  cargo bench --locked --bench micro 2>&1 | tee "$out/criterion.log" | grep -E '^[a-z].*time:|^\S+/' | head -60 || true
  echo "== in-process ceiling"
  cargo bench --locked --bench ceiling 2>&1 | tee "$out/ceiling.log" | tail -25
  echo "== in-process ceiling, one intra-op thread"
  LORKD_BENCH_THREADS=1 LORKD_BENCH_ROUNDS=3 LORKD_BENCH_SECONDS=1 LORKD_BENCH_OUT="$root/$out/ceiling-1thread.json" \
    cargo bench --locked --bench ceiling 2>&1 | tee "$out/ceiling-1thread.log" | tail -18
  e2e_args=(--duration "${LORKD_BENCH_DURATION:-6}" --repeats "${LORKD_BENCH_REPEATS:-3}" --counts "$counts"
            --cold-experts "$cold_experts" --execution-counts "3,${LORKD_BENCH_EXECUTION_COUNTS:-100,1000}")
fi
echo "== end to end ($binary)"
$python scripts/bench/e2e.py --binary "$binary" --package "$package" --task "$task" --out "$out" "${e2e_args[@]}"
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min) at end" >> "$out/machine.txt"
$python scripts/bench/report.py --results "$out" --criterion "$CRITERION_HOME" > "$out/tables.md"
echo "== tables: $out/tables.md"
cat "$out/tables.md"
