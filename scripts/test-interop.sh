#!/usr/bin/env bash
# Interop suite of `make test`: Python tests against the real lorkd binary (debug build, real ONNX Runtime, shipped
# package): DICOM inputs vs. pydicom as an independent reference, and the real tritonclient[http] / kserve clients
# (JSON and binary tensor paths). Needs ../shared/data/samples; deps come from models[dev] (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/.ort/lib/libonnxruntime.so.1.31.1}"
cargo build --locked --bin lorkd
.venv/bin/ruff check --config models/pyproject.toml tests/python
.venv/bin/ruff format --check --config models/pyproject.toml tests/python
timeout 600 .venv/bin/python -m pytest -q -p no:cacheprovider tests/python
