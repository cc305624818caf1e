"""Backend, precision and quantisation selection (pure), and the training chat template."""

from dataclasses import replace

import pytest

from qatune.errors import QatuneError
from qatune.hardware import Hardware, check_quantization, select_backend, select_precision
from qatune.templates import chat_template_for_training, sft_example
from qatune.training import python_command


@pytest.mark.parametrize(
    ("requested", "cuda", "unsloth", "expected"),
    [
        ("auto", False, False, "transformers"),
        ("auto", False, True, "transformers"),  # unsloth cannot run without a GPU even when installed
        ("auto", True, False, "transformers"),
        ("auto", True, True, "unsloth"),
        ("transformers", True, True, "transformers"),
        ("unsloth", True, True, "unsloth"),
    ],
)
def test_select_backend(requested, cuda, unsloth, expected):
    assert select_backend(requested, cuda, unsloth) == expected


def test_unsloth_without_gpu_or_package_is_refused():
    with pytest.raises(QatuneError, match="needs a CUDA GPU"):
        select_backend("unsloth", False, True)
    with pytest.raises(QatuneError, match="not installed"):
        select_backend("unsloth", True, False)


@pytest.mark.parametrize(
    ("requested", "cuda", "cuda_bf16", "cpu_bf16", "expected"),
    [
        ("auto", False, False, False, "fp32"),
        ("auto", False, False, True, "bf16"),
        ("auto", True, True, False, "bf16"),
        ("auto", True, False, False, "fp16"),  # T4 (seed 004): no bf16
        ("fp32", True, True, True, "fp32"),
        ("bf16", False, False, False, "bf16"),  # allowed on CPU, just slower without AVX512-BF16
    ],
)
def test_select_precision(requested, cuda, cuda_bf16, cpu_bf16, expected):
    assert select_precision(requested, cuda, cuda_bf16, cpu_bf16) == expected


def test_bad_precision_requests():
    with pytest.raises(QatuneError, match="fp16 mixed precision needs a CUDA GPU"):
        select_precision("fp16", False, False, True)
    with pytest.raises(QatuneError, match="no bf16"):
        select_precision("bf16", True, False, False)


def test_4bit_on_cpu_is_refused_with_a_clear_message():
    with pytest.raises(QatuneError, match="4-bit .* needs a CUDA GPU"):
        check_quantization(True, False)
    check_quantization(True, True)
    check_quantization(False, False)


def test_8bit_on_cpu_is_refused_with_a_clear_message():
    with pytest.raises(QatuneError, match=r"^train.load_in_8bit: 8-bit .* needs a CUDA GPU") as err:
        check_quantization(False, False, load_in_8bit=True)
    assert "\n" not in str(err.value)
    check_quantization(False, True, load_in_8bit=True)


def test_examples_carry_the_system_prompt():
    row = {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "A."}
    ex = sft_example(row, "Be safe.", "assistant_only")
    assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"]
    ex = sft_example(row, None, "completion_only")
    assert ex == {
        "prompt": [{"role": "user", "content": "Q?"}],
        "completion": [{"role": "assistant", "content": "A."}],
    }


def test_multi_process_command_uses_torchrun():
    assert python_command("stages/sft.py", 1, ["--x"])[1:] == ["stages/sft.py", "--x"]
    cmd = python_command("stages/sft.py", 2, [])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc_per_node=2" in cmd


