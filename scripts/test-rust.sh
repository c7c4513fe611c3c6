#!/usr/bin/env bash
# Rust suite of `make test`: formatting, lints, then unit and integration tests (real server, real ONNX Runtime,
# real package at models/medmnist-lorkd; override with LORKD_TEST_PACKAGE).
set -euo pipefail
cd "$(dirname "$0")/.."
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/.ort/lib/libonnxruntime.so.1.31.1}"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
