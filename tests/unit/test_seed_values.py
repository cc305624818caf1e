"""Every value each seed's design document gives, one table per seed, and the places qatune must carry it:
the resolved params (default recipe + profile), the TRL config the sft or dpo stage builds from them
(SFTConfig / DPOConfig over qatune.training.trainer_args, as stages/sft.py and stages/dpo.py call it) and
peft's LoraConfig (qatune.modeling.lora_config). docs/seeds.md quotes the seed's wording for each item and
states every difference. No model is loaded: configs are built as on a CUDA card without bf16 (seed 004's
T4), the card where `precision: auto` means fp16.

Where a seed's code leaves a TrainingArguments field unset, the table holds that library default (marked
"implied"): it is what the seed ran with.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import pytest

from qatune import hardware, training
from qatune.formats import FORMATS
from qatune.modeling import lora_config
from qatune.profiles import resolve
from tests.seeds import SEEDS

ROOT = Path(__file__).resolve().parents[2]
WARMUP = "warmup steps of 1000"  # TrainingArguments.get_warmup_steps(1000): ratio and steps compared alike

# ---------------------------------------------------------------- seed 000: Qwen3-0.6B, LoRA + DPO, 4-bit
SEED000 = {
    "base_model.source": "unsloth/Qwen3-0.6B",  # "Unsloht's Qwen3-0.6B"
    "train.backend": "auto",  # Unsloth where CUDA and unsloth are installed
    "train.load_in_4bit": True,  # "4-bit Quantization"
    "train.report_to": ["wandb"],  # "wandb Integration"
    "sft.enabled": False,  # the workflow: model loading -> LoRA fine-tuning with DPO
    "dpo.enabled": True,
    "dpo.method": "dpo",
    "dpo.loss_type": ["sigmoid"],  # DPO's own loss (TRL's default)
    "dpo.batch_size": 2,  # per_device_train_batch_size
    "dpo.grad_accum": 4,  # gradient_accumulation_steps
    "dpo.warmup_ratio": 0.1,
    "dpo.warmup_steps": 0,
    "dpo.epochs": 4,  # num_train_epochs
    "dpo.max_steps": -1,
    "dpo.learning_rate": 5e-6,
    "dpo.logging_steps": 10,
    "dpo.optim": "adamw_8bit",
    "dpo.weight_decay": 0.01,
    "dpo.scheduler": "linear",  # lr_scheduler_type
    "seed": 42,
    "beta": 0.1,
    "dpo.max_length": 1024,
    "clean.max_length": 1024,
    "clean.max_prompt_length": 256,  # TRL 1.x has no max_prompt_length: the clean stage applies it
}
SEED000_DPO_CONFIG = {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 4,
    WARMUP: 100,  # warmup_ratio 0.1
    "num_train_epochs": 4,
    "max_steps": -1,
    "learning_rate": 5e-6,
    "logging_steps": 10,
    "optim": "adamw_8bit",
    "weight_decay": 0.01,
    "lr_scheduler_type": "linear",
    "seed": 42,
    "beta": 0.1,
    "max_length": 1024,
    "loss_type": ["sigmoid"],
    "report_to": ["wandb"],
}

# ---------------------------------------------------------------- seed 001: Qwen2.5-0.5B-Instruct LoRA SFT
SEED001 = {
    "base_model.source": "Qwen/Qwen2.5-0.5B-Instruct",  # model_name
    "train.backend": "transformers",  # transformers + peft + TRL's SFTTrainer, no Unsloth
    "fetch.sources[].path": [
        "dataset/qa_fitness_nutrition_train.jsonl",
        "dataset/qa_fitness_nutrition_val.jsonl",
    ],
    "fetch.sources[].use_as": ["train", "val"],  # train_file, eval_file: used as given
    "split.val": 0,
    "split.test": 0,
    "clean.max_length": 512,  # max_length
    "sft.max_length": 512,
    "train.lora.r": 16,
    "train.lora.alpha": 64,
    "train.lora.target_modules": ["q_proj", "v_proj"],
    "train.lora.dropout": 0.15,
    "train.lora.bias": "none",
    "sft.enabled": True,
    "dpo.enabled": False,
    "sft.batch_size": 2,
    "sft.grad_accum": 16,
    "sft.learning_rate": 3e-5,
    "sft.epochs": 5,
    "sft.max_steps": -1,
    "sft.warmup_steps": 50,
    "sft.logging_steps": 20,
    "sft.eval_steps": 50,
    "sft.save_steps": 50,
    "sft.save_total_limit": 2,
    "sft.load_best_model_at_end": True,  # metric_for_best_model: loss
    "train.report_to": [],  # report_to: none
    "sft.scheduler": "linear",  # implied
    "sft.weight_decay": 0.0,  # implied
    "sft.optim": "adamw_torch",  # implied
    "sft.max_grad_norm": 1.0,  # implied
    "sft.warmup_ratio": 0.0,  # implied
    "train.precision": "fp32",  # implied: neither fp16 nor bf16
    "train.system_prompt": None,  # "User: {question}\nAssistant: {answer}": no system line
    "train.prompt_format": "plain",  # that text, the loss on all of it, and served so
    "generate.mode": "adapter",  # inference mode "lora"
    "generate.max_new_tokens": 512,
    "generate.temperature": 0.2,
    "generate.top_p": 0.9,
}
SEED001_SFT_CONFIG = {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 16,
    "learning_rate": 3e-5,
    "num_train_epochs": 5,
    "max_steps": -1,
    WARMUP: 50,
    "logging_steps": 20,
    "eval_strategy": "steps",
    "eval_steps": 50,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 2,
    "load_best_model_at_end": True,
    "metric_for_best_model": "eval_loss",  # the Trainer reads the seed's "loss" as eval_loss
    "greater_is_better": False,
    "report_to": [],
    "max_length": 512,
    "lr_scheduler_type": "linear",
    "weight_decay": 0.0,
    "optim": "adamw_torch",
    "max_grad_norm": 1.0,
    "fp16": False,
    "bf16": False,
}
SEED001_LORA = {
    "r": 16,
    "lora_alpha": 64,
    "target_modules": {"q_proj", "v_proj"},
    "lora_dropout": 0.15,
    "bias": "none",
    "task_type": "CAUSAL_LM",
}

# ---------------------------------------------------------------- seed 002: gemma-2b-it SFT on response_j
SEED002 = {
    "base_model.source": "google/gemma-2b-it",
    "train.backend": "transformers",  # "Framework: Hugging Face Transformers"
    "fetch.sources[].type": ["hub"],
    "fetch.sources[].dataset": ["jkhedri/psychology-dataset"],
    "fetch.sources[].format": ["response_jk"],  # question, response_j (trained), response_k (excluded)
    "data_samples": 0,  # DATA_SAMPLES test mode: 0 = all rows
    "train.load_in_4bit": True,  # bitsandbytes 4-bit (train.load_in_8bit is its 8-bit option)
    "train.load_in_8bit": False,
    "train.report_to": ["tensorboard"],
    "sft.enabled": True,
    "dpo.enabled": False,  # response_k is never trained on
}
SEED002_SFT_CONFIG = {"report_to": ["tensorboard"], "eval_strategy": "steps"}  # train and eval loss monitored

# ---------------------------------------------------------------- seed 003: the guide's QLoRA recipe
SEED003 = {
    "base_model.source": "mistralai/Mistral-7B-Instruct-v0.1",  # the guide's "mistral-7b", Instruct (a chat template)
    "train.backend": "transformers",  # transformers + peft
    "fetch.sources[].format": ["alpaca"],  # instruction, input, output
    "split.val": 0.1,  # train_test_split(test_size=0.1)
    "split.test": 0,
    "clean.max_length": 2048,  # tokenizer(max_length=2048, truncation=True)
    "sft.max_length": 2048,
    "train.load_in_4bit": True,
    "train.bnb_4bit_quant_type": "nf4",
    "train.bnb_4bit_use_double_quant": True,
    "train.precision": "fp16",  # bnb_4bit_compute_dtype=torch.float16
    "train.lora.r": 16,
    "train.lora.alpha": 32,
    "train.lora.dropout": 0.05,
    "train.lora.target_modules": ["q_proj", "v_proj"],
    "train.lora.bias": "none",
    "sft.learning_rate": 2e-5,
    "sft.epochs": 3,
    "sft.max_steps": -1,
    "sft.warmup_ratio": 0.1,
    "sft.warmup_steps": 0,
    "sft.weight_decay": 0.01,
    "sft.batch_size": 4,
    "sft.eval_batch_size": 8,
    "sft.grad_accum": 4,
    "sft.optim": "adamw_8bit",
    "sft.max_grad_norm": 1.0,
    "sft.logging_steps": 10,
    "sft.save_steps": 100,
    "sft.eval_steps": 50,
    "sft.save_total_limit": None,  # implied: every checkpoint kept (it loads ./results/checkpoint-1000)
    "sft.scheduler": "linear",  # implied
    "train.report_to": ["tensorboard"],
    "train.activation_checkpointing": True,  # "use gradient checkpointing"
    "train.checkpoint_layers": 1.0,
    "sft.enabled": True,
    "dpo.enabled": False,
    "generate.temperature": 0.7,  # its generate(): do_sample, temperature 0.7, top_p 0.9
    "generate.top_p": 0.9,
}
SEED003_SFT_CONFIG = {
    "learning_rate": 2e-5,
    "num_train_epochs": 3,
    WARMUP: 100,  # warmup_ratio 0.1
    "weight_decay": 0.01,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 4,
    "optim": "adamw_8bit",
    "max_grad_norm": 1.0,
    "logging_steps": 10,
    "save_steps": 100,
    "eval_steps": 50,
    "save_total_limit": None,
    "save_strategy": "steps",
    "eval_strategy": "steps",
    "report_to": ["tensorboard"],
    "gradient_checkpointing": True,
    "fp16": True,
    "max_length": 2048,
    "lr_scheduler_type": "linear",
}
SEED003_LORA = {
    "r": 16,
    "lora_alpha": 32,
    "target_modules": {"q_proj", "v_proj"},
    "lora_dropout": 0.05,
    "bias": "none",
    "task_type": "CAUSAL_LM",
}

# ---------------------------------------------------------------- seed 004: Llama-3.2-3B QLoRA, FineTome + WizardLM
SEED004 = {
    "base_model.source": "unsloth/Llama-3.2-3B-Instruct",
    "train.backend": "auto",  # Unsloth where CUDA and unsloth are installed
    "train.precision": "auto",  # dtype None: auto-detected (fp16 on the T4)
    "train.load_in_4bit": True,
    "sft.max_length": 2048,  # max_seq_length
    "clean.max_length": 2048,
    "fetch.sources[].dataset": ["mlabonne/FineTome-100k", "WizardLMTeam/WizardLM_evol_instruct_70k"],
    "fetch.sources[].samples": [15000, 15000],
    "fetch.sources[].format": ["sharegpt", "alpaca"],
    "split.val": 0.05,  # 95% training, 5% test
    "split.test": 0,
    "sft.train_turns": "all",  # train_on_responses_only: every assistant turn, no user tokens
    "sft.enabled": True,
    "dpo.enabled": False,
    "sft.batch_size": 4,
    "sft.grad_accum": 4,
    "sft.max_steps": 40,
    "sft.learning_rate": 2e-5,
    "sft.warmup_steps": 50,
    "sft.optim": "adamw_8bit",
    "sft.weight_decay": 0.01,
    "sft.scheduler": "linear",
    "sft.logging_steps": 10,
    "sft.eval_steps": 10,  # eval_strategy "steps": every logging_steps (10)
    "generate.mode": "adapter",  # the app: base + LoRA adapter
    "chat.device": "cpu",  # device = "cpu"
    "chat.dtype": "float32",  # the base in torch.float32
}
SEED004_SFT_CONFIG = {
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 4,
    "max_steps": 40,
    "learning_rate": 2e-5,
    WARMUP: 50,
    "optim": "adamw_8bit",
    "weight_decay": 0.01,
    "lr_scheduler_type": "linear",
    "logging_steps": 10,
    "eval_strategy": "steps",
    "eval_steps": 10,
    "max_length": 2048,
    "fp16": True,  # auto on a T4
}

PARAMS = {
    "seed000-qwen3-dpo": SEED000,
    "seed001-qwen25-sft": SEED001,
    "seed002-gemma-psychology": SEED002,
    "seed003-mistral-qlora": SEED003,
    "seed004-llama32-finetome": SEED004,
}
CONFIGS = {
    "seed000-qwen3-dpo": ("dpo", SEED000_DPO_CONFIG),
    "seed001-qwen25-sft": ("sft", SEED001_SFT_CONFIG),
    "seed002-gemma-psychology": ("sft", SEED002_SFT_CONFIG),
    "seed003-mistral-qlora": ("sft", SEED003_SFT_CONFIG),
    "seed004-llama32-finetome": ("sft", SEED004_SFT_CONFIG),
}
LORAS = {"seed001-qwen25-sft": SEED001_LORA, "seed003-mistral-qlora": SEED003_LORA}
NAMES = [seed.profile for seed in SEEDS]


def value_at(params, dotted: str) -> Any:
    """A params value by dotted key; `a.list[].field` is that field of every item of the list."""
    head, _, field = dotted.partition("[].")
    node = params
    for key in head.split("."):
        node = getattr(node, key)
    return [getattr(item, field) for item in node] if field else node


def plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def stage_config(params, method: str, out: Path):
    """The config stages/sft.py or stages/dpo.py builds for these params on a CUDA card without bf16 (a T4):
    qatune.training.trainer_args plus the method's own fields, as the stage passes them."""
    from trl import DPOConfig, SFTConfig

    train, cfg = params.train, getattr(params, method)
    hw = hardware.Hardware(
        precision=hardware.select_precision(train.precision, True, False, False),
        cuda=True,
        cuda_bf16=False,
        cpu_bf16=False,
    )
    args = training.trainer_args(train, cfg, hw, params.seed, str(out))
    if method == "sft":
        return SFTConfig(
            **args,
            packing=cfg.packing,
            padding_free=cfg.padding_free,
            assistant_only_loss=True,  # chat rows ("messages"), as every seed's data becomes
            train_sampling_strategy="group_by_length"
            if cfg.group_by_length and not cfg.packing
            else "random",
        )
    return DPOConfig(
        **args,
        beta=params.beta,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        precompute_ref_batch_size=cfg.precompute_ref_batch_size,
        loss_type=list(cfg.loss_type),
        loss_weights=list(cfg.loss_weights) if cfg.loss_weights else None,
        truncation_mode="keep_start",
    )


