"""Every profile validates against params.yaml; apply keeps params.yaml the documented single source."""

import shutil
from pathlib import Path

import pytest
import yaml

from qatune.errors import QatuneError
from qatune.profiles import apply, merged, set_args

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml"))
SEEDS = {
    "seed000-qwen3-dpo": "unsloth/Qwen3-0.6B",
    "seed001-qwen25-sft": "Qwen/Qwen2.5-0.5B-Instruct",
    "seed002-gemma-psychology": "google/gemma-2b-it",
    "seed004-llama32-finetome": "unsloth/Llama-3.2-3B-Instruct",
}


def test_every_seed_system_has_a_profile():
    assert set(SEEDS) | {"cpu-default"} <= set(PROFILES)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_validates(name):
    _, params = merged(name, ROOT / "params.yaml", ROOT / "profiles")
    assert params.base_model.source == SEEDS.get(name, "bundled:smollm2-135m-instruct")


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
    p = merged("seed001-qwen25-sft", ROOT / "params.yaml", ROOT / "profiles")[1]
    assert (p.train.lora.r, p.train.lora.alpha, p.train.lora.dropout) == (16, 64, 0.15)
    assert p.train.lora.target_modules == ["q_proj", "v_proj"] and not p.dpo.enabled
    assert (p.sft.batch_size * p.sft.grad_accum, p.sft.learning_rate, p.sft.epochs, p.sft.warmup_steps) == (
        32,
        3e-5,
        5,
        50,
    )
    p = merged("seed004-llama32-finetome", ROOT / "params.yaml", ROOT / "profiles")[1]
    assert [s.samples for s in p.fetch.sources] == [15000, 15000] and p.split.val == 0.05
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
