#!/bin/sh
# Puts ONNX Runtime's shared libraries from the PyPI wheel <package>==<version> into <dir>
# (libonnxruntime.so.<version>, plus the CUDA provider libraries when the wheel has them).
# When <dir> already holds libonnxruntime.so.<version> (a local, offline build handed it in), it is used as is.
#   fetch-ort.sh onnxruntime 1.31.1 /ort          # CPU
#   fetch-ort.sh onnxruntime-gpu 1.31.1 /ort      # CUDA 13 + cuDNN 9
set -eu
package=$1 version=$2 dir=$3
mkdir -p "$dir"
if [ -f "$dir/libonnxruntime.so.$version" ]; then
  echo "fetch-ort: using the ONNX Runtime library handed in ($(ls "$dir" | tr '\n' ' '))"
  exit 0
fi
command -v python3 >/dev/null 2>&1 || { echo "fetch-ort: no python3 in this stage and no library handed in" >&2; exit 1; }
tmp=$(mktemp -d)
# pip picks the wheel for this image's CPU architecture (x86_64 or aarch64).
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$package==$version"
python3 - "$tmp" "$version" "$dir" <<'PY'
import glob, os, sys, zipfile
tmp, version, out = sys.argv[1:]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
wanted = {f"libonnxruntime.so.{version}", "libonnxruntime_providers_shared.so",
          "libonnxruntime_providers_cuda.so"}  # TensorRT's provider is left out: the image has no TensorRT
with zipfile.ZipFile(wheel) as zf:
    for member in zf.namelist():
        name = member.rsplit("/", 1)[-1]
        if member.startswith("onnxruntime/capi/") and name in wanted:
            with zf.open(member) as src, open(os.path.join(out, name), "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            print(f"fetch-ort: {os.path.basename(wheel)}: {member}")
if not os.path.exists(os.path.join(out, f"libonnxruntime.so.{version}")):
    sys.exit(f"fetch-ort: {wheel} has no libonnxruntime.so.{version}")
PY
rm -rf "$tmp"
