"""bench/gpu_check.py on a CPU: its scenarios are valid params with the seeds' shapes, its skip logic, its
verdicts from the files the stages write, the result file, and the fused-head check on a tiny model (the GPU
run itself needs a GPU: `make gpu-check`)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qatune.params import load_params

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up there
spec.loader.exec_module(gpu_check)
SCENARIOS = {s.name: s for s in gpu_check.SCENARIOS}


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def params_of(name: str, tmp_path: Path):
    """A scenario's params.yaml, read back by qatune's own loader (unknown keys are errors there)."""
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(gpu_check.scenario_params(base, SCENARIOS[name])))
    return load_params(path)


def test_each_scenario_has_its_seeds_shape_on_tiny_budgets(tmp_path):
    seed003 = params_of("seed003", tmp_path)
    assert (seed003.train.backend, seed003.train.precision, seed003.train.load_in_4bit) == (
        "transformers",
        "fp16",
        True,
    )
    assert seed003.train.lora.target_modules == ["q_proj", "v_proj"] and seed003.sft.optim == "adamw_8bit"
    seed000 = params_of("seed000", tmp_path)
    assert not seed000.sft.enabled and seed000.dpo.loss_type == ["sigmoid"] and seed000.train.load_in_4bit
    fsdp, ddp = params_of("fsdp-2gpu", tmp_path), params_of("ddp-2gpu", tmp_path)
    assert (fsdp.train.distributed, fsdp.train.num_processes, ddp.train.distributed) == ("fsdp", 2, "ddp")
    pipeline = params_of("pipeline", tmp_path)
    assert (pipeline.sft.max_steps, pipeline.dpo.max_steps, pipeline.train.backend) == (4, 2, "auto")
    # what the budgets leave alone is params.yaml's own value
    assert pipeline.sft.learning_rate == load_params(ROOT / "params.yaml").sft.learning_rate
    assert [name for name, _ in SCENARIOS["pipeline"].steps][-2:] == ["evaluate", "merge"]


@pytest.mark.parametrize(
    ("cuda", "gpus", "expected"),
    [
        (False, 0, {name: "no CUDA GPU visible" for name in SCENARIOS}),
        (True, 1, {"ddp-2gpu": "needs 2 GPUs, 1 visible", "fsdp-2gpu": "needs 2 GPUs, 1 visible"}),
        (True, 2, {}),
    ],
)
def test_what_runs_depends_on_cuda_and_the_number_of_gpus(cuda, gpus, expected):
    reasons = {s.name: gpu_check.skip_reason(s, cuda, gpus) for s in gpu_check.SCENARIOS}
    assert {k: v for k, v in reasons.items() if v} == expected


def pipeline_files(work: Path, device: str = "cuda", backend: str = "unsloth") -> dict:
    """What a clean pipeline scenario leaves: stage outputs and every step's return code."""
    for name in ("sft", "dpo"):
        write(
            work / f"metrics/{name}.json",
            {
                "device": "NVIDIA H100" if device == "cuda" else "cpu",
                "backend": backend,
                "precision": "bf16",
                "peak_cuda_reserved_gb": 1.2,
                "eval_before": {"rewards/margins": 0.0},
            },
        )
    write(work / "metrics/merge.json", {"device": device, "dtype": "bfloat16"})
    for name in ("base", "sft", "final"):
        write(work / f"data/scores/{name}.json", {"device": device, "score_dtype": "bfloat16"})
    names = [n for n, _ in SCENARIOS["pipeline"].steps] + ["qatune ask", "fused check"]
    return {n: {"rc": 0, "error": None} for n in names}


FUSED = {"mean_abs_diff": 0.004, "max_abs_diff": 0.03, "tokens": 40}
BANNER = "qatune: models/merged on cuda (bfloat16)"


def test_every_pipeline_check_passes_when_every_stage_ran_on_the_gpu(tmp_path):
    steps = pipeline_files(tmp_path)
    checks = gpu_check.pipeline_checks(tmp_path, steps, BANNER, True, FUSED)
    assert checks and all(c["status"] == "pass" for c in checks.values()), checks
    assert "bfloat16" in checks["score@final on GPU"]["reason"]
    assert gpu_check.summary(checks)["passed"]


def test_without_unsloth_its_checks_are_skipped_and_say_why(tmp_path):
    steps = pipeline_files(tmp_path, backend="transformers")
    del steps["fused check"]
    checks = gpu_check.pipeline_checks(tmp_path, steps, BANNER, False, None)
    skipped = {k for k, c in checks.items() if c["status"] == "skip"}
    assert skipped == {"unsloth sft then dpo", "fused LM head = logits (unsloth, train mode)"}
    assert all("unsloth is not installed" in checks[k]["reason"] for k in skipped)
    assert gpu_check.summary(checks) == {"pass": len(checks) - 2, "fail": 0, "skip": 2, "passed": True}


