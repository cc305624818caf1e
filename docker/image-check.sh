#!/usr/bin/env bash
# The CPU image, built and used (`make image-check`, run by .ci/run):
#   1. the engine answers (docker/engine-setup.sh installs podman on a CI machine that has none; a docker
#      client with no daemon is passed over for podman);
#   2. qatune:cpu builds from the Makefile's BASE_IMAGE, or the local Debian base where none can be pulled;
#   3. the runtime image has no compiler (gcc, cc, g++, c++, cmake, make, ninja);
#   4. inside it, on a scratch copy of this repository mounted at /app: `qatune --help`,
#      `dvc repro check-params fetch clean split` of the embedded default (their outputs, the converted base
#      model included, must be what dvc.lock records: docker/lock_reproduced.py), and one training stage
#      (sft) on a tiny random model (python -m tests.tiny, from the mounted repository) through `dvc exp run`.
# Env: CONTAINER_ENGINE, IMAGE (default qatune), BASE_IMAGE (default debian:bookworm-slim), MAKE.
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${CONTAINER_ENGINE:-podman}
# A docker client with no daemon (this kind of machine has one): podman instead, installed if missing
if [ "$engine" != podman ] && ! "$engine" info >/dev/null 2>&1; then
  echo "image-check: $engine does not answer; using podman"
  engine=podman
fi
image=${IMAGE:-qatune}:cpu
make=${MAKE:-make}
start=$(date +%s)
say() { echo "image-check [$(($(date +%s) - start)) s]: $*"; }

docker/engine-setup.sh "$engine"
base=$(docker/base.sh "$engine" "${BASE_IMAGE:-debian:bookworm-slim}")
docker/engine-setup.sh "$engine" "$base"
say "building $image on $base"
$make image-cpu CONTAINER_ENGINE="$engine" BASE_IMAGE="$base"
say "built: $("$engine" image inspect --format '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1 / 1e9}')"

found=$("$engine" run --rm --entrypoint /bin/sh "$image" -c \
  'for c in gcc cc g++ c++ cmake make ninja; do command -v "$c" || true; done')
if [ -n "$found" ]; then
  echo "error: the runtime image $image has build tools: $found" >&2
  exit 1
fi
say "no compiler in $image"

# A scratch copy of the repository as git sees it (tracked and untracked, not ignored), so that the stages'
# outputs and dvc.lock changes stay out of this checkout.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/repo"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work/repo"
git -C "$work/repo" init -q
git -C "$work/repo" add -A
git -C "$work/repo" -c user.email=ci@qatune.invalid -c user.name="qatune image check" commit -qm snapshot

"$engine" run --rm --init --user "$(id -u):$(id -g)" -e HOME=/tmp -v "$work/repo:/app" -w /app "$image" bash -euo pipefail -c '
  git config --global user.email ci@qatune.invalid
  git config --global user.name "qatune image check"
  qatune --help >/dev/null
  echo "qatune --help: ok"
  dvc repro check-params fetch clean split
  # A fresh clone reproduces what dvc.lock records for these stages (the converted base model included)
  python docker/lock_reproduced.py check-params fetch clean split
  python -c "import json; c = json.load(open(\"metrics/clean.json\")); print(\"clean:\", {k: c[k] for k in list(c)[:4]})"
  python -m tests.tiny /tmp/tiny --family llama >/dev/null
  dvc exp run --name tiny-sft -S base_model.source=/tmp/tiny -S hub.base_model_id=qatune-tests/tiny-random-llama \
    -S "train.system_prompt=Be safe." -S sft.enabled=true -S sft.max_steps=2 -S sft.batch_size=2 -S sft.grad_accum=1 \
    -S sft.eval_steps=2 -S sft.save_steps=2 -S sft.eval_rows=4 -S sft.logging_steps=1 -S sft.optim=adamw_torch \
    -S train.lora.r=4 -S train.precision=fp32 sft
  python -c "import json; m = json.load(open(\"metrics/sft.json\")); assert m[\"steps\"] == 2, m; print(\"sft on a tiny model:\", m[\"steps\"], \"steps, train loss\", m.get(\"train_loss\"))"
  test -f models/sft/adapter_model.safetensors
'
say "passed"
