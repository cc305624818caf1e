"""The models the training stages hand to TRL and the loaders give every later stage: float32 trainable
weights whatever TRL cast, a pad token on every tokenizer, the SFT adapter loaded the backend's way, the
DPO reference adapter left out of the result, and a provenance that says which 4-bit settings applied.
Tiny random models on the CPU; Unsloth (GPU only) is a stand-in module that records its calls."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from qatune import modeling, training
from qatune.hardware import Hardware
from tests.tiny import build_model, build_tokenizer

LORA = types.SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none")


def tiny_train(**changes):
    values = dict(
        lora=LORA,
        activation_checkpointing=False,
        load_in_4bit=False,
        load_in_8bit=False,
        prompt_format="chat",
        trust_remote_code=False,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
    )
    return types.SimpleNamespace(**{**values, **changes})


def tiny_peft_model():
    from peft import get_peft_model

    tokenizer = build_tokenizer()
    return get_peft_model(build_model(tokenizer), modeling.lora_config(tiny_train())), tokenizer


def trainable_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad}


# --------------------------------------------------------------------------- trainable weights in float32


def test_bf16_lora_weights_become_float32_and_frozen_weights_stay(tmp_path):
    model, _ = tiny_peft_model()
    model.to(torch.bfloat16)  # base and LoRA weights all bf16
    lora = sum(1 for p in model.parameters() if p.requires_grad)
    assert training.trainable_to_float32(model) == lora > 0
    assert trainable_dtypes(model) == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert training.trainable_to_float32(model) == 0  # nothing left to cast


def test_trls_cast_of_a_quantised_models_lora_weights_is_undone(tmp_path):
    """TRL casts a quantised model's trainable weights to bf16 in SFTTrainer.__init__ (it asks the model's
    is_loaded_in_4bit); the tiny model says it is quantised so that TRL's own code path runs."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = tiny_peft_model()
    model.get_base_model().is_loaded_in_4bit = True
    config = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=1,
        per_device_train_batch_size=1,
    )
    rows = Dataset.from_list([{"text": "Squat three times a week."}, {"text": "Drink water."}])
    trainer = SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer)
    assert trainable_dtypes(trainer.model) == {torch.bfloat16}, "TRL no longer casts: the test proves nothing"
    training.trainable_to_float32(trainer.model)
    optimizer = trainer.create_optimizer()
    assert {p.dtype for group in optimizer.param_groups for p in group["params"]} == {torch.float32}


# --------------------------------------------------------------------------- a pad token on every tokenizer


@pytest.fixture(scope="module")
def model_without_pad(tmp_path_factory):
    """A tiny model whose tokenizer, like Mistral's, has no pad token."""
    folder = tmp_path_factory.mktemp("nopad") / "model"
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    model = build_model(tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    return folder


def test_the_base_without_adapters_gets_a_pad_token_and_answers_a_padded_batch(model_without_pad):
    from qatune.generation import greedy_answers

    model, tokenizer = modeling.load_with_adapters(model_without_pad)
    assert tokenizer.pad_token == tokenizer.eos_token is not None
    questions = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "How much protein a day?"}],
    ]
    answers, _ = greedy_answers(model, tokenizer, questions, batch_size=2, max_new_tokens=2)
    assert len(answers) == 2


def test_the_training_loader_gives_a_pad_token(model_without_pad):
    hw = Hardware(backend="transformers", cuda=False, cuda_bf16=False, cpu_bf16=False, precision="fp32")
    _, tokenizer = modeling.load_base(str(model_without_pad), tiny_train(), hw, 64)
    assert tokenizer.pad_token == tokenizer.eos_token is not None


def test_the_training_loader_gives_the_tokenizer_the_prompt_format(model_without_pad):
    """train.prompt_format reaches the sft and dpo stages through the base they load: plain puts seed 001's
    User:/Assistant: template on the tokenizer, which the stages then train with and publish."""
    from qatune.templates import is_plain, use_training_template

    hw = Hardware(backend="transformers", cuda=False, cuda_bf16=False, cpu_bf16=False, precision="fp32")
    _, chat = modeling.load_base(str(model_without_pad), tiny_train(), hw, 64)
    assert not is_plain(chat.chat_template) and use_training_template(chat, False)[2] == "assistant_only"
    _, plain = modeling.load_base(str(model_without_pad), tiny_train(prompt_format="plain"), hw, 64)
    published, _, loss_mode = use_training_template(plain, False)
    assert is_plain(published) and loss_mode == "whole_text"