@pytest.mark.parametrize("broken", ["merge", "score", "ask", "fused", "margin", "sft-crash", "unsloth"])
def test_a_path_that_went_wrong_fails_its_own_check(tmp_path, broken):
    steps = pipeline_files(tmp_path)
    fused, banner = dict(FUSED), BANNER
    if broken == "merge":
        write(tmp_path / "metrics/merge.json", {"device": "cpu"})
    elif broken == "score":
        write(tmp_path / "data/scores/final.json", {"device": "cpu"})
    elif broken == "ask":
        banner = "qatune: models/merged on cpu (float32)"
    elif broken == "fused":
        fused["mean_abs_diff"] = 1.7  # the backbone saw later tokens
    elif broken == "margin":
        write(tmp_path / "metrics/dpo.json", {**json.loads((tmp_path / "metrics/dpo.json").read_text()),
                                              "eval_before": {"rewards/margins": 0.4}})  # fmt: skip
    elif broken == "sft-crash":
        steps["sft"] = {"rc": 1, "error": "NotImplementedError: ... 'BFloat16'"}
    else:
        write(tmp_path / "metrics/dpo.json", {**json.loads((tmp_path / "metrics/dpo.json").read_text()),
                                              "backend": "transformers"})  # fmt: skip
    checks = gpu_check.pipeline_checks(tmp_path, steps, banner, True, fused)
    failed = [k for k, c in checks.items() if c["status"] == "fail"]
    assert (
        failed
        == {
            "merge": ["merge on GPU"],
            "score": ["score@final on GPU"],
            "ask": ["qatune ask on GPU"],
            "fused": ["fused LM head = logits (unsloth, train mode)"],
            "margin": ["dpo step-0 margin 0"],
            "sft-crash": ["sft on GPU"],
            "unsloth": ["unsloth sft then dpo"],
        }[broken]
    )
    assert not gpu_check.summary(checks)["passed"]
    if broken == "sft-crash":
        assert "BFloat16" in checks["sft on GPU"]["reason"]


def test_seed003_fails_when_it_did_not_train_in_fp16_and_two_gpus_need_world_size_2(tmp_path):
    steps = {"sft": {"rc": 0, "error": None}, "dpo": {"rc": 0, "error": None}}
    for name in ("sft", "dpo"):
        write(tmp_path / f"metrics/{name}.json", {"device": "Tesla T4", "precision": "fp16", "peak_cuda_reserved_gb": 1,
                                                  "world_size": 1})  # fmt: skip
    checks = gpu_check.scenario_checks(SCENARIOS["seed003"], tmp_path, steps)
    assert [c["status"] for c in checks.values()] == ["pass", "pass"]
    write(
        tmp_path / "metrics/dpo.json", {"device": "Tesla T4", "precision": "bf16", "peak_cuda_reserved_gb": 1}
    )
    checks = gpu_check.scenario_checks(SCENARIOS["seed003"], tmp_path, steps)
    assert checks["transformers 4-bit fp16 dpo"] == {
        "status": "fail",
        "reason": "dpo trained in bf16, not fp16",
    }
    two = gpu_check.scenario_checks(SCENARIOS["ddp-2gpu"], tmp_path, steps)
    assert two == {"sft ddp-2gpu": {"status": "fail", "reason": "world size 1, not 2"}}


def test_without_a_gpu_every_check_is_skipped_with_its_reason(tmp_path):
    out = tmp_path / "results" / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/gpu_check.py"), "--out", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    result = json.loads(out.read_text())
    assert result["passed"] is False and result["versions"]["torch"] and result["fail"] == 0
    assert set(result["scenarios"]) == set(SCENARIOS)
    assert {c["status"] for c in result["checks"].values()} == {"skip"}
    assert {c["reason"] for c in result["checks"].values()} == {"no CUDA GPU visible"}
    for path in ("transformers 4-bit fp16 sft", "dpo from the base: step-0 margin 0", "unsloth sft then dpo",
                 "fused LM head = logits (unsloth, train mode)", "merge on GPU", "qatune ask on GPU",
                 "sft ddp-2gpu", "sft fsdp-2gpu"):  # fmt: skip
        assert path in result["checks"]


def tiny_batch(tiny_model_dir):
    """A tiny model that attention moves and whose next-token distributions are peaked, and a batch. At the
    random init's scale attention adds little to the residual stream and every distribution is near uniform:
    seeing later tokens then changed log-probs by ~0.07 nats; with these scales by ~7."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer import utils as trl_utils

    if getattr(trl_utils, "_ChunkedLogProbFunction", True) is None:
        pytest.skip(
            "this TRL's fused LM head needs triton, which this venv lacks (TRL 1.15, CUDA-stack tier)"
        )
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "v_proj" in name or "o_proj" in name:
                weight.mul_(20)
        model.model.norm.weight.mul_(50)
    batch = tok(
        ["How much protein do I need?", "Squat three times a week."], return_tensors="pt", padding=True
    )
    return model, batch["input_ids"], batch["attention_mask"]


def test_fused_head_agrees_with_the_logits_of_a_causal_model(tiny_model_dir):
    model, ids, mask = tiny_batch(tiny_model_dir)
    found = gpu_check.fused_vs_logits(model, ids, mask)
    assert found["tokens"] == int(mask[:, 1:].sum()) and found["mean_abs_diff"] < 1e-4


def test_fused_head_check_catches_a_backbone_that_sees_later_tokens(tiny_model_dir):
    """Called directly (as TRL's fused head calls it, use_cache=False), the backbone here attends to every
    token: what Unsloth's training-mode backbone does without the mask its causal-LM forward builds."""
    import torch

    model, ids, mask = tiny_batch(tiny_model_dir)
    backbone = model.model
    causal_forward = backbone.forward

    def forward(*args, **kwargs):
        if kwargs.get("use_cache") is False:  # the fused head's call
            n = kwargs["input_ids"].shape[1]
            kwargs["attention_mask"] = torch.ones(kwargs["input_ids"].shape[0], 1, n, n, dtype=torch.bool)
        return causal_forward(*args, **kwargs)

    backbone.forward = forward
    assert gpu_check.fused_vs_logits(model, ids, mask)["mean_abs_diff"] > gpu_check.FUSED_TOLERANCE
