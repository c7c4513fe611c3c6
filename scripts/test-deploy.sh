#!/usr/bin/env bash
# Deployment tests (run by scripts/test.sh):
#  1. Kubernetes: render every kustomization (kubectl kustomize), validate offline against the
#     Kubernetes schemas (kubernetes-validate, pinned) and check the LORKD_* keys against the
#     service's real variables (k8s/validate.py). Needs no docker.
#  2. Container (when `docker info` works): build a local Debian base image (debootstrap, cached),
#     build the CPU image on it from the host's release binary, run it read-only and non-root, wait
#     for ready, predict every golden image, SIGTERM with a request in flight -> clean exit
#     (docker/e2e.py). The CUDA Dockerfile is built for structure only (no GPU/CUDA here).
# Skipped parts print a line starting with SKIPPED. LORKD_DEPLOY_SKIP_DOCKER=1 skips part 2;
# LORKD_DEPLOY_BINARY=path bakes that lorkd binary instead of building target/release/lorkd.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE_VERSION=1.37.0
IMAGE=${LORKD_TEST_IMAGE:-lorkd:local}
PACKAGE=models/medmnist-lorkd
PY=.venv/bin/python
status=0
t0=$(date +%s)

# ---- 1. Kubernetes manifests --------------------------------------------------------------------
echo "--- deploy: Kubernetes manifests"
if ! command -v kubectl >/dev/null 2>&1; then
  echo "SKIPPED: Kubernetes manifest validation (kubectl not found; it renders the kustomizations)"
else
  if [ "$("$PY" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null)" \
       != "$KUBERNETES_VALIDATE_VERSION" ]; then
    echo "deploy: installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION into .venv"
    "$PY" -m pip install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  fi
  # The service's variables come from a fresh `lorkd --print-env-vars` when a binary exists.
  "$PY" k8s/validate.py || status=1
fi

# ---- 2. Container image -------------------------------------------------------------------------
echo "--- deploy: container image"
if [ "${LORKD_DEPLOY_SKIP_DOCKER:-0}" = 1 ]; then
  echo "SKIPPED: container test (LORKD_DEPLOY_SKIP_DOCKER=1)"
  exit $status
fi
if ! docker info >/dev/null 2>&1; then
  echo "SKIPPED: container test (docker info fails: no usable Docker engine)"
  exit $status
fi
if [ ! -f "$PACKAGE/manifest.json" ]; then
  echo "deploy: FAILED: $PACKAGE/manifest.json is missing (the image bakes the default package in)"
  exit 1
fi

# The base image: debian:bookworm-slim when the engine already has it (e.g. pulled from a registry),
# else a local stand-in built from Debian's packages (cached across runs by docker/local-base.sh).
if [ -n "${LORKD_BASE_IMAGE:-}" ]; then
  base=$LORKD_BASE_IMAGE
elif docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
  base=debian:bookworm-slim
elif [ "$(id -u)" != 0 ] && ! docker image inspect lorkd-local/debian:bookworm-slim >/dev/null 2>&1; then
  echo "SKIPPED: container test (no debian:bookworm-slim image, and building the local one needs root for debootstrap)"
  exit $status
else
  base=$(docker/local-base.sh) || { echo "deploy: FAILED: could not build the local base image"; exit 1; }
fi

# No Rust or Python image can be pulled here, so the image takes the host's release binary (built
# on Debian bookworm, glibc 2.36 = the base's) and the ONNX Runtime library scripts/setup.sh fetched
# from PyPI, through LORKD_PREBUILT. cargo only rebuilds when the sources changed.
# LORKD_DEPLOY_BINARY=path uses that binary as is (no cargo run).
binary=${LORKD_DEPLOY_BINARY:-target/release/lorkd}
if [ -z "${LORKD_DEPLOY_BINARY:-}" ]; then
  echo "deploy: cargo build --release --locked --bin lorkd"
  c0=$(date +%s)
  cargo build --release --locked --bin lorkd 2>&1 | tail -n 3
  echo "deploy: release binary ready in $(( $(date +%s) - c0 ))s"
fi
prebuilt=target/docker-prebuilt
mkdir -p "$prebuilt"
strip -o "$prebuilt/lorkd.new" "$binary" 2>/dev/null || cp "$binary" "$prebuilt/lorkd.new"
cmp -s "$prebuilt/lorkd.new" "$prebuilt/lorkd" && rm "$prebuilt/lorkd.new" || mv "$prebuilt/lorkd.new" "$prebuilt/lorkd"
ort=.ort/lib/libonnxruntime.so.1.31.1
cmp -s "$ort" "$prebuilt/$(basename "$ort")" || cp "$ort" "$prebuilt/"

build_args=(--build-arg "RUST_IMAGE=$base" --build-arg "PYTHON_IMAGE=$base" --build-arg "RUNTIME_IMAGE=$base"
            --build-arg "LORKD_PREBUILT=$prebuilt")
echo "deploy: docker build -f docker/Dockerfile -t $IMAGE (base $base, prebuilt binary)"
b0=$(date +%s)
log=$(mktemp /tmp/lorkd-deploy-build.XXXXXX)
trap 'rm -f "$log"' EXIT
if ! docker build --force-rm -f docker/Dockerfile "${build_args[@]}" -t "$IMAGE" . >"$log" 2>&1; then
  tail -n 40 "$log"; echo "deploy: FAILED: docker build"; exit 1
fi
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
base_size=$(docker image inspect -f '{{.Size}}' "$base")
echo "deploy: built $IMAGE in $(( $(date +%s) - b0 ))s: $(awk -v s="$size" -v b="$base_size" \
  'BEGIN { printf "%.1f MB (base %.1f MB + lorkd %.1f MB)", s/1e6, b/1e6, (s-b)/1e6 }')"

# The CUDA Dockerfile, built on the same local base for its structure only: the result has no CUDA.
if ! docker build --force-rm -f docker/Dockerfile.cuda "${build_args[@]}" -t lorkd:local-cuda-structure . >"$log" 2>&1; then
  tail -n 40 "$log"; echo "deploy: FAILED: docker build -f docker/Dockerfile.cuda"; status=1
else
  # Without CUDA (the CPU library was handed in), provider cuda must refuse to start, loudly.
  cuda_out=$(docker run --rm lorkd:local-cuda-structure 2>&1) && cuda_rc=0 || cuda_rc=$?
  if [ "$cuda_rc" != 0 ] && grep -qi "cuda" <<<"$cuda_out"; then
    echo "deploy: docker/Dockerfile.cuda builds; without CUDA it refuses to start (exit $cuda_rc, provider cuda)" \
         "- structure only, its CUDA runtime is not tested here"
  else
    echo "$cuda_out" | tail -n 5
    echo "deploy: FAILED: the CUDA-structure image did not refuse to start without CUDA (exit $cuda_rc)"; status=1
  fi
fi
# Images replaced by rebuilds: drop the dangling ones of ours.
docker image prune -f --filter label=org.opencontainers.image.title=lorkd >/dev/null 2>&1 || true
docker image prune -f --filter label=org.opencontainers.image.title=lorkd-cuda >/dev/null 2>&1 || true
docker image prune -f --filter label=org.lorkd.stage >/dev/null 2>&1 || true

"$PY" docker/e2e.py --image "$IMAGE" --package "$PACKAGE" --env-file k8s/base/lorkd.env || status=1
echo "deploy: done in $(( $(date +%s) - t0 ))s"
exit $status
