#!/usr/bin/env bash
# Print the base image to build on: IMAGE when the engine has it or can pull it, else the local Debian base
# made with debootstrap (docker/base-image.sh; made here, once, when missing). Only the bookworm default
# has a local stand-in; any other IMAGE that cannot be pulled is an error.
#   docker/base.sh ENGINE IMAGE
set -euo pipefail
engine=$1
image=$2
local_base=qatune-base:bookworm
if "$engine" image inspect "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi
if timeout 120 "$engine" pull -q "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi
case "$image" in
  debian:bookworm-slim | docker.io/library/debian:bookworm-slim) ;;
  *) echo "error: $engine cannot pull $image and has no local copy" >&2; exit 1 ;;
esac
if ! "$engine" image inspect "$local_base" >/dev/null 2>&1; then
  echo "$image cannot be pulled: making $local_base with debootstrap (docker/base-image.sh, about 1 min)" >&2
  CONTAINER_ENGINE=$engine "$(dirname "$0")/base-image.sh" "$local_base" >&2
fi
echo "$image cannot be pulled: building on $local_base" >&2
echo "$local_base"