def test_every_seed_has_a_table():
    assert set(PARAMS) == set(CONFIGS) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_seed_document_values_reach_the_resolved_params(name):
    params = resolve(name, ROOT / "profiles")[1]
    got = {key: value_at(params, key) for key in PARAMS[name]}
    assert got == PARAMS[name]


@pytest.mark.parametrize("name", NAMES)
def test_seed_document_values_reach_the_stage_config(name, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # the tests' "disabled" would drop wandb from report_to
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "runs"))
    method, want = CONFIGS[name]
    config = stage_config(resolve(name, ROOT / "profiles")[1], method, tmp_path)
    got = {
        key: config.get_warmup_steps(1000) if key == WARMUP else plain(getattr(config, key)) for key in want
    }
    assert got == want


@pytest.mark.parametrize("name", sorted(LORAS))
def test_seed_document_lora_values_reach_peft(name):
    config = lora_config(resolve(name, ROOT / "profiles")[1].train)
    got = {key: plain(getattr(config, key)) for key in LORAS[name]}
    assert got == LORAS[name]


def test_the_stages_build_their_configs_as_stage_config_does():
    """stage_config above repeats what the stages pass; if a stage builds its config another way, this fails
    and stage_config must follow it (the stage test in tests/stages/test_profiles_tiny.py reads the arguments
    the real run saved)."""
    sft = (ROOT / "stages/sft.py").read_text()
    dpo = (ROOT / "stages/dpo.py").read_text()
    call = "**training.trainer_args(params.train, cfg, hw, params.seed, checkpoints),"
    assert f"config = SFTConfig(\n        {call}" in sft
    assert f'common = {{\n        {call}\n        "beta": params.beta,' in dpo
    assert "return DPOConfig(\n        **common," in dpo and "config = preference_config(cfg, common)" in dpo


def test_seed_002_trains_response_j_and_never_response_k():
    prompt, chosen, rejected = FORMATS["response_jk"](
        {"question": "I feel low.", "response_j": "That sounds hard.", "response_k": "Get over it."}
    )
    assert prompt[-1] == {"role": "user", "content": "I feel low."}
    assert (chosen, rejected) == ("That sounds hard.", "Get over it.")  # SFT learns `chosen` only


def test_seed_003_alpaca_rows_keep_instruction_and_input():
    prompt, chosen, _ = FORMATS["alpaca"](
        {"instruction": "Translate English to French", "input": "Hello, how are you?", "output": "Bonjour"}
    )
    assert "Translate English to French" in prompt[-1]["content"]
    assert "Hello, how are you?" in prompt[-1]["content"] and chosen == "Bonjour"
