"""Every profile validates against params.yaml; apply keeps params.yaml the documented single source."""

import shutil
from pathlib import Path

import pytest
import yaml

from qatune.errors import QatuneError
from qatune.profiles import SEEDS, apply, merged, set_args
from qatune.provenance import cuda_memory, training_report

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml"))
BASES = {seed.profile: seed.base_model for seed in SEEDS}


def test_every_seed_system_has_a_profile():
    missing = [f"seed {s.number}: profiles/{s.profile}.yaml" for s in SEEDS if s.profile not in PROFILES]
    assert not missing, f"seed systems without a profile: {missing}"
    assert [s.number for s in SEEDS] == [f"{i:03d}" for i in range(len(SEEDS))]  # none skipped
    assert "cpu-default" in PROFILES


def test_every_seed_profile_is_in_the_seed_list():
    assert {p for p in PROFILES if p.startswith("seed")} == set(BASES)


def test_a_seed_without_a_profile_fails(tmp_path, monkeypatch):
    """The check above is not vacuous: a listed seed whose file is missing is named."""
    for path in (ROOT / "profiles").glob("*.yaml"):
        if path.stem != "seed003-mistral-qlora":
            shutil.copy(path, tmp_path)
    have = {p.stem for p in tmp_path.glob("*.yaml")}
    assert [s.number for s in SEEDS if s.profile not in have] == ["003"]
    with pytest.raises(QatuneError, match=r"seed003-mistral-qlora.yaml: no such profile"):
        merged("seed003-mistral-qlora", ROOT / "params.yaml", tmp_path)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_validates(name):
    _, params = merged(name, ROOT / "params.yaml", ROOT / "profiles")
    assert params.base_model.source == BASES.get(name, "bundled:smollm2-135m-instruct")


def test_seed_values_are_carried():
    p = merged("seed000-qwen3-dpo", ROOT / "params.yaml", ROOT / "profiles")[1]
    assert (p.beta, p.dpo.learning_rate, p.dpo.epochs, p.dpo.warmup_ratio, p.dpo.weight_decay) == (
        0.1,
        5e-6,
        4,
        0.1,
        0.01,
    )
    assert (p.dpo.optim, p.dpo.batch_size, p.dpo.grad_accum, p.dpo.max_length) == ("adamw_8bit", 2, 4, 1024)
    assert (p.clean.max_prompt_length, p.seed, p.dpo.logging_steps, p.train.load_in_4bit) == (
        256,
        42,
        10,
        True,
    )
    assert not p.sft.enabled and p.dpo.save_total_limit is None  # DPO on the base; every checkpoint kept
    p = merged("seed001-qwen25-sft", ROOT / "params.yaml", ROOT / "profiles")[1]
    assert (p.train.lora.r, p.train.lora.alpha, p.train.lora.dropout) == (16, 64, 0.15)
    assert p.train.lora.target_modules == ["q_proj", "v_proj"] and not p.dpo.enabled
    assert (p.sft.batch_size * p.sft.grad_accum, p.sft.learning_rate, p.sft.epochs, p.sft.warmup_steps) == (
        32,
        3e-5,
        5,
        50,
    )
    assert [(s.use_as, s.type) for s in p.fetch.sources] == [("train", "local"), ("val", "local")]
    assert (p.split.val, p.split.test, p.evaluate.split, p.sft.scheduler) == (0, 0, "val", "linear")
    assert (p.generate.mode, p.generate.temperature, p.generate.top_p, p.generate.max_new_tokens) == (
        "adapter",
        0.2,
        0.9,
        512,
    )
    questions = (ROOT / "profiles/seed001-questions.txt").read_text().splitlines()
    assert [q for q in questions if q and not q.startswith("#")] == [
        "What are the benefits of regular exercise?",
        "How often should I do strength training?",
        "What is a healthy diet plan for weight loss?",
    ]
    p = merged("seed003-mistral-qlora", ROOT / "params.yaml", ROOT / "profiles")[1]
    t, s = p.train, p.sft
    assert (p.fetch.sources[0].format, p.split.val, p.split.test, p.evaluate.split) == (
        "alpaca",
        0.1,
        0,
        "val",
    )
    assert (t.load_in_4bit, t.bnb_4bit_quant_type, t.bnb_4bit_use_double_quant, t.precision) == (
        True,
        "nf4",
        True,
        "fp16",
    )
    assert (t.lora.r, t.lora.alpha, t.lora.dropout, t.lora.target_modules) == (
        16,
        32,
        0.05,
        ["q_proj", "v_proj"],
    )
    assert (s.learning_rate, s.epochs, s.max_steps, s.warmup_ratio, s.warmup_steps, s.weight_decay) == (
        2e-5,
        3,
        -1,
        0.1,
        0,
        0.01,
    )
    assert (s.batch_size, s.eval_batch_size, s.grad_accum, s.optim, s.max_grad_norm) == (
        4,
        8,
        4,
        "adamw_8bit",
        1.0,
    )
    assert (s.logging_steps, s.eval_steps, s.save_steps) == (10, 50, 100)
    assert t.report_to == ["tensorboard"] and t.activation_checkpointing and not p.dpo.enabled
    p = merged("seed004-llama32-finetome", ROOT / "params.yaml", ROOT / "profiles")[1]
    assert [s.samples for s in p.fetch.sources] == [15000, 15000]
    assert (p.split.val, p.split.test, p.evaluate.split) == (0.05, 0, "val")  # 95/5 exactly
    assert (p.clean.max_length, p.sft.max_length) == (2048, 2048)
    assert (p.sft.batch_size, p.sft.grad_accum, p.sft.max_steps, p.sft.learning_rate) == (4, 4, 40, 2e-5)


