#!/usr/bin/env bash
# Second package, made by the generic path: MobileNetV3-small LoRKD students (lorkd.decompose) on the same three
# MedMNIST tasks, distilled from a ResNet-18 teacher trained here. Resumable: rerun after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/lorkd-train
CFG=models/configs/medmnist-mbv3s.json
R=${RUNS:-models/runs/pkg2}
PKG=${PKG:-models/medmnist-mbv3s-lorkd}
mkdir -p "$R"
nice -n 10 $T train --mode teacher --config $CFG --out "$R/teacher" --no-progress
[ -f "$R/teacher_features.pt" ] || nice -n 10 $T teacher-features --teacher-run "$R/teacher" --threads 1 \
  --out "$R/teacher_features.pt"
nice -n 10 $T train --mode lorkd --config $CFG --set teacher_features="$R/teacher_features.pt" \
  --out "$R/lorkd" --no-progress
$T export --run "$R/lorkd" --out "$PKG" --name medmnist-mbv3s-lorkd \
  --checkpoint-out models/checkpoints/medmnist-mbv3s-lorkd \
  --description "LoRKD experts (MobileNetV3-small at 28 px via lorkd.decompose, rank-4 EKS convs) for BreastMNIST, PneumoniaMNIST and RetinaMNIST, decomposed from a ResNet-18 teacher trained on the three tasks."
$T parity --run "$R/lorkd" --package "$PKG" --threads 1 --out "$R/parity.json"
