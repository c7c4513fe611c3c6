#!/usr/bin/env bash
# Reproduce the shipped package from the data (resumable: rerun after an interruption).
# Lane A: teacher -> teacher features -> LoRKD -> STL.  Lane B: LoRKD w/o transfer -> MTL -> STL (in parallel,
# the lanes split the STL members between them;
# one torch thread each: the best use of this 2-core machine). Then evaluation/report, package, parity, and
# the report again (so the README quotes the parity of the package just written).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-models/runs}
PKG=${PKG:-models/medmnist-lorkd}
CONFIG=${CONFIG:-models/configs/medmnist.json}
T=.venv/bin/lorkd-train
mkdir -p "$RUNS"
start=$(date +%s)
$T pipeline --config "$CONFIG" --runs "$RUNS" --package "$PKG" --only teacher features lorkd stl > "$RUNS/laneA.log" 2>&1 &
a=$!
$T pipeline --config "$CONFIG" --runs "$RUNS" --package "$PKG" --only lorkd_nokd mtl stl > "$RUNS/laneB.log" 2>&1 &
b=$!
echo "reproduce: lanes running (logs: $RUNS/laneA.log, $RUNS/laneB.log)"
wait $a
wait $b
if [ ! -f "$RUNS/wall.json" ]; then
  echo "{\"training_wall_seconds\": $(( $(date +%s) - start ))}" > "$RUNS/wall.json"
fi
$T pipeline --config "$CONFIG" --runs "$RUNS" --package "$PKG" --only report package
$T parity --run "$RUNS/lorkd" --package "$PKG" --out "$RUNS/parity.json"
$T pipeline --config "$CONFIG" --runs "$RUNS" --package "$PKG" --only report
echo "reproduce: done in $(( $(date +%s) - start ))s"
