"""qatune.compat as tables: one row per supported stack (CPU lock, CUDA image), plus the probes on whatever is
installed here (`make test` runs the CPU lock, `make test-cuda-stack` the CUDA image's versions)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qatune import compat
from tests.conftest import ROOT

# The fields that matter, as each stack's TrainingArguments has them (SFTConfig and DPOConfig extend it).
TRAINING_FIELDS = {
    "transformers 5.23 (CPU lock)": {
        "activation_checkpointing",
        "activation_checkpointing_kwargs",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "train_sampling_strategy",
    },
    "transformers 5.17 (CUDA image)": {
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "train_sampling_strategy",
    },
}


@pytest.mark.parametrize(
    ("stack", "key"),
    [
        ("transformers 5.23 (CPU lock)", "activation_checkpointing"),
        ("transformers 5.17 (CUDA image)", "gradient_checkpointing"),
    ],
)
def test_checkpointing_key(stack, key):
    assert compat.checkpointing_key(TRAINING_FIELDS[stack]) == key


def test_checkpointing_key_is_a_field_of_the_installed_trainer_config():
    from trl import DPOConfig, SFTConfig

    key = compat.checkpointing_key(compat.training_fields())
    for config in (SFTConfig, DPOConfig):
        args = config(output_dir="unused", use_cpu=True, bf16=False, report_to="none", **{key: True})
        assert getattr(args, key) is True


@pytest.mark.parametrize(
    ("hub_version", "module"),
    [
        ("2.4.0", "httpx2"),  # CPU lock
        ("1.33.0", "httpx"),  # CUDA image
        ("2.0.0", "httpx2"),
        ("1.33.0.dev0", "httpx"),
    ],
)
def test_hub_http_module(hub_version, module):
    assert compat.hub_http_module(hub_version) == module


def test_hub_transport_error_belongs_to_the_installed_clients_http_library():
    from huggingface_hub.utils import get_session

    error = compat.hub_transport_error()
    module = type(get_session()).__module__.split(".")[0]  # the HTTP client huggingface_hub really uses
    assert error is sys.modules[module].TransportError
    assert not issubclass(error, OSError)  # why push-to-hub catches it by its own class


def test_the_cuda_stack_requirements_follow_the_cuda_lock():
    """docker/requirements-cuda-stack.txt is what docker/cuda-stack.py makes of the two lock files."""
    out = subprocess.run(
        [sys.executable, "docker/cuda-stack.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("trl_version", "triton", "cuda", "blocked_by"),
    [
        ("1.16.0", False, False, None),  # CPU lock: the fused head falls back to torch
        ("1.16.0", True, True, None),
        ("1.15.0", True, True, None),  # CUDA image on its GPU
        ("1.15.0", True, False, "a CUDA device"),  # CUDA image's versions, no GPU
        ("1.15.0", False, False, "triton and a CUDA device"),  # `make test-cuda-stack` (CPU torch)
        ("1.15.0", False, True, "triton"),
        ("2.0.0.dev0", False, False, None),
    ],
)
def test_kto_blocker(trl_version, triton, cuda, blocked_by):
    reason = compat.kto_blocker(trl_version, triton, cuda)
    if blocked_by is None:
        assert reason is None
    else:
        assert f"which needs {blocked_by};" in reason and f"trl {trl_version}" in reason
        assert "\n" not in reason
