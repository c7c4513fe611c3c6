#!/usr/bin/env bash
# Reproduce the shipped package from the data (resumable: rerun after an interruption).
# Lane A: teacher -> teacher features -> LoRKD.  Lane B: LoRKD w/o transfer -> MTL -> STL (in parallel,
# one torch thread each: the best use of this 2-core machine). Then evaluation/report, package, parity.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-models/runs}
PKG=${PKG:-models/medmnist-lorkd}
CONFIG=${CONFIG:-models/configs/medmnist.json}
T=.venv/bin/lorkd-train
mkdir -p "$RUNS"
start=$(date +%s)
$T pipeline --config "$CONFIG" --runs "$RUNS" --package "$PKG" --only teacher features lorkd > "$RUNS/laneA.log" 2>&1 &
a=$!
$T pipeline --config "$CONFIG" --runs "$RUNS" --package "$PKG" --only lorkd_nokd mtl stl > "$RUNS/laneB.log" 2>&1 &
b=$!
echo "reproduce: lanes running (logs: $RUNS/laneA.log, $RUNS/laneB.log)"
wait $a
wait $b
echo "{\"training_wall_seconds\": $(( $(date +%s) - start ))}" > "$RUNS/wall.json"
$T pipeline --config "$CONFIG" --runs "$RUNS" --package "$PKG" --only report package
$T parity --run "$RUNS/lorkd" --package "$PKG" --out "$RUNS/parity.json"
echo "reproduce: done in $(( $(date +%s) - start ))s"
