#!/usr/bin/env bash
# The README's serve command (`make serve`): set up, build and serve the shipped default package on :8080.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release --bin lorkd -- --package "${LORKD_PACKAGE:-models/medmnist-lorkd}" "$@"
