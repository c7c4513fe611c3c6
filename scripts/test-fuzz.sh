#!/usr/bin/env bash
# Bounded coverage-guided fuzzing (`make test`): each cargo-fuzz target in fuzz/ (image/DICOM decoding, OIP JSON,
# multipart) runs for FUZZ_SECONDS (default 20) from a seed corpus of the real sample files; any crash, panic or
# leak fails the suite. Longer by hand: FUZZ_SECONDS=600 scripts/test-fuzz.sh (findings land in fuzz/artifacts/).
# cargo-fuzz is installed into .tools/ (crates.io) when it is not on PATH; libFuzzer needs nightly flags, which the
# stable toolchain accepts with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-20}
if ! command -v cargo-fuzz >/dev/null; then
  export PATH="$PWD/.tools/bin:$PATH"
  if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz: installing cargo-fuzz into .tools/"
    cargo install --quiet --locked --root .tools cargo-fuzz
  fi
fi
export RUSTC_BOOTSTRAP=1
seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT
mkdir -p "$seeds/decode_image" "$seeds/oip_json" "$seeds/multipart"
cp models/medmnist-lorkd/golden/*/0.png "$seeds/decode_image/" 2>/dev/null || true
cp ../shared/data/samples/*.dcm "$seeds/decode_image/" 2>/dev/null || true
for f in ../shared/data/samples/dicom/MR_small_RLE.dcm ../shared/data/samples/dicom/SC_rgb_jpeg_dcmtk.dcm; do
  [ -f "$f" ] && cp "$f" "$seeds/decode_image/"
done
printf '{"inputs":[{"name":"input","shape":[1,3,1,2],"datatype":"FP32","data":[1,2,3,4,5,6]}]}' >"$seeds/oip_json/1"
png=$(ls models/medmnist-lorkd/golden/*/0.png | head -1)
{ printf -- '--XyZzY\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
  cat "$png"; printf -- '\r\n--XyZzY--\r\n'; } >"$seeds/multipart/1"
rm -rf fuzz/artifacts
(cd fuzz && cargo fuzz build -O 2>&1 | tail -n 2)
for target in decode_image oip_json multipart; do
  echo "fuzz: $target for ${seconds}s"
  (cd fuzz && cargo fuzz run -O "$target" "$seeds/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | grep -E "stat::number_of_executed_units|ERROR|panicked|SUMMARY" || true)
  # cargo fuzz exits non-zero on a finding; grep above only filters the report, so check for artifacts.
  if [ -n "$(find fuzz/artifacts/"$target" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'oom-*' -o -name 'timeout-*' \) 2>/dev/null)" ]; then
    echo "fuzz: FAILED: $target left findings in fuzz/artifacts/$target"; exit 1
  fi
done
echo "fuzz: passed"