def test_a_typo_in_a_profile_is_an_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("sft:\n  learnig_rate: 1.0e-4\n")
    with pytest.raises(QatuneError, match=r"bad.yaml: unknown key 'sft.learnig_rate'"):
        merged("bad", ROOT / "params.yaml", tmp_path)


def test_apply_edits_params_in_place_keeping_comments(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply("seed001-qwen25-sft", params, ROOT / "profiles")
    text = params.read_text()
    assert "# one seed for sampling" in text  # comments survive
    data = yaml.safe_load(text)
    assert data["train"]["lora"]["alpha"] == 64 and data["dpo"]["enabled"] is False
    assert data == merged("seed001-qwen25-sft", ROOT / "params.yaml", ROOT / "profiles")[0]


def test_args_for_dvc_exp_run():
    args = set_args("seed001-qwen25-sft", ROOT / "profiles")
    assert "-S=train.lora.alpha=64" in args and "-S=dpo.enabled=false" in args


def test_training_report_gives_seed_004s_numbers():
    """The GPU memory figures come from torch.cuda on a GPU; here the pure arithmetic is checked with seed
    004's own T4 numbers (7.967 GB reserved of 14.741 GB = 54.047%)."""
    gib = 1024**3
    memory = cuda_memory(int(7.967 * gib), int(14.741 * gib))
    assert memory == {
        "peak_cuda_reserved_gb": 7.967,
        "cuda_device_memory_gb": 14.741,
        "peak_cuda_reserved_pct": 54.047,
    }
    line = training_report(
        "sft",
        {
            "steps": 40,
            "train_runtime_s": 2974.8,
            "train_loss": 0.8644,
            "eval": {"loss": 0.7828},
            "peak_rss_gb": 3.1,
            **memory,
        },
    )
    assert line == (
        "sft: 40 steps in 49.58 min, train loss 0.8644, validation loss 0.7828, "
        "peak reserved memory 7.967 GB (54.047% of 14.741 GB), peak RSS 3.10 GB"
    )
    assert "reserved" not in training_report("sft", {"steps": 2, "train_runtime_s": 6.0, "peak_rss_gb": 1.0})
