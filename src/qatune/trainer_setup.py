"""Model loading and trainer plumbing shared by the sft and dpo stages (heavy imports live here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from qatune import lm_head
from qatune.errors import QatuneError
from qatune.models import PROVENANCE_FILE as PROVENANCE_BASE  # noqa: F401 (the stages read it from here)
from qatune.params import TrainParams
from qatune.train import (
    check_quantization,
    hardware,
    python_command,
    report_to,
    select_backend,
    select_precision,
    unsloth_importable,
)

FINGERPRINT = "qatune_fingerprint.txt"


def resolve_hardware(train: TrainParams) -> dict[str, Any]:
    hw = hardware()
    check_quantization(train.load_in_4bit, hw["cuda"])
    backend = select_backend(train.backend, hw["cuda"], unsloth_importable() if hw["cuda"] else False)
    precision = select_precision(train.precision, hw["cuda"], hw["cuda_bf16"], hw["cpu_bf16"])
    head = lm_head.select(train.lm_head, hw["cuda"], backend)
    return {**hw, "backend": backend, "precision": precision, "lm_head": head}


def lora_config(train: TrainParams):
    from peft import LoraConfig

    lora = train.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )


def load_base(model_dir: str, train: TrainParams, hw: dict[str, Any], max_length: int):
    """(model, tokenizer) on the chosen backend. Weights load as safetensors only."""
    if hw["backend"] == "unsloth":  # CUDA only: imported here and nowhere else
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=model_dir,
            max_seq_length=max_length,
            load_in_4bit=train.load_in_4bit,
            dtype=None,
            trust_remote_code=train.trust_remote_code,
        )
        return model, tokenizer
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": train.trust_remote_code}
    if train.load_in_4bit:  # check_quantization has already required CUDA
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=train.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=train.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16 if hw["precision"] == "bf16" else torch.float16,
        )
    kwargs["dtype"] = torch.float32 if not hw["cuda"] else "auto"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=train.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if train.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=train.activation_checkpointing
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def unsloth_peft(model, train: TrainParams, seed: int):
    from unsloth import FastLanguageModel

    lora = train.lora
    return FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias=lora.bias,
        use_gradient_checkpointing="unsloth" if train.activation_checkpointing else False,
        random_state=seed,
    )


def common_args(train: TrainParams, hw: dict[str, Any], seed: int, output_dir: str) -> dict[str, Any]:
    """TrainingArguments both stages pass unchanged."""
    args: dict[str, Any] = {
        "output_dir": output_dir,
        "seed": seed,
        "data_seed": seed,
        "bf16": hw["precision"] == "bf16",
        "fp16": hw["precision"] == "fp16",
        "report_to": report_to(train.report_to),
        "activation_checkpointing": train.activation_checkpointing,
        "save_only_model": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
    }
    if not hw["cuda"]:
        args["use_cpu"] = True
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            args.update(ddp_backend="gloo", ddp_find_unused_parameters=False)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args.update(ddp_backend="nccl", ddp_find_unused_parameters=False)
    return args


def prepare_checkpoints(folder: Path, fingerprint: str) -> bool:
    """Keep checkpoints only if they belong to this exact run; True when there is one to resume from."""
    stamp = folder / FINGERPRINT
    if folder.exists() and (not stamp.is_file() or stamp.read_text().strip() != fingerprint):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint + "\n")
    complete = False
    for checkpoint in sorted(p for p in folder.glob("checkpoint-*") if p.is_dir()):
        if checkpoint_complete(checkpoint):
            complete = True
        else:  # killed while saving: Trainer would pick it as the latest and fail to load it
            print(f"qatune: {checkpoint}: incomplete checkpoint (killed while saving), removed", flush=True)
            shutil.rmtree(checkpoint)
    return complete


def checkpoint_complete(checkpoint: Path) -> bool:
    """Trainer writes trainer_state.json last: a checkpoint without a readable one was cut short."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def relaunch_distributed(num_processes: int) -> None:
    """Re-run this script under torchrun when params ask for several processes (and we are not one yet)."""
    if num_processes <= 1 or "LOCAL_RANK" in os.environ:
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = python_command(sys.argv[0], num_processes, sys.argv[1:])
    print(f"qatune: launching {num_processes} processes: {' '.join(cmd)}", flush=True)
    raise SystemExit(subprocess.call(cmd, env=env))


def write_provenance(out: Path, payload: dict[str, Any]) -> None:
    (out / "qatune_provenance.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")


def require(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise QatuneError(f"{path}: missing {what}; run the earlier stages first (dvc repro)")
    return path


def count_real_tokens(dataset) -> int:
    """Non-padding tokens per epoch in a tokenized dataset (what tokens/s is measured in)."""
    return int(sum(len(ids) for ids in dataset["input_ids"]))
