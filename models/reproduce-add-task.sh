#!/usr/bin/env bash
# Leave-one-out experiment of `lorkd-train add-task` (models/README.md, "Adding an expert"); resumable.
# For each held-out task T of breast, pneumonia, retina: LoRKD trained jointly on the two others (the shipped
# recipe, configs/medmnist.json), exported with its checkpoint, then T added with add-task against that frozen
# student. Reference: the 3-task LoRKD retrained here with the same teacher and recipe. Two lanes, one torch
# thread each, niced. Results: $RUNS/table.md (pasted into models/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-models/runs/loo}
CONFIG=models/configs/medmnist.json
# add-task budget: 5 epochs of 2,048 draws (10,240 images, 23 % of a 3-task joint run's 44,800 draws); AdamW lr 2e-3,
# batch 64 for the factors (the base run's SGD lr 0.05 barely moved them in that budget, see models/README.md)
ADD_SET=${ADD_SET:-"epochs=5 epoch_draws=2048 optimizer=adamw lr=0.002 batch_size=64"}
T=".venv/bin/lorkd-train"
N="nice -n 10"
mkdir -p "$RUNS"

timed() {  # timed NAME CMD...: run CMD, append its wall seconds to $RUNS/times.json (once per NAME)
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  "$@"
  python3 - "$RUNS/times.json" "$name" "$t0" "$(date +%s.%N)" <<'PY'
import json, os, sys
path, name, t0, t1 = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
d = json.load(open(path)) if os.path.exists(path) else {}
d[name] = t1 - t0
json.dump(d, open(path, "w"), indent=1)
PY
}

others() { case $1 in breast) echo pneumonia,retina;; pneumonia) echo breast,retina;; retina) echo breast,pneumonia;; esac; }

joint() {  # joint NAME TASKS: teacher features for TASKS, LoRKD on them, export with its checkpoint
  local name=$1 tasks=$2
  [ -f "$RUNS/pkg-$name/manifest.json" ] && return 0
  [ -f "$RUNS/tf-$name.pt" ] || $N $T teacher-features --teacher-run "$RUNS/teacher" --tasks ${tasks//,/ } \
      --threads 1 --out "$RUNS/tf-$name.pt"
  [ -f "$RUNS/joint-$name/summary.json" ] || timed "joint-$name" $N $T train --mode lorkd --config "$CONFIG" --no-progress --out "$RUNS/joint-$name" \
      --set tasks="$tasks" teacher_features="$RUNS/tf-$name.pt"
  $N $T export --run "$RUNS/joint-$name" --out "$RUNS/pkg-$name" --checkpoint-out "$RUNS/ck-$name"
}

add() {  # add TASK: add-task TASK to the package trained without it
  local task=$1 pkg="$RUNS/pkg-minus-$1"
  grep -q "\"id\": \"$task\"" "$pkg/manifest.json" && return 0
  timed "add-$task" $N $T add-task --package "$pkg" --task "$task" --teacher-run "$RUNS/teacher" \
      --run "$RUNS/add-$task" --out "$RUNS/add-$task.json" --no-progress --set $ADD_SET
  $T verify --package "$pkg"
}

# the teacher (ResNet-18 on the three tasks, 8 epochs as shipped)
[ -f "$RUNS/teacher/summary.json" ] || $N $T train --mode teacher --config "$CONFIG" --no-progress --out "$RUNS/teacher"

( joint all breast,pneumonia,retina; joint minus-breast "$(others breast)"; add breast ) > "$RUNS/laneA.log" 2>&1 &
a=$!
( joint minus-pneumonia "$(others pneumonia)"; joint minus-retina "$(others retina)"; add pneumonia; add retina ) \
  > "$RUNS/laneB.log" 2>&1 &
b=$!
echo "add-task experiment: lanes running (logs: $RUNS/laneA.log, $RUNS/laneB.log)"
wait $a
wait $b
# Same-conditions wall times: one lane, nothing else of ours running: the 3-task joint retrain, then each
# add-task on a fresh export of its 2-task package (results identical to the runs above: same seeds).
if [ "${TIMING:-1}" = 1 ] && [ ! -f "$RUNS/timing/done" ]; then
  TR="$RUNS/timing"
  mkdir -p "$TR"
  [ -f "$TR/joint-all/summary.json" ] || RUNS="$TR" timed joint-all $N $T train --mode lorkd --config "$CONFIG" \
      --no-progress --out "$TR/joint-all" --set teacher_features="$RUNS/tf-all.pt"
  for t in breast pneumonia retina; do
    [ -f "$TR/add-$t.json" ] && continue
    rm -rf "$TR/pkg-minus-$t" "$TR/add-$t"
    $N $T export --run "$RUNS/joint-minus-$t" --out "$TR/pkg-minus-$t" --checkpoint-out "$TR/ck-minus-$t" > /dev/null
    RUNS="$TR" timed "add-$t" $N $T add-task --package "$TR/pkg-minus-$t" --task "$t" --teacher-run "$RUNS/teacher" \
        --run "$TR/add-$t" --out "$TR/add-$t.json" --no-progress --set $ADD_SET
  done
  touch "$TR/done"
fi > "$RUNS/timing.log" 2>&1
.venv/bin/python -m lorkd.loo "$RUNS" > "$RUNS/table.md"
cat "$RUNS/table.md"
