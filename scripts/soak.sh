#!/usr/bin/env bash
# Soak (issue 9; not in CI): 10 minutes of mixed good, bad and slow traffic at c=64 against the release build
# with the default configuration and an API key. Writes bench-out/soak/report.json (RSS over time, counts by
# kind and status, p50/p99 of the good requests) and the server log; exits 1 on any 5xx.
#   scripts/soak.sh [seconds] [concurrency]      (defaults 600, 64)
set -euo pipefail
cd "$(dirname "$0")/.."
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/.ort/lib/libonnxruntime.so.1.31.1}"
seconds=${1:-600}
concurrency=${2:-64}
out=bench-out/soak
mkdir -p "$out"
cargo build --release --locked --bin lorkd
key="soak-key-$RANDOM$RANDOM$RANDOM"
port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target/release/lorkd --host 127.0.0.1 --port "$port" --api-keys "$key" --log-format json >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/v2/health/ready" >/dev/null && break; sleep 0.1; done
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); git: $(git rev-parse --short HEAD); nproc: $(nproc)"
  echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$out/machine.txt"
.venv/bin/python scripts/bench/soak.py --port "$port" --pid "$server" --key "$key" \
  --seconds "$seconds" --concurrency "$concurrency" --out "$out/report.json"
echo "soak: server log lines at ERROR: $(grep -c '"level":"ERROR"' "$out/server.log" || true)"
