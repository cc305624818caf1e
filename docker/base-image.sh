#!/usr/bin/env bash
# Build a local Debian base image with debootstrap, for machines that cannot pull one from a registry.
# Usage (as root: debootstrap needs it):
#   docker/base-image.sh [TAG]          default TAG: qatune-base:bookworm
# Env: CONTAINER_ENGINE (podman|docker, default podman), SUITE (default bookworm: its python3 is 3.11,
# the version requirements.lock is for), MIRROR (default: the mirror this host's apt already uses).
# Then build with: make image-cpu BASE_IMAGE=qatune-base:bookworm
set -euo pipefail

tag=${1:-qatune-base:bookworm}
engine=${CONTAINER_ENGINE:-podman}
suite=${SUITE:-bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
security=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}

command -v debootstrap >/dev/null || { echo "error: debootstrap not found (apt-get install debootstrap)"; exit 1; }
[ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root"; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

# minbase = essential packages + apt: the Dockerfiles install python3, git and CA certificates themselves,
# so they build the same on this image and on a pulled debian:bookworm-slim.
debootstrap --variant=minbase "$suite" "$root" "$mirror"

cat >"$root/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security $suite-security main
SOURCES
# What the official slim images do: no recommends, no apt caches kept in layers.
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$root/etc/apt/apt.conf.d/90no-recommends"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb

tar --numeric-owner -C "$root" -c . | "$engine" import --change 'CMD ["/bin/bash"]' - "$tag"
"$engine" image ls "$tag"
