#!/usr/bin/env bash
# Build a local stand-in for the Dockerfile's Python base image with debootstrap,
# for machines that cannot pull from Docker Hub. Debian bookworm (the same
# distribution as python:3.11-slim-bookworm) with python3 3.11 and python3-venv;
# no compiler, because the builder stage installs wheels only.
#
# The image is cached: an existing image is reused unless REBUILD_LOCAL_BASE=1.
#
#   LOCAL_BASE_IMAGE   image name (default localhost/proxy-app-base:bookworm-py311)
#   DEBIAN_MIRROR      apt mirror (default http://deb.debian.org/debian)
set -euo pipefail

IMAGE="${LOCAL_BASE_IMAGE:-localhost/proxy-app-base:bookworm-py311}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
HOST_CA_BUNDLE="${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

if podman image exists "$IMAGE" && [ "${REBUILD_LOCAL_BASE:-0}" != "1" ]; then
  echo "build_local_base: reusing cached $IMAGE"
  exit 0
fi

for tool in debootstrap podman tar; do
  command -v "$tool" >/dev/null || { echo "build_local_base: $tool is required" >&2; exit 1; }
done

rootfs="$(mktemp -d "${TMPDIR:-/tmp}/proxy-app-base.XXXXXX")"
cleanup() { rm -rf "$rootfs"; }
trap cleanup EXIT

echo "build_local_base: debootstrap bookworm into $rootfs"
timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || {
  tail -n 30 "$rootfs.log" >&2
  rm -f "$rootfs.log"
  echo "build_local_base: debootstrap failed" >&2
  exit 1
}
rm -f "$rootfs.log"

# The build must verify TLS to PyPI exactly as this host does (the host bundle
# may carry an extra trusted CA); pip inside the build reads PIP_CERT.
if [ -f "$HOST_CA_BUNDLE" ]; then
  cp "$HOST_CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
fi

# Keep the stand-in small: no apt lists, caches, docs or locales.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*

echo "build_local_base: importing $IMAGE"
tar -C "$rootfs" --numeric-owner -c . | podman import --quiet \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' \
  - "$IMAGE" >/dev/null
echo "build_local_base: built $IMAGE"
