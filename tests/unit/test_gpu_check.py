"""bench/gpu_check.py's verdicts, from the files the stages write (the GPU run itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def stage_files(work: Path, device_training: str, device: str) -> None:
    for name in ("sft", "dpo"):
        write(
            work / f"metrics/{name}.json",
            {
                "device": device_training,
                "peak_cuda_reserved_gb": 1.2,
                "eval_before": {"rewards/margins": 0.0},
            },
        )
    write(work / "metrics/merge.json", {"device": device})
    for name in ("base", "sft", "final"):
        write(work / f"data/scores/{name}.json", {"device": device})


def test_every_check_passes_when_every_stage_ran_on_the_gpu(tmp_path):
    stage_files(tmp_path, "NVIDIA H200", "cuda")
    unsloth = {"device": "cuda:0", "linear4bit": 210}
    result = gpu_check.checks(tmp_path, "qatune: models/merged on cuda (bfloat16)", unsloth)
    assert result and all(result.values()), result


@pytest.mark.parametrize("broken", ["merge", "score", "ask", "unsloth"])
def test_a_stage_that_stayed_on_the_cpu_fails_its_check(tmp_path, broken):
    stage_files(tmp_path, "NVIDIA H200", "cuda")
    banner, unsloth = "qatune: models/merged on cuda (bfloat16)", {"device": "cuda:0", "linear4bit": 3}
    if broken == "merge":
        write(tmp_path / "metrics/merge.json", {"device": "cpu"})
    elif broken == "score":
        write(tmp_path / "data/scores/final.json", {"device": "cpu"})
    elif broken == "ask":
        banner = "qatune: models/merged on cpu (float32)"
    else:
        unsloth = {"device": "cuda:0", "linear4bit": 0}  # loaded, but not in 4-bit
    result = gpu_check.checks(tmp_path, banner, unsloth)
    assert [k for k, ok in result.items() if not ok] == [
        {
            "merge": "merge on GPU",
            "score": "score@final on GPU",
            "ask": "chat answer on GPU",
            "unsloth": "unsloth 4-bit load on GPU",
        }[broken]
    ]


def test_without_a_gpu_it_says_so_and_runs_nothing(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/gpu_check.py"), "--out", str(out)], capture_output=True
    )
    assert proc.returncode == 2
    result = json.loads(out.read_text())
    assert result["passed"] is False and "no CUDA GPU" in result["note"] and result["versions"]["torch"]