# --------------------------------------------------------------------------- the SFT adapter under DPO


@pytest.fixture
def sft_adapter(tmp_path):
    model, _ = tiny_peft_model()
    model.save_pretrained(tmp_path / "sft")
    return tmp_path / "sft"


@pytest.fixture
def stand_in_unsloth(monkeypatch):
    """An `unsloth` module whose patch_peft_model records what it was given."""
    calls = []

    def patch_peft_model(model, use_gradient_checkpointing="unsloth"):
        calls.append((model, use_gradient_checkpointing))
        return model

    fake = types.ModuleType("unsloth")
    fake.FastLanguageModel = types.SimpleNamespace(patch_peft_model=patch_peft_model)
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    return calls


@pytest.mark.parametrize(
    ("backend", "checkpointing", "patched_with"),
    [
        ("transformers", True, None),  # peft alone, as before
        ("unsloth", True, "unsloth"),  # Unsloth's LoRA kernels and its own checkpointing
        ("unsloth", False, False),
    ],
)
def test_the_sft_adapter_loads_trainable_and_unsloth_patches_it(
    sft_adapter, stand_in_unsloth, backend, checkpointing, patched_with
):
    from peft import PeftModel

    base = build_model(build_tokenizer())
    train = tiny_train(activation_checkpointing=checkpointing)
    model = modeling.load_trainable_adapter(base, sft_adapter, train, backend)
    assert isinstance(model, PeftModel) and trainable_dtypes(model)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    if patched_with is None:
        assert stand_in_unsloth == []
    else:
        assert stand_in_unsloth == [(model, patched_with)]


# --------------------------------------------------------------------------- the DPO result


def test_the_reference_adapter_is_not_kept_with_the_result(tmp_path):
    model, _ = tiny_peft_model()
    model.add_adapter("ref", modeling.lora_config(tiny_train()))  # as TRL's DPOTrainer does
    out = tmp_path / "dpo"
    model.save_pretrained(out)
    assert (out / "ref" / "adapter_config.json").is_file()
    assert training.drop_other_adapters(model, out) == ["ref"]
    assert not (out / "ref").exists() and (out / "adapter_config.json").is_file()


# --------------------------------------------------------------------------- 4-bit settings in the provenance


@pytest.mark.parametrize("backend", ["transformers", "unsloth"])
def test_the_provenance_records_the_applied_4bit_settings(backend):
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float16,
    )
    model = types.SimpleNamespace(config=types.SimpleNamespace(quantization_config=config))
    record = modeling.quantization_record(model, tiny_train(load_in_4bit=True), backend)
    assert record["applied"]["bnb_4bit_quant_type"] == "nf4"
    assert record["applied"]["bnb_4bit_compute_dtype"] in ("float16", "torch.float16")
    assert ("not_applied" in record) == (backend == "unsloth")
    assert modeling.quantization_record(model, tiny_train(), backend) is None


@pytest.mark.parametrize("backend", ["transformers", "unsloth"])
def test_the_provenance_records_the_applied_8bit_settings(backend):
    config = modeling.quantization_config(tiny_train(load_in_8bit=True), "fp16", fsdp=False)
    model = types.SimpleNamespace(config=types.SimpleNamespace(quantization_config=config))
    record = modeling.quantization_record(model, tiny_train(load_in_8bit=True), backend)
    assert record == {"applied": {"load_in_8bit": "True", "llm_int8_threshold": "6.0"}}


# --------------------------------------------------------------------------- the BitsAndBytesConfig built


def test_the_quantisation_config_is_4_bit_8_bit_or_none():
    four = modeling.quantization_config(
        tiny_train(load_in_4bit=True, bnb_4bit_quant_type="fp4"), "bf16", False
    )
    assert (four.load_in_4bit, four.load_in_8bit, four.bnb_4bit_quant_type) == (True, False, "fp4")
    assert four.bnb_4bit_use_double_quant and four.bnb_4bit_compute_dtype == torch.bfloat16
    eight = modeling.quantization_config(tiny_train(load_in_8bit=True), "bf16", False)
    assert (eight.load_in_8bit, eight.load_in_4bit, eight.quantization_method()) == (True, False, "llm_int8")
    assert modeling.quantization_config(tiny_train(), "bf16", False) is None
