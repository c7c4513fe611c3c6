#!/usr/bin/env bash
# One-time (idempotent) set-up: Python venv with the toolkit, and the ONNX Runtime shared library
# unpacked from the PyPI wheel onnxruntime==1.31.1 into .ort/lib (loaded by the service at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION=1.31.1
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.lorkd-setup-stamp
if [ ! -f "$stamp" ] || [ models/pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing the toolkit and its dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e "models[dev]"
  touch "$stamp"
fi

lib=.ort/lib/libonnxruntime.so.$ORT_VERSION
if [ ! -f "$lib" ]; then
  echo "setup: fetching ONNX Runtime $ORT_VERSION from PyPI"
  mkdir -p .ort/wheel .ort/lib
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp \
    "onnxruntime==$ORT_VERSION" -d .ort/wheel
  .venv/bin/python - "$ORT_VERSION" <<'PY'
import glob, sys, zipfile
version = sys.argv[1]
wheel = sorted(glob.glob(f".ort/wheel/onnxruntime-{version}-*.whl"))[0]
member = f"onnxruntime/capi/libonnxruntime.so.{version}"
with zipfile.ZipFile(wheel) as zf, open(f".ort/lib/libonnxruntime.so.{version}", "wb") as out:
    out.write(zf.read(member))
print(f"setup: unpacked {member} from {wheel}")
PY
fi
