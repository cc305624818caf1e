"""What the sft and dpo stages share: backend and precision choice, model loading, LoRA, data, metrics.

Selection logic is a set of small pure functions (unit-tested); the CUDA-only paths (Unsloth,
4-bit bitsandbytes) are only ever imported when CUDA is present.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from qatune.errors import QatuneError

# ChatML with {% generation %} markers, so TRL's assistant_only_loss can mask everything but the
# assistant's tokens. The end-of-turn token sits inside the marked block: the model must learn to stop.
CHATML_WITH_GENERATION = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


# --------------------------------------------------------------------------- selection logic (pure)


def select_backend(requested: str, cuda_available: bool, unsloth_importable: bool) -> str:
    """auto -> unsloth only with CUDA and an importable unsloth; otherwise transformers + peft."""
    if requested == "transformers":
        return "transformers"
    if requested == "unsloth":
        if not cuda_available:
            raise QatuneError(
                "train.backend: unsloth needs a CUDA GPU (none found); use auto or transformers"
            )
        if not unsloth_importable:
            raise QatuneError(
                "train.backend: unsloth is not installed; pip install '.[cuda]' or use the CUDA image"
            )
        return "unsloth"
    if requested != "auto":
        raise QatuneError(f"train.backend: unknown backend '{requested}' (auto, transformers, unsloth)")
    return "unsloth" if cuda_available and unsloth_importable else "transformers"


def select_precision(requested: str, cuda_available: bool, cuda_bf16: bool, cpu_bf16: bool) -> str:
    """fp32 | bf16 | fp16. auto: bf16 where the hardware has it, fp16 on older GPUs, else fp32."""
    if requested == "auto":
        if cuda_available:
            return "bf16" if cuda_bf16 else "fp16"
        return "bf16" if cpu_bf16 else "fp32"
    if requested == "fp16" and not cuda_available:
        raise QatuneError("train.precision: fp16 mixed precision needs a CUDA GPU; use fp32 or bf16 on CPU")
    if requested == "bf16" and cuda_available and not cuda_bf16:
        raise QatuneError("train.precision: this GPU has no bf16; use fp16 or auto")
    return requested


def check_quantization(load_in_4bit: bool, cuda_available: bool) -> None:
    if load_in_4bit and not cuda_available:
        raise QatuneError(
            "train.load_in_4bit: 4-bit (QLoRA) loading needs a CUDA GPU and bitsandbytes; "
            "set train.load_in_4bit: false to train in full precision on CPU"
        )


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 autocast is fast; without it, it is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def unsloth_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("unsloth") is not None


def hardware() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "cuda": cuda,
        "cuda_bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "cpu_bf16": cpu_has_bf16(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "threads": torch.get_num_threads(),
    }


def chat_template_for_training(template: str | None) -> tuple[str | None, str]:
    """(template, loss mode): a template with generation markers enables assistant-only loss.

    ChatML templates without markers (SmolLM2, Qwen) get qatune's marked ChatML; any other template
    trains on prompt/completion pairs, where TRL masks the prompt itself.
    """
    if template and "{% generation %}" in template:
        return template, "assistant_only"
    if template and "<|im_start|>" in template:
        return CHATML_WITH_GENERATION, "assistant_only"
    return template, "completion_only"


# --------------------------------------------------------------------------- data


def conversation(row: dict, system_prompt: str | None) -> list[dict]:
    prompt = list(row["prompt"])
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return prompt


def sft_example(row: dict, system_prompt: str | None, loss_mode: str) -> dict:
    prompt = conversation(row, system_prompt)
    answer = {"role": "assistant", "content": row["chosen"]}
    if loss_mode == "assistant_only":
        return {"messages": [*prompt, answer]}
    return {"prompt": prompt, "completion": [answer]}


def dpo_example(row: dict, system_prompt: str | None) -> dict:
    return {
        "prompt": conversation(row, system_prompt),
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


def warmup(cfg) -> float:
    """transformers 5 takes one `warmup_steps`: an int is steps, a float below 1 a ratio of all steps."""
    return int(cfg.warmup_steps) if cfg.warmup_steps > 0 else float(cfg.warmup_ratio)


def sha256_files(paths: list[str | Path]) -> str:
    from qatune.io import sha256_file

    digest = hashlib.sha256()
    for path in sorted(str(p) for p in paths):
        digest.update(sha256_file(path).encode())  # chunked: adapters and data can be large
    return digest.hexdigest()


# --------------------------------------------------------------------------- provenance and metrics


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def peak_memory_gb() -> dict[str, float]:
    """Peak CPU RSS of this process (and CUDA max reserved when on a GPU), in GB."""
    import torch

    out = {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)}
    if torch.cuda.is_available():
        out["peak_cuda_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1024**3, 3)
    return out


def perplexity(loss: float | None) -> float | None:
    return None if loss is None else round(math.exp(min(loss, 50.0)), 4)


def write_history(log_history: list[dict], plots_dir: Path, keys: dict[str, list[str]]) -> None:
    """Per-step curves as DVC plot files (one JSON list per plot) plus one CSV of everything (seed 002).

    Trainer logs train and eval values as separate entries; DVC draws a file only when every row has the
    same fields, so rows are merged by step and a value missing at a step is null (vega skips it).
    """
    plots_dir.mkdir(parents=True, exist_ok=True)
    for name, metric_keys in keys.items():
        by_step: dict[int, dict] = {}
        for entry in log_history:
            for key in metric_keys:
                if key in entry:
                    by_step.setdefault(entry["step"], {})[key.replace("/", "_")] = entry[key]
        fields = [k.replace("/", "_") for k in metric_keys]
        rows = [
            {"step": step, **{f: values.get(f) for f in fields}} for step, values in sorted(by_step.items())
        ]
        (plots_dir / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    columns = sorted({k for e in log_history for k in e})
    with open(plots_dir / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(log_history)


def report_to(requested: list[str]) -> list[str]:
    """Logging integrations; wandb is offline unless WANDB_API_KEY is set (and then never logs the key)."""
    import os

    out = []
    for name in requested:
        if name == "wandb":
            if os.environ.get("WANDB_MODE") == "disabled":
                continue
            os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
        out.append(name)
    return out or ["none"]


def python_command(module_or_script: str, num_processes: int, args: list[str]) -> list[str]:
    """The command that runs a stage, under torchrun when more than one process is asked for."""
    if num_processes <= 1:
        return [sys.executable, module_or_script, *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={num_processes}",
        module_or_script,
        *args,
    ]
