"""What qatune decides about a CUDA machine before anything loads: bf16 only in hardware (Ampere and newer),
one GPU for one process, and a GPU profile that stops when there is no GPU. torch's CUDA probes are faked."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch

from qatune import hardware
from qatune.errors import QatuneError


def fake_gpu(monkeypatch, capability: tuple[int, int], name: str = "fake GPU") -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    # What torch 2.14 answers on every one of them (emulation counts): it must not decide.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


@pytest.mark.parametrize(
    ("card", "capability", "bf16", "auto_precision"),
    [
        ("V100", (7, 0), False, "fp16"),
        ("T4 / RTX 20xx", (7, 5), False, "fp16"),
        ("A100", (8, 0), True, "bf16"),
        ("H100", (9, 0), True, "bf16"),
    ],
)
def test_bf16_on_cuda_only_from_ampere(monkeypatch, card, capability, bf16, auto_precision):
    fake_gpu(monkeypatch, capability, card)
    hw = hardware.probe()
    assert (hw.cuda, hw.cuda_bf16, hw.device) == (True, bf16, card)
    assert hardware.select_precision("auto", True, hw.cuda_bf16, hw.cpu_bf16) == auto_precision
    if not bf16:  # an explicit bf16 on a Turing/Volta card is refused, not emulated
        with pytest.raises(QatuneError, match="no bf16"):
            hardware.select_precision("bf16", True, hw.cuda_bf16, hw.cpu_bf16)


@pytest.mark.parametrize(
    ("visible", "gpus", "pinned"),
    [
        (None, 0, None),  # a CPU machine: nothing to pin
        (None, 1, None),
        (None, 4, "0"),  # four GPUs, one process: the first
        ("2,3", 0, "2"),  # the first of those the user left visible
        (" 3 , 1", 0, "3"),
        ("GPU-8f3c,GPU-77aa", 0, "GPU-8f3c"),  # UUIDs and MIG ids are passed on as written
        ("1", 0, None),  # already one
        ("", 0, None),  # none visible
    ],
)
def test_one_process_sees_one_gpu(visible, gpus, pinned):
    assert hardware.one_gpu_visible(visible, gpus) == pinned


def test_resolve_pins_one_gpu_before_cuda_starts_and_says_so(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "recorded, so that the pin is undone after the test")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(hardware, "nvml_gpu_count", lambda: 2)
    seen = {}

    def is_available():  # CUDA starts here: the pin must already be in the environment
        seen["visible"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        return False

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    train = types.SimpleNamespace(
        num_processes=1,
        require_cuda=False,
        load_in_4bit=False,
        load_in_8bit=False,
        backend="auto",
        precision="fp32",
        lm_head="auto",
        checkpoint_layers=1.0,
    )
    hardware.resolve(train)
    assert seen["visible"] == "0"
    assert "training on GPU 0 only" in capsys.readouterr().out


@pytest.mark.parametrize(("num_processes", "world_size"), [(2, None), (1, "2")])
def test_several_processes_keep_their_gpus(monkeypatch, num_processes, world_size):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    if world_size:  # a process torchrun started: it has its own GPU by LOCAL_RANK
        monkeypatch.setenv("WORLD_SIZE", world_size)
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    hardware.pin_one_gpu(num_processes)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_a_gpu_profile_stops_without_cuda():
    with pytest.raises(QatuneError, match=r"^train.require_cuda: .*sees none"):
        hardware.check_cuda_required(True, False)
    hardware.check_cuda_required(True, True)
    hardware.check_cuda_required(False, False)  # the CPU default


def test_the_gpu_profiles_say_they_need_cuda():
    from qatune.profiles import merged

    root = Path(__file__).resolve().parents[2]
    needs = {}
    for path in sorted((root / "profiles").glob("*.yaml")):
        _, params = merged(path.stem, root / "params.yaml", root / "profiles")
        needs[path.stem] = params.train.require_cuda
        if params.train.load_in_4bit or params.train.load_in_8bit:  # no CUDA, no bitsandbytes: a GPU profile
            assert params.train.require_cuda, path.stem
    assert needs["cpu-default"] is False
