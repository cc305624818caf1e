"""What differs between the library versions qatune supports.

Two stacks run qatune: the CPU lock (requirements.lock: transformers 5.23, trl 1.16, datasets 5.2,
huggingface_hub 2.4) and the CUDA image (docker/requirements-cuda.lock, Unsloth's pins: transformers 5.17,
trl 1.15, datasets 4.8, huggingface_hub 1.33). Every choice that depends on which one is installed is made
here, by a pure function of a version string or of a feature probe (the probes are the small functions that
read the installed library and pass what they find in), and tested as a table with a row per stack in
tests/unit/test_compat.py. `make test-cuda-stack` runs the unit and stage tiers on the CUDA image's versions.
"""

from __future__ import annotations

from collections.abc import Iterable


def major(version: str) -> int:
    """The major release of a version string: "2.4.0" -> 2, "1.33.0.dev0" -> 1."""
    return int(version.split(".", 1)[0])


# --------------------------------------------------------------------------- transformers


def checkpointing_key(training_fields: Iterable[str]) -> str:
    """The TrainingArguments field that turns activation (gradient) checkpointing on.

    transformers 5.23 calls it `activation_checkpointing` (`gradient_checkpointing` is its deprecated alias
    until v6); 5.17 knows only `gradient_checkpointing`. The probe is the dataclass's field names.
    """
    return (
        "activation_checkpointing"
        if "activation_checkpointing" in training_fields
        else "gradient_checkpointing"
    )


def training_fields() -> set[str]:
    """Probe: the field names of the installed transformers' TrainingArguments (TRL's configs extend it)."""
    import dataclasses

    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments)}


def resumed_loss_is_per_run_mean(trainer) -> bool:
    """After a resume, does Trainer's `training_loss` average over this process's steps only (5.23, which
    records `_initial_global_step`), or divide their sum by all steps (older releases)? The probe is the
    trainer itself."""
    return hasattr(trainer, "_initial_global_step")


# --------------------------------------------------------------------------- trl


def kto_blocker(trl_version: str, triton_installed: bool, cuda: bool) -> str | None:
    """Why KTO cannot train here, or None when it can.

    TRL's KTOTrainer scores answers through a fused LM head. From 1.16 the head falls back to plain torch off
    CUDA; in 1.15 (the CUDA image's) it always runs TRL's Triton kernel, which needs triton and a CUDA device.
    So on the CUDA image KTO trains on the GPU and nowhere else, and qatune says so before any work."""
    parts = tuple(int(p) for p in trl_version.split(".")[:2] if p.isdigit())
    if parts >= (1, 16) or (triton_installed and cuda):
        return None
    needs = " and ".join(x for x, ok in (("triton", triton_installed), ("a CUDA device", cuda)) if not ok)
    return (
        f"trl {trl_version}'s KTO trainer runs its log-probabilities in a Triton kernel, which needs {needs}; "
        "train KTO on a GPU, or install trl >= 1.16 (the CPU lock), or use dpo.method: dpo with paired rows"
    )


def installed_kto_blocker(cuda: bool) -> str | None:
    """Probe: kto_blocker for the installed trl and triton on a machine with or without CUDA. The versions
    come from the package metadata, never an import: the dpo stage asks before Unsloth is imported, and
    Unsloth must patch TRL before anything imports it."""
    import importlib.metadata
    import importlib.util

    return kto_blocker(
        importlib.metadata.version("trl"), importlib.util.find_spec("triton") is not None, cuda
    )


# --------------------------------------------------------------------------- huggingface_hub


def hub_http_module(hub_version: str) -> str:
    """The HTTP library huggingface_hub talks through: httpx2 from 2.0, httpx before. Its network errors
    (`TransportError`) are not OSErrors, so push-to-hub catches them by that module's class."""
    return "httpx2" if major(hub_version) >= 2 else "httpx"


def hub_transport_error() -> type[Exception]:
    """Probe: the installed huggingface_hub's network error class (connection refused, timeouts, DNS)."""
    import importlib

    import huggingface_hub

    return importlib.import_module(hub_http_module(huggingface_hub.__version__)).TransportError
