"""Models in memory: the base loaded for training (transformers + peft, or Unsloth on CUDA), its LoRA
config, and the one loader every later stage uses for a base model with adapters on top (scoring, merge,
`qatune ask` / `qatune chat`). Weights load as safetensors only; trust_remote_code only when params ask.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qatune.hardware import Hardware, fsdp_launched, training_dtype
from qatune.templates import use_prompt_format

UNSLOTH_COMPILE_LOCATION = ".cache/unsloth_compiled_cache"


def import_backend(backend: str) -> None:
    """Import Unsloth when it trains: it patches transformers, TRL and peft, so it must come first.

    The stages call this right after choosing the backend and before importing TRL, datasets or peft.
    """
    if backend == "unsloth":
        # unsloth_zoo writes the modules it generates to ./unsloth_compiled_cache, the repository root when a
        # stage runs, unless UNSLOTH_COMPILE_LOCATION (read once, when unsloth_zoo.compiler is imported) says
        # where: under .cache/, which git and DVC ignore. A location the user set is kept.
        os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", UNSLOTH_COMPILE_LOCATION)
        import unsloth  # noqa: F401


def lora_config(train):
    """peft's LoraConfig from the `train.lora` block."""
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


def load_base(model_dir: str, train, hw: Hardware, max_length: int):
    """(model, tokenizer) for training on the resolved backend (qatune.hardware.resolve). The tokenizer
    renders `train.prompt_format`: the model's chat template, or seed 001's plain User:/Assistant: text."""
    if hw.backend == "unsloth":  # CUDA only: imported here and nowhere else
        from unsloth import FastLanguageModel

        # No device_map: under torchrun Unsloth 2026.10.7 puts each rank on its own GPU itself, 16-bit and
        # 4-bit alike (models/loader.py 1189-1195, loader_utils.prepare_device_map).

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=model_dir,
            max_seq_length=max_length,
            load_in_4bit=train.load_in_4bit,
            # Unsloth's own 8-bit switch (its README's `load_in_8bit = True`), passed only when asked for
            **({"load_in_8bit": True} if train.load_in_8bit else {}),
            dtype=None,
            trust_remote_code=train.trust_remote_code,
        )
        return model, use_prompt_format(ensure_pad_token(tokenizer), train.prompt_format)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantised = train.load_in_4bit or train.load_in_8bit  # hardware.check_quantization has required CUDA
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": train.trust_remote_code}
    if quantised:
        kwargs["quantization_config"] = quantization_config(train, hw.precision, fsdp_launched())
    # Straight onto this process's GPU, in the dtype of the mixed precision; under FSDP a 16-bit base loads
    # on the CPU (rank 0's weights only) and FSDP moves each rank's shard to its GPU (params refuse 8-bit
    # under FSDP).
    if hw.cuda and not (fsdp_launched() and not quantised):
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if hw.cuda:
        kwargs.setdefault("dtype", getattr(torch, training_dtype(hw.precision)))
    else:
        kwargs["dtype"] = torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=train.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quantised:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=train.activation_checkpointing
        )
    return model, use_prompt_format(ensure_pad_token(tokenizer), train.prompt_format)


def quantization_config(train, precision: str, fsdp: bool):
    """The BitsAndBytesConfig the transformers backend loads a quantised base with: 4-bit (QLoRA: nf4 or
    fp4, double quantisation, compute in the training precision) or 8-bit (LLM.int8); None for neither."""
    import torch
    from transformers import BitsAndBytesConfig

    if train.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if not train.load_in_4bit:
        return None
    compute = torch.bfloat16 if precision == "bf16" else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=train.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=train.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute,
        # FSDP shards floating-point parameters only (accelerate 1.15 leaves uint8 Params4bit whole on
        # every GPU): the packed 4-bit weights stored as the compute dtype shard like the others.
        **({"bnb_4bit_quant_storage": compute} if fsdp else {}),
    )


def ensure_pad_token(tokenizer):
    """Batches need a pad token and some tokenizers have none (Mistral's): pad with the end-of-sequence
    token, which the attention mask and the -100 labels keep out of every loss and answer."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def unsloth_checkpointing(train) -> str | bool:
    """Unsloth's activation checkpointing (its own offloading variant) when `train` asks for it."""
    return "unsloth" if train.activation_checkpointing else False


def unsloth_peft(model, train, seed: int):
    from unsloth import FastLanguageModel

    lora = train.lora
    return FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias=lora.bias,
        use_gradient_checkpointing=unsloth_checkpointing(train),
        random_state=seed,
    )


def load_trainable_adapter(model, folder: str | Path, train, backend: str):
    """`model` with the LoRA adapter in `folder` on top, trainable (the dpo stage's SFT adapter).

    peft loads it on both backends, as Unsloth's own FastLanguageModel.from_pretrained does for an adapter
    folder (unsloth 2026.10.7, models/loader.py: PeftModel.from_pretrained(..., is_trainable=True), then
    patch_peft_model). On the unsloth backend patch_peft_model then swaps in Unsloth's LoRA kernels and its
    activation checkpointing, which plain peft loading leaves out (slower, more memory)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model = FastLanguageModel.patch_peft_model(
            model, use_gradient_checkpointing=unsloth_checkpointing(train)
        )
    return model


# The BitsAndBytesConfig fields that say how the base's weights were quantised, in 4 and in 8 bits.
BNB_FIELDS = ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")
BNB_8BIT_FIELDS = ("load_in_8bit", "llm_int8_threshold")


def quantization_record(model, train, backend: str) -> dict[str, Any] | None:
    """For the provenance: the 4-bit or 8-bit settings the loaded weights carry
    (model.config.quantization_config), and on the unsloth backend which `train` keys did not apply. Unsloth
    2026.10.7 builds its own BitsAndBytesConfig (nf4, double quantisation, compute dtype of the model;
    models/llama.py) and qatune passes it none, so train.bnb_4bit_quant_type and bnb_4bit_use_double_quant
    only reach the transformers backend. None when the base is not quantised."""
    if not (train.load_in_4bit or train.load_in_8bit):
        return None
    config = getattr(model.config, "quantization_config", None)
    applied = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    fields = BNB_FIELDS if train.load_in_4bit else BNB_8BIT_FIELDS
    record: dict[str, Any] = {"applied": {k: str(applied[k]) for k in fields if k in applied}}
    if backend == "unsloth" and train.load_in_4bit:
        record["not_applied"] = ["train.bnb_4bit_quant_type", "train.bnb_4bit_use_double_quant"]
    return record


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def load_with_adapters(
    model_dir: str | Path,
    adapters: Sequence[tuple[str, str | Path]] = (),
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """(model, tokenizer): the model in `model_dir` with each named LoRA adapter loaded on top (the first
    one active), in `dtype` on `device`, in eval mode.

    The tokenizer comes from the last adapter folder that has one (it carries the chat template the
    adapter was trained with), else from `model_dir`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = model_dir
    for _, folder in adapters:
        if (Path(folder) / "tokenizer_config.json").is_file():
            tok_dir = folder
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code
    )
    ensure_pad_token(tokenizer)  # a base's own tokenizer may have none (Mistral); generation pads
    for i, (name, folder) in enumerate(adapters):
        if i == 0:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, folder, adapter_name=name)
        else:
            model.load_adapter(folder, adapter_name=name)
    return model.to(device).eval(), tokenizer
