#!/usr/bin/env bash
# Builds a local stand-in for `debian:bookworm-slim` from Debian's own packages (debootstrap
# --variant=minbase, trimmed like the official slim image, then `docker import`), for machines that
# can reach deb.debian.org but no container registry. Cached: does nothing when the image with this
# recipe's label already exists. Prints the image tag on stdout (everything else goes to stderr).
#
#   docker/local-base.sh                 # -> lorkd-local/debian:bookworm-slim
#   LORKD_BASE_TAG=x:y DEBIAN_MIRROR=http://mirror/debian docker/local-base.sh
set -euo pipefail

TAG=${LORKD_BASE_TAG:-lorkd-local/debian:bookworm-slim}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The recipe identity: this file's content + suite + mirror. A change rebuilds the image.
RECIPE=$( { cat "$0"; echo "$SUITE $MIRROR"; } | sha256sum | cut -c1-16)

log() { echo "local-base: $*" >&2; }

if [ "$(docker image inspect -f '{{ index .Config.Labels "org.lorkd.base-recipe" }}' "$TAG" 2>/dev/null)" = "$RECIPE" ]; then
  log "$TAG is cached (recipe $RECIPE)"
  echo "$TAG"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  log "building the base image needs root (debootstrap); run as root or build $TAG another way"
  exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  log "installing debootstrap from Debian's apt repositories"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q debootstrap >&2 || { apt-get update -q >&2 && apt-get install -y -q debootstrap >&2; }
fi

root=$(mktemp -d /tmp/lorkd-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
log "debootstrap --variant=minbase $SUITE from $MIRROR (takes a minute or two)"
start=$(date +%s)
# Package signatures are checked against the host's Debian archive keyring (debootstrap's default).
if ! debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" > "$root.log" 2>&1; then
  log "debootstrap failed; the end of its output:"; tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1
fi
rm -f "$root.log"

# Trim like the official *-slim images: no docs, man pages, locales or apt caches, and keep it so.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
       "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/* "$root"/root/.cache
cat > "$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
CFG
echo "deb $MIRROR $SUITE main" > "$root/etc/apt/sources.list"
: > "$root/etc/hostname"
: > "$root/etc/resolv.conf"

tar --numeric-owner -C "$root" -c . | docker import \
  --change 'CMD ["bash"]' \
  --change "LABEL org.lorkd.base-recipe=$RECIPE" \
  --change "LABEL org.opencontainers.image.description=\"debootstrap minbase $SUITE, trimmed: local stand-in for debian:$SUITE-slim\"" \
  - "$TAG" >&2
log "built $TAG in $(( $(date +%s) - start ))s: $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.1f MB", $1/1e6}')"
echo "$TAG"
