"""Write docker/requirements-cuda-stack.txt: the CUDA image's library versions, minus the GPU, for a CPU venv.

    python3 docker/cuda-stack.py            # rewrite the file from the two locks
    python3 docker/cuda-stack.py --check    # exit 1 when the file is not what the locks give (a unit test runs this)

`make test-cuda-stack` installs this file (every line `--no-deps`) into `.venv-cuda-stack` and runs the unit
and stage tiers there, so the code is tested against the transformers, trl, datasets and huggingface_hub the
CUDA image runs (docker/requirements-cuda.lock), not only against the CPU lock's. The rule:

1. every pin of docker/requirements-cuda.lock, at that version,
2. except what only runs on a GPU (GPU_ONLY below: unsloth and its kernels, the CUDA runtime wheels), and
   torch, which is the CPU lock's version (CPU build; the CUDA image's torch wheel is multi-GB),
3. plus the test tools of pyproject's `dev` extra and what they require (TEST_TOOLS), which the CUDA image
   does not install, at requirements.lock's versions.

Standard library only, like docker/lockcheck.py.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_LOCK = ROOT / "docker" / "requirements-cuda.lock"
CPU_LOCK = ROOT / "requirements.lock"
OUT = ROOT / "docker" / "requirements-cuda-stack.txt"

# Installed by the CUDA image for the GPU only: unsloth (needs CUDA to import), its kernels and the CUDA torch's
# companions (torchvision is built against torch 2.14.1), and the nvidia-*/cuda-* runtime libraries.
# unsloth_zoo stays in the list: with UNSLOTH_ZOO_DISABLE_GPU_INIT=1 it imports on a CPU (triton stubbed) and
# tests/unit/test_unsloth_zoo_prep.py runs its dataset preparation; the packages named here are not needed.
GPU_ONLY = {"unsloth", "xformers", "triton", "torchao", "torchvision", "cut-cross-entropy"}
GPU_ONLY_PREFIXES = ("nvidia-", "cuda-")
# The CUDA lock's pure-Python NVIDIA package that the CPU lock has too (GPU memory readings via NVML).
KEEP = {"nvidia-ml-py"}
# From pyproject's dev extra: the tools the tests import (hypothesis, playwright, llama.cpp's server for
# tests/stages/test_judge.py) and what they require that the CUDA lock lacks (fastapi, uvicorn and
# pydantic-settings are in it already). ruff and hadolint are lint tools: `make lint` runs them from .venv.
TEST_TOOLS = {
    "hypothesis",
    "sortedcontainers",
    "playwright",
    "greenlet",
    "sse-starlette",
    "starlette-context",
    "openai",  # tests/stages/test_serve.py: the official client against `qatune serve`
    "jiter",
    "distro",
    "httpx2",
    "httpcore2",
    "truststore",
    "jsonschema",  # tests/unit/test_skypilot.py: SkyPilot's task schema
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "attrs",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, tuple[str, str]]:
    """canonical name -> (name as written, version)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonical(name)] = (name.strip(), version.strip())
    return pins


def gpu_only(name: str) -> bool:
    return name not in KEEP and (name in GPU_ONLY or name.startswith(GPU_ONLY_PREFIXES))


def stack(cuda: dict[str, tuple[str, str]], cpu: dict[str, tuple[str, str]]) -> list[str]:
    pins = {n: p for n, p in cuda.items() if not gpu_only(n)}
    pins["torch"] = cpu["torch"]
    missing = sorted(TEST_TOOLS - cpu.keys())
    if missing:
        raise SystemExit(f"error: {CPU_LOCK.name} has no pin for {missing}")
    for name in TEST_TOOLS:
        pins.setdefault(name, cpu[name])
    return [f"{written}=={version}" for _, (written, version) in sorted(pins.items())]


HEADER = """\
# docker/requirements-cuda-stack.txt: what `make test-cuda-stack` installs into .venv-cuda-stack (--no-deps).
# Written by docker/cuda-stack.py from docker/requirements-cuda.lock (the CUDA image's versions) minus the
# GPU-only packages, torch at requirements.lock's CPU build, plus the tests' tools. Do not edit by hand.
"""


def render() -> str:
    return HEADER + "\n".join(stack(read_lock(CUDA_LOCK), read_lock(CPU_LOCK))) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="fail if the file differs from the locks' result"
    )
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(
                f"error: {OUT.relative_to(ROOT)} is stale: run python3 docker/cuda-stack.py", file=sys.stderr
            )
            return 1
        print(f"ok: {OUT.relative_to(ROOT)} follows {CUDA_LOCK.relative_to(ROOT)}")
        return 0
    OUT.write_text(text)
    print(f"{OUT.relative_to(ROOT)}: {text.count(chr(10)) - HEADER.count(chr(10))} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