def test_label_mask_prompt_is_ignored_answer_is_learned(tiny_model_dir):
    """Through TRL's own collator: every prompt token is -100, every answer token (and <|im_end|>) is not."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template, mode = chat_template_for_training(tok)
    row = {"prompt": [{"role": "user", "content": "How much protein?"}], "chosen": "Eat 1.6 g per kg."}
    ds = Dataset.from_list([sft_example(row, "Be safe.", mode)])
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        processing_class=tok,
        train_dataset=ds,
        peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        args=SFTConfig(
            output_dir="/tmp/qatune-mask",
            assistant_only_loss=True,
            use_cpu=True,
            report_to="none",
            per_device_train_batch_size=1,
            max_length=128,
        ),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    prompt_len = len(
        tok(
            tok.apply_chat_template(
                [{"role": "system", "content": "Be safe."}, *row["prompt"]],
                tokenize=False,
                add_generation_prompt=True,
            ),
            add_special_tokens=False,
        )["input_ids"]
    )
    answer = tok(row["chosen"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert all(label == -100 for label in labels[:prompt_len])
    assert (
        labels[prompt_len : prompt_len + len(answer)] == answer == ids[prompt_len : prompt_len + len(answer)]
    )
    assert all(label == -100 for label in labels[prompt_len + len(answer) :])  # the trailing newline


def test_prepare_checkpoints_drops_a_checkpoint_cut_short_and_other_runs(tmp_path):
    from qatune.training import prepare_checkpoints

    folder = tmp_path / "ckpts"
    assert prepare_checkpoints(folder, "run-a") is False
    done, cut = folder / "checkpoint-4", folder / "checkpoint-6"
    done.mkdir()
    (done / "trainer_state.json").write_text('{"global_step": 4}')
    cut.mkdir()  # killed while saving: weights written, trainer_state.json not yet (or half)
    (cut / "adapter_model.safetensors").write_bytes(b"x")
    (cut / "trainer_state.json").write_text('{"global_st')
    assert prepare_checkpoints(folder, "run-a") is True
    assert done.is_dir() and not cut.exists()
    assert prepare_checkpoints(folder, "run-b") is False  # another run's checkpoints are never resumed
    assert not done.exists()


@pytest.mark.parametrize(
    ("step", "max_steps", "finished"),
    [(30, 30, True), (15, 30, False), (112, 112, True)],  # 112: the steps `epochs: 1` came to (max_steps -1)
)
def test_a_checkpoint_at_its_runs_last_step_is_the_end_of_the_run(tmp_path, step, max_steps, finished):
    from qatune.training import run_finished

    (tmp_path / "trainer_state.json").write_text(f'{{"global_step": {step}, "max_steps": {max_steps}}}')
    assert run_finished(tmp_path) is finished


def test_the_logged_losses_give_a_resumed_and_a_taken_over_runs_mean():
    from qatune.training import logged_loss, whole_run_loss

    # logging_steps 5 over 12 steps: intervals 1-5 and 6-10 logged, 11-12 never (no logging step)
    history = [{"loss": 2.0, "step": 5}, {"eval_loss": 9.0, "step": 5}, {"loss": 1.0, "step": 10}]
    assert logged_loss(history, 12) == (15.0, 10)  # a finished run taken over: 15 / 10 steps
    assert logged_loss(history, 7) == (10.0, 5)
    # resumed at step 5, this process ran steps 6-12 at a mean of 0.5 (transformers 5.23: per-run mean)
    assert whole_run_loss(history, 5, 0.5, 12) == pytest.approx((10.0 + 0.5 * 7) / 12)
    assert whole_run_loss(history, 0, 0.5, 12) == 0.5  # not resumed: Trainer's own mean


@pytest.mark.parametrize(
    ("strategy", "cuda", "world", "expected"),
    [
        ("ddp", False, 1, {}),
        ("fsdp", True, 1, {}),  # one process: nothing to shard across
        ("ddp", False, 2, {"ddp_backend": "gloo", "ddp_find_unused_parameters": False}),
        ("ddp", True, 4, {"ddp_backend": "nccl", "ddp_find_unused_parameters": False}),
    ],
)
def test_distributed_args_for_ddp(strategy, cuda, world, expected):
    from qatune.training import distributed_args

    assert distributed_args(strategy, cuda, world) == expected


def test_fsdp_on_gpus_is_trls_fsdp2_preset_and_refused_on_cpu():
    from qatune.training import distributed_args

    args = distributed_args("fsdp", True, 8)
    assert args["fsdp"] == "full_shard auto_wrap"
    cfg = args["fsdp_config"]
    assert (cfg["fsdp_version"], cfg["auto_wrap_policy"], cfg["reshard_after_forward"]) == (
        2,
        "TRANSFORMER_BASED_WRAP",
        True,
    )
    with pytest.raises(QatuneError, match="fsdp needs CUDA GPUs"):
        distributed_args("fsdp", False, 2)


def test_fsdp_config_is_accepted_by_the_installed_training_arguments():
    """The keys qatune passes are ones TrainingArguments knows (it validates fsdp_config at init)."""
    from transformers import TrainingArguments

    from qatune.training import FSDP_CONFIG

    args = TrainingArguments(output_dir="/tmp/qatune-fsdp-args", fsdp="", fsdp_config=dict(FSDP_CONFIG))
    assert args.fsdp_config["fsdp_version"] == 2


@pytest.mark.parametrize(
    ("count", "share", "expected"),
    [
        (4, 1.0, [0, 1, 2, 3]),
        (30, 0.5, list(range(0, 30, 2))),
        (30, 1 / 3, list(range(0, 30, 3))),
        (4, 0.01, [0]),  # at least one layer
        (5, 0.5, [0, 2]),  # round(2.5) = 2 (banker's rounding), evenly spaced
    ],
)
def test_checkpointed_layers_are_evenly_spaced(count, share, expected):
    from qatune.training import checkpointed_layers

    assert checkpointed_layers(count, share) == expected


def _tiny_lora_llama(layers: int = 4):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))


def _grads_and_mlp_calls(model, ids):
    """LoRA gradients of one backward pass, and how often each layer's MLP was entered (twice = recomputed;
    a pre-hook, since the recompute stops early once the last saved tensor is back and never returns)."""
    calls = [0] * len(model.base_model.model.model.layers)
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(model.base_model.model.model.layers)
    ]
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, calls


def test_partial_checkpointing_recomputes_only_its_layers_and_keeps_the_gradients():
    """Through transformers' own checkpointing: after the callback, only layers 0 and 2 of 4 run their
    forward a second time in the backward pass, and the LoRA gradients are those of full checkpointing."""
    import torch

    from qatune.training import partial_checkpointing

    model = _tiny_lora_llama()
    model.train()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    full, full_calls = _grads_and_mlp_calls(model, ids)
    assert full_calls == [2, 2, 2, 2]

    callback = partial_checkpointing(0.5)
    callback.on_train_begin(None, None, None, model=model)
    half, half_calls = _grads_and_mlp_calls(model, ids)
    assert callback.layers == [0, 2] and half_calls == [2, 1, 2, 1]
    assert full.keys() == half.keys()
    for name in full:
        torch.testing.assert_close(half[name], full[name], rtol=1e-5, atol=1e-7)


def test_partial_checkpointing_leaves_a_model_without_checkpointing_alone():
    from qatune.training import partial_checkpointing

    model = _tiny_lora_llama()
    callback = partial_checkpointing(0.5)
    callback.on_train_begin(None, None, None, model=model)
    assert callback.layers == []
    assert not any(layer.gradient_checkpointing for layer in model.base_model.model.model.layers)


def test_partial_checkpointing_is_wired_for_transformers_and_said_not_to_apply_to_unsloth(capsys):
    from types import SimpleNamespace

    from qatune.training import callbacks

    on = SimpleNamespace(activation_checkpointing=True)
    cfg = SimpleNamespace(early_stopping_patience=0, load_best_model_at_end=False)
    half = Hardware(
        cuda=False, cuda_bf16=False, cpu_bf16=False, backend="transformers", checkpoint_layers=0.5
    )
    assert [type(c).__name__ for c in callbacks(on, cfg, "sft", half)] == ["PartialCheckpointing"]
    assert callbacks(on, cfg, "sft", replace(half, checkpoint_layers=1.0)) == []
    assert callbacks(SimpleNamespace(activation_checkpointing=False), cfg, "sft", half) == []
    assert capsys.readouterr().out == ""
    assert callbacks(on, cfg, "sft", replace(half, backend="unsloth")) == []
    assert capsys.readouterr().out.strip() == (
        "train.checkpoint_layers: 0.5 does not apply to the unsloth backend, which checkpoints every layer its own way"
    )


def test_an_adapters_config_is_the_same_file_whatever_the_hash_seed(tmp_path):
    """peft saves target_modules (a set) in hash order; qatune sorts it, so two runs that train the same
    adapter write the same adapter_config.json (the same DVC hash, no new Hub upload). Two processes with
    different PYTHONHASHSEED save one LoraConfig; peft must still read the file back."""
    import os
    import subprocess
    import sys

    script = (
        "import sys; from pathlib import Path; from peft import LoraConfig; from qatune.training import "
        "stable_adapter_config\n"
        "targets = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']\n"
        "LoraConfig(r=4, target_modules=targets).save_pretrained(sys.argv[1])\n"
        "raw = (Path(sys.argv[1]) / 'adapter_config.json').read_text()\n"
        "if sys.argv[2] == 'sort': stable_adapter_config(Path(sys.argv[1]))\n"
        "print(raw)\n"
    )
    files, raw = {}, set()
    for seed in ("1", "2"):
        out = tmp_path / seed
        done = subprocess.run(
            [sys.executable, "-c", script, str(out), "sort"],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        raw.add(done.stdout)
        files[seed] = (out / "adapter_config.json").read_bytes()
    assert len(raw) > 1  # peft alone writes a different file under a different hash seed
    assert len(set(files.values())) == 1
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(tmp_path / "1"))
    assert config.r == 4 and sorted(config.target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
