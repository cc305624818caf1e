"""Where every model-loading stage puts its model, and in which dtype, on the four kinds of machine."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from qatune.errors import QatuneError
from qatune.hardware import Hardware, placement, score_dtype, select_checkpoint_layers

ROOT = Path(__file__).resolve().parents[2]

MACHINES = {
    "cpu": Hardware(cuda=False, cuda_bf16=False, cpu_bf16=False),
    "cpu+bf16": Hardware(cuda=False, cuda_bf16=False, cpu_bf16=True),
    "cuda+bf16": Hardware(cuda=True, cuda_bf16=True, cpu_bf16=False),
    "cuda fp16-only (T4)": Hardware(cuda=True, cuda_bf16=False, cpu_bf16=True),
}
# stage (what it loads the model for) -> machine -> (device, dtype)
TABLE = {
    "score@* loading and adapter merge (scoring: score_dtype)": (
        "score",
        ["cpu float32", "cpu float32", "cuda float32", "cuda float32"],
    ),
    "score@* answers, dpo on-policy pairs": (
        "generate",
        ["cpu float32", "cpu bfloat16", "cuda bfloat16", "cuda float16"],
    ),
    "merge": ("merge", ["cpu float32", "cpu float32", "cuda float32", "cuda float32"]),
    "qatune ask / chat": ("serve", ["cpu float32", "cpu float32", "cuda bfloat16", "cuda float16"]),
}


@pytest.mark.parametrize("stage", sorted(TABLE))
@pytest.mark.parametrize("machine", list(MACHINES))
def test_placement_table(stage, machine):
    purpose, row = TABLE[stage]
    expected = row[list(MACHINES).index(machine)]
    assert " ".join(placement(purpose, MACHINES[machine])) == expected


# (is there CUDA, its compute capability, AVX512-BF16/AMX on the CPU) -> train.precision auto, base weights
TRAINING_MACHINES = {
    "cpu": (False, None, False, "fp32", "float32"),
    "cpu+bf16": (False, None, True, "bf16", "float32"),  # fp32 weights under bf16 autocast
    "V100 (sm70)": (True, (7, 0), True, "fp16", "float16"),  # bf16 only emulated there: never bf16 weights
    "T4 (sm75)": (True, (7, 5), True, "fp16", "float16"),
    "A100 (sm80)": (True, (8, 0), False, "bf16", "bfloat16"),
    "H100 (sm90)": (True, (9, 0), False, "bf16", "bfloat16"),
}


@pytest.mark.parametrize("machine", list(TRAINING_MACHINES))
def test_training_precision_and_the_dtype_the_base_loads_in(machine, monkeypatch):
    """hardware.resolve on a faked machine, then modeling.load_base with a from_pretrained that only records
    what it was asked: the dtype the sft and dpo stages really load their base in."""
    import torch
    import transformers

    from qatune import hardware, modeling
    from qatune.params import load_params

    cuda, capability, cpu_bf16, precision, weights = TRAINING_MACHINES[machine]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: machine)
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: cpu_bf16)
    monkeypatch.setattr(hardware, "pin_one_gpu", lambda num_processes: None)
    monkeypatch.setattr(hardware, "unsloth_importable", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    train = load_params(ROOT / "params.yaml").train.model_copy(
        update={"backend": "auto", "precision": "auto"}
    )
    hw = hardware.resolve(train)
    assert hw.precision == precision

    asked = {}
    tokenizer = SimpleNamespace(pad_token="<pad>")
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda folder, **kw: asked.update(kw) or "model"
    )
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda folder, **kw: tokenizer)
    assert modeling.load_base("models/base", train, hw, 64) == ("model", tokenizer)
    assert asked["dtype"] == getattr(torch, weights)
    assert ("device_map" in asked) == cuda


# the CPU's flags line in /proc/cpuinfo (None: no /proc/cpuinfo) -> whether bf16 is fast there
CPU_FLAGS = {
    "AVX512-BF16 (Cooper Lake, Zen 4)": ("fpu sse2 avx2 avx512f avx512bw avx512_bf16", True),
    "AMX (Sapphire Rapids)": ("fpu sse2 avx2 avx512f amx_bf16 amx_tile amx_int8", True),
    "AVX-512 without bf16 (Skylake)": ("fpu sse2 avx2 avx512f avx512bw avx512_vnni", False),
    "AVX2 only": ("fpu sse2 avx2 fma", False),
    "no /proc/cpuinfo": (None, False),
}


@pytest.mark.parametrize("cpu", list(CPU_FLAGS))
def test_a_cpu_works_in_bf16_only_with_avx512_bf16_or_amx(cpu, tmp_path, monkeypatch):
    """From the CPU's own flags through probe() and resolve(): with AVX512-BF16 or AMX, precision auto trains
    in bf16 and scoring and greedy answers run in bfloat16; on any other CPU all three stay float32. Chat
    serves in float32 on every CPU."""
    import torch

    from qatune import hardware
    from qatune.params import load_params

    flags, fast = CPU_FLAGS[cpu]
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text("".join(f"processor\t: {i}\nflags\t\t: {flags}\n\n" for i in range(2)))
    monkeypatch.setattr(hardware, "CPUINFO", cpuinfo)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "pin_one_gpu", lambda num_processes: None)
    train = load_params(ROOT / "params.yaml").train.model_copy(
        update={"backend": "auto", "precision": "auto"}
    )
    hw = hardware.resolve(train)
    dtype = "bfloat16" if fast else "float32"
    assert (hw.cuda, hw.device, hw.cpu_bf16) == (False, "cpu", fast)
    assert hw.precision == ("bf16" if fast else "fp32")
    assert score_dtype("auto", hw) == dtype
    assert placement("generate", hw) == ("cpu", dtype)
    assert placement("serve", hw) == ("cpu", "float32")


def test_unknown_purpose_is_refused():
    with pytest.raises(ValueError, match="unknown purpose"):
        placement("train", MACHINES["cpu"])


@pytest.mark.parametrize(
    ("machine", "auto"),
    [
        ("cpu", "float32"),
        ("cpu+bf16", "bfloat16"),
        ("cuda+bf16", "bfloat16"),
        ("cuda fp16-only (T4)", "float32"),
    ],
)
def test_score_precision_auto_is_bf16_only_where_it_is_fast(machine, auto):
    assert score_dtype("auto", MACHINES[machine]) == auto
    assert score_dtype("fp32", MACHINES[machine]) == "float32"


def test_unknown_score_precision_is_refused():
    with pytest.raises(QatuneError, match="evaluate.score_precision: unknown value 'fp16'"):
        score_dtype("fp16", MACHINES["cpu"])


@pytest.mark.parametrize(
    ("requested", "precision", "cuda", "share"),
    [
        ("auto", "bf16", False, 0.25),  # a bf16 CPU: a quarter of the layers (measured: faster, < 4 GB)
        ("auto", "fp32", False, 1.0),  # fp32 activations are twice the size: every layer
        ("auto", "bf16", True, 1.0),  # a GPU: memory is what checkpointing is for
        ("auto", "fp16", True, 1.0),
        (0.5, "bf16", True, 0.5),  # an explicit share is kept anywhere
        (1.0, "bf16", False, 1.0),
    ],
)
def test_checkpoint_layers_auto(requested, precision, cuda, share):
    assert select_checkpoint_layers(requested, precision, cuda) == share


def test_a_machine_must_say_what_it_can_do():
    """A Hardware that leaves out CUDA or bf16 is refused, not taken for a CPU without bf16."""
    with pytest.raises(TypeError, match="cuda"):
        Hardware(backend="transformers", precision="fp32")  # type: ignore[call-arg]


@pytest.mark.parametrize("unsloth", [False, True])
@pytest.mark.parametrize("name", sorted(MACHINES))
def test_a_stage_and_qatune_plan_make_the_same_choices(name, unsloth, monkeypatch):
    """hardware.resolve (the machine a stage runs on) and hardware.choose on the same machine only described,
    as `qatune plan` describes a card, choose the same backend, precision, head and checkpointed share."""
    from qatune import hardware
    from qatune.params import load_params

    machine = MACHINES[name]
    monkeypatch.setattr(hardware, "probe", lambda: machine)
    monkeypatch.setattr(hardware, "pin_one_gpu", lambda num_processes: None)
    monkeypatch.setattr(hardware, "unsloth_importable", lambda: unsloth)
    shipped = load_params(ROOT / "params.yaml").train
    for asks in ({"backend": "auto", "precision": "auto"}, {"precision": "fp32", "lm_head": "trl"}):
        train = shipped.model_copy(update=asks)
        described = Hardware(cuda=machine.cuda, cuda_bf16=machine.cuda_bf16, cpu_bf16=machine.cpu_bf16)
        staged, planned = hardware.resolve(train), hardware.choose(train, described)
        chosen = ("backend", "precision", "lm_head", "checkpoint_layers")
        assert [getattr(staged, k) for k in chosen] == [getattr(planned, k) for k in chosen]
        assert staged.backend == (
            "unsloth" if machine.cuda and unsloth and train.backend == "auto" else "transformers"
        )
