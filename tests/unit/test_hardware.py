"""Where every model-loading stage puts its model, and in which dtype, on the four kinds of machine."""

from __future__ import annotations

import pytest

from qatune.errors import QatuneError
from qatune.hardware import placement, score_dtype, select_checkpoint_layers, select_precision, training_dtype

MACHINES = {
    "cpu": {"cuda": False, "cuda_bf16": False, "cpu_bf16": False},
    "cpu+bf16": {"cuda": False, "cuda_bf16": False, "cpu_bf16": True},
    "cuda+bf16": {"cuda": True, "cuda_bf16": True, "cpu_bf16": False},
    "cuda fp16-only (T4)": {"cuda": True, "cuda_bf16": False, "cpu_bf16": True},
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


@pytest.mark.parametrize(
    ("machine", "precision", "weights"),
    [
        ("cpu", "fp32", "float32"),  # load_base: float32 on CPU, bf16 autocast where the CPU has it
        ("cpu+bf16", "bf16", "float32"),
        ("cuda+bf16", "bf16", "bfloat16"),
        ("cuda fp16-only (T4)", "fp16", "float16"),  # never bf16 weights on a GPU without bf16
    ],
)
def test_training_precision_and_weights(machine, precision, weights):
    hw = MACHINES[machine]
    assert select_precision("auto", hw["cuda"], hw["cuda_bf16"], hw["cpu_bf16"]) == precision
    assert (training_dtype(precision) if hw["cuda"] else "float32") == weights


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
