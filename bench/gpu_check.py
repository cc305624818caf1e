"""The GPU workstation path in one command, for a person with one CUDA GPU and no Hub access.

    make gpu-check            # or: .venv/bin/python bench/gpu_check.py [--keep DIR]

On the bundled SmolLM2 with tiny budgets, in a scratch folder (never this working tree), it runs every
model-loading stage the way `dvc repro` does (fetch, clean, split, sft, dpo, the three score stages, evaluate,
merge) with `train.backend: auto` and `train.load_in_4bit: true`, then an Unsloth 4-bit load on its own and one
answer from `qatune ask`. It checks that each stage's model sat on the GPU (the device every stage records in
its metrics, `qatune ask`'s banner), and writes bench/results/gpu_check.json: library versions, the GPU, wall
time and peak reserved CUDA memory per step, and pass/fail per check. Nothing is installed and nothing is
fetched from the network while it runs (HF_HUB_OFFLINE=1). On a machine without CUDA it writes the result
file saying so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "bench" / "results" / "gpu_check.json"
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "unsloth")

# Tiny budgets: minutes, not hours, on any CUDA GPU. Everything else is params.yaml's own value.
OVERLAY = {
    "data_samples": 160,
    "train": {"backend": "auto", "load_in_4bit": True, "precision": "auto"},
    "sft": {"max_steps": 4, "eval_steps": 4, "save_steps": 4, "eval_rows": 8, "logging_steps": 1},
    "dpo": {"max_steps": 2, "eval_steps": 2, "save_steps": 2, "eval_rows": 4, "logging_steps": 1},
    "evaluate": {"rows": 8, "generate_rows": 8, "max_new_tokens": 32},
    "merge": {"dtype": "bfloat16", "check_prompts": 2},
}
STEPS = [
    ("fetch", ["stages/fetch.py"]),
    ("clean", ["stages/clean.py"]),
    ("split", ["stages/split.py"]),
    ("sft", ["stages/sft.py"]),
    ("dpo", ["stages/dpo.py"]),
    ("score@base", ["stages/score.py", "--adapter", "models/base", "--name", "base", "--generate",
                    "--out", "data/scores/base.json"]),
    ("score@sft", ["stages/score.py", "--adapter", "models/sft", "--name", "sft", "--out", "data/scores/sft.json"]),
    ("score@final", ["stages/score.py", "--adapter", "models/dpo", "--name", "final", "--generate",
                     "--out", "data/scores/final.json"]),
    ("evaluate", ["stages/evaluate.py"]),
    ("merge", ["stages/merge.py"]),
]  # fmt: skip
UNSLOTH_LOAD = """
import unsloth  # first, before transformers/trl/peft, as in the stages
from unsloth import FastLanguageModel
import torch, json
model, tok = FastLanguageModel.from_pretrained("models/base", max_seq_length=256, load_in_4bit=True, dtype=None)
quantized = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
print(json.dumps({"device": str(next(model.parameters()).device), "linear4bit": quantized,
                  "peak_cuda_reserved_gb": round(torch.cuda.max_memory_reserved() / 1024**3, 3)}))
"""  # fmt: skip


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def on_gpu(device: str | None) -> bool:
    """A stage's recorded device: sft/dpo record the GPU's name, the others 'cuda'; 'cpu' is a failure."""
    return bool(device) and device != "cpu"


def checks(work: Path, ask_banner: str, unsloth: dict | None) -> dict[str, bool]:
    """Pass/fail per check, from what the stages wrote (pure given the files: unit-tested)."""

    def read(rel: str) -> dict:
        path = work / rel
        return json.loads(path.read_text()) if path.is_file() else {}

    sft, dpo = read("metrics/sft.json"), read("metrics/dpo.json")
    out = {
        "sft on GPU": on_gpu(sft.get("device")) and "peak_cuda_reserved_gb" in sft,
        "dpo on GPU": on_gpu(dpo.get("device")) and "peak_cuda_reserved_gb" in dpo,
        "dpo starts at the SFT reference (margin 0)": abs(
            (dpo.get("eval_before") or {}).get("rewards/margins", 1)
        )
        < 1e-3,
        "merge on GPU": read("metrics/merge.json").get("device") == "cuda",
        "chat answer on GPU": " on cuda " in ask_banner,
    }
    for name in ("base", "sft", "final"):
        out[f"score@{name} on GPU"] = read(f"data/scores/{name}.json").get("device") == "cuda"
    if unsloth is not None:
        out["unsloth 4-bit load on GPU"] = (
            unsloth.get("device", "").startswith("cuda") and unsloth.get("linear4bit", 0) > 0
        )
    return out


def run_step(name: str, cmd: list[str], work: Path, env: dict, log) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    log.write(f"==== {name}: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    print(f"gpu-check: {name}: rc {proc.returncode} in {time.perf_counter() - start:.1f} s", flush=True)
    return {
        "rc": proc.returncode,
        "wall_s": round(time.perf_counter() - start, 1),
        "error": last if proc.returncode else None,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary one, removed)")
    parser.add_argument("--out", default=str(RESULT), help="result file")
    args = parser.parse_args(argv)
    import torch

    result: dict = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions()}
    if not torch.cuda.is_available():
        result.update(passed=False, note="no CUDA GPU visible: nothing was run")
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print("gpu-check: no CUDA GPU visible; wrote", args.out)
        return 2
    props = torch.cuda.get_device_properties(0)
    result["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 1024**3, 1)}

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qatune-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "stages", work / "stages", dirs_exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in OVERLAY.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = str(ROOT / "src")

    started = time.perf_counter()
    steps: dict[str, dict] = {}
    with open(work / "gpu_check.log", "w") as log:
        for name, cmd in STEPS:
            steps[name] = run_step(name, [sys.executable, *cmd], work, env, log)
            if steps[name]["rc"]:
                break
        unsloth = None
        if result["versions"]["unsloth"] and not any(s["rc"] for s in steps.values()):
            step = run_step("unsloth 4-bit load", [sys.executable, "-c", UNSLOTH_LOAD], work, env, log)
            steps["unsloth 4-bit load"] = step
            if step["rc"] == 0:
                unsloth = json.loads(step["stdout"].strip().splitlines()[-1])
        banner = ""
        if (work / "models/merged/config.json").is_file():
            ask = [sys.executable, "-m", "qatune.cli", "ask", "How much protein do I need a day?"]
            step = run_step("qatune ask", [*ask, "--max-new-tokens", "32"], work, env, log)
            steps["qatune ask"] = step
            banner = next((line for line in step["stderr"].splitlines() if line.startswith("qatune: ")), "")
    for name in ("sft", "dpo"):
        metrics = work / f"metrics/{name}.json"
        if metrics.is_file():
            steps[name]["peak_cuda_reserved_gb"] = json.loads(metrics.read_text()).get(
                "peak_cuda_reserved_gb"
            )
    for step in steps.values():
        step.pop("stdout"), step.pop("stderr")
    result["steps"] = steps
    result["checks"] = checks(work, banner, unsloth)
    if unsloth is None and result["versions"]["unsloth"] is None:
        result["checks"]["unsloth installed"] = False
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["passed"] = all(s["rc"] == 0 for s in steps.values()) and all(result["checks"].values())
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["checks"], indent=1))
    print(f"gpu-check: {'PASSED' if result['passed'] else 'FAILED'} in {result['wall_s']} s -> {args.out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
