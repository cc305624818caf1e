#!/usr/bin/env bash
# Make a container engine usable for `make image-check` on a CI machine:
#   docker/engine-setup.sh ENGINE            install what is missing
#   docker/engine-setup.sh ENGINE IMAGE      ... and check that a container of IMAGE starts
# - podman, runc, catatonit (`--init`), debootstrap (the local base) or fuse-overlayfs missing: install them
#   from Debian (root and apt needed); another engine that does not answer is an error;
# - a container that cannot start because the engine asks for more than this machine allows (rlimits above
#   the host's hard limits; crun on a hybrid cgroup tree): add a drop-in,
#   /etc/containers/containers.conf.d/50-qatune.conf, with the host's limits and runc. An existing
#   containers.conf is never touched.
set -euo pipefail
engine=$1
image=${2:-}
if [ "$engine" = podman ]; then
  missing=$(for c in podman runc catatonit debootstrap fuse-overlayfs; do command -v "$c" >/dev/null || echo "$c"; done)
  if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
      echo "error: missing for the image check: $(echo $missing); install them (Debian: apt-get install podman runc catatonit debootstrap fuse-overlayfs)" >&2
      exit 1
    fi
    echo "installing for the image check (Debian packages): $(echo $missing)"
    packages="podman runc catatonit debootstrap containernetworking-plugins slirp4netns uidmap fuse-overlayfs"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages >/dev/null; }
  fi
elif ! "$engine" info >/dev/null 2>&1; then
  echo "error: $engine does not answer ($engine info); install podman or start the docker daemon" >&2
  exit 1
fi
[ -n "$image" ] || exit 0
if "$engine" run --rm "$image" true 2>/dev/null; then
  exit 0
fi
dropin=/etc/containers/containers.conf.d/50-qatune.conf
if [ "$engine" != podman ] || [ -e "$dropin" ] || [ "$(id -u)" != 0 ]; then
  "$engine" run --rm "$image" true   # shows the engine's own error
  exit 1
fi
# At most the host's hard limits, and nproc at most 32768: podman starts conmon with that cap, and a
# container's processes may not get more than conmon has (measured: 32768 starts, 40000 is refused).
cap() { local v; v=$(ulimit "$1"); if [ "$v" = unlimited ] || [ "$v" -gt "$2" ]; then echo "$2"; else echo "$v"; fi; }
nofile=$(cap -Hn 1048576)
nproc=$(cap -Hu 32768)
mkdir -p "$(dirname "$dropin")"
{
  echo "# qatune's image check (docker/engine-setup.sh): containers may not raise rlimits above the host's"
  echo "[containers]"
  echo "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]"
  if command -v runc >/dev/null; then
    echo "[engine]"
    echo "runtime = \"runc\""
  fi
} >"$dropin"
echo "podman could not start a container with its defaults: wrote $dropin (host rlimits, runc)"
"$engine" run --rm "$image" true
