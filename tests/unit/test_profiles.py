"""Every profile is the default recipe + its overlay, validated; applying one never keeps anything of the
profile applied before; params.yaml is always the default or one profile over it."""

import itertools
import shutil
from pathlib import Path

import pytest
import yaml

from qatune.errors import QatuneError
from qatune.hardware import cuda_memory
from qatune.profiles import (
    DEFAULTS_FILE,
    apply,
    flatten,
    from_default,
    load_overlay,
    merged,
    render,
    resolve,
    set_args,
    show,
)
from qatune.training import training_report
from tests.seeds import SEEDS

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
        resolve("seed003-mistral-qlora", tmp_path)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_validates(name):
    _, params = resolve(name, ROOT / "profiles")
    assert params.base_model.source == BASES.get(name, "bundled:smollm2-135m-instruct")


def test_seed_values_are_carried():
    p = resolve("seed000-qwen3-dpo", ROOT / "profiles")[1]
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
    p = resolve("seed001-qwen25-sft", ROOT / "profiles")[1]
    assert (p.train.lora.r, p.train.lora.alpha, p.train.lora.dropout) == (16, 64, 0.15)
    assert p.train.lora.target_modules == ["q_proj", "v_proj"] and not p.dpo.enabled
    assert (p.train.prompt_format, p.train.system_prompt) == ("plain", None)  # "User: ...\nAssistant: ..."
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
    p = resolve("seed003-mistral-qlora", ROOT / "profiles")[1]
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
    assert s.save_total_limit is None  # TrainingArguments' default: every checkpoint kept
    p = resolve("seed004-llama32-finetome", ROOT / "profiles")[1]
    assert [s.samples for s in p.fetch.sources] == [15000, 15000]
    assert (p.split.val, p.split.test, p.evaluate.split) == (0.05, 0, "val")  # 95/5 exactly
    assert (p.clean.max_length, p.sft.max_length) == (2048, 2048)
    assert (p.sft.batch_size, p.sft.grad_accum, p.sft.max_steps, p.sft.learning_rate) == (4, 4, 40, 2e-5)
    assert (p.generate.mode, p.chat.device, p.chat.dtype) == ("adapter", "cpu", "float32")  # the seed's app


def test_a_typo_in_a_profile_is_an_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("sft:\n  learnig_rate: 1.0e-4\n")
    with pytest.raises(QatuneError, match=r"bad.yaml: unknown key 'sft.learnig_rate'"):
        resolve("bad", tmp_path)


PAIRS = list(itertools.permutations(PROFILES, 2))


@pytest.fixture(scope="module")
def alone() -> dict[str, str]:
    """Each profile's params.yaml text, applied to nothing but the default."""
    return {name: render(name, ROOT / "profiles") for name in PROFILES}


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=[f"{a}-then-{b}" for a, b in PAIRS])
def test_applying_two_profiles_in_turn_is_applying_the_second_alone(first, second, alone, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(alone[first])  # what `apply first` writes
    apply(second, params, ROOT / "profiles")
    assert params.read_text() == alone[second]  # byte for byte: nothing of `first` is left
    assert yaml.safe_load(params.read_text()) == resolve(second, ROOT / "profiles")[0]


def test_a_profile_resolves_over_the_default_never_over_params_yaml(tmp_path):
    """The stacking bug: seed001 applied, then seed002 kept seed001's LoRA (alpha 64, q/v, dropout 0.15)."""
    params = tmp_path / "params.yaml"
    apply("seed001-qwen25-sft", params, ROOT / "profiles")
    assert yaml.safe_load(params.read_text())["train"]["lora"]["alpha"] == 64
    apply("seed002-gemma-psychology", params, ROOT / "profiles")
    lora = yaml.safe_load(params.read_text())["train"]["lora"]
    # seed 002 sets no LoRA value: all of them are the default's
    assert lora == yaml.safe_load(DEFAULTS_FILE.read_text())["train"]["lora"]
    assert lora["alpha"] == 32 and lora["dropout"] == 0.0 and len(lora["target_modules"]) == 7
    # the old signature's params file is ignored: the base is the default recipe
    resolved = yaml.safe_load(params.read_text())
    assert merged("seed002-gemma-psychology", params, ROOT / "profiles")[0] == resolved


def test_a_different_default_recipe_changes_what_the_profile_does_not_set(tmp_path):
    defaults = tmp_path / "defaults.yaml"
    data = yaml.safe_load(DEFAULTS_FILE.read_text())
    data["sft"]["weight_decay"], data["sft"]["learning_rate"] = 0.05, 1.0e-3
    defaults.write_text(yaml.safe_dump(data))
    p = resolve("seed002-gemma-psychology", ROOT / "profiles", defaults)[1]
    assert (p.sft.weight_decay, p.sft.learning_rate) == (0.05, 2e-4)  # the profile sets only the rate


def test_cpu_default_restores_params_yaml_as_shipped(tmp_path):
    params = tmp_path / "params.yaml"
    apply("seed003-mistral-qlora", params, ROOT / "profiles")
    assert params.read_text() != DEFAULTS_FILE.read_text()
    apply("cpu-default", params, ROOT / "profiles")
    assert params.read_text() == DEFAULTS_FILE.read_text()


def test_params_yaml_is_the_default_recipe_or_one_profile_over_it():
    """The default recipe lives in src/qatune/default_params.yaml (it travels with the package); params.yaml is
    what the stages read. A change to the default made only in params.yaml would be lost by the next `apply`."""
    current = yaml.safe_load((ROOT / "params.yaml").read_text())
    matches = [name for name in PROFILES if resolve(name, ROOT / "profiles")[0] == current]
    assert matches, (
        "params.yaml is neither the default recipe nor a profile over it: put default changes in "
        "src/qatune/default_params.yaml too (cp params.yaml src/qatune/default_params.yaml when params.yaml "
        "is the default), then `python -m qatune.profiles apply NAME`"
    )


def test_apply_keeps_the_defaults_comments_and_marks_the_profiles_values(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply("seed001-qwen25-sft", params, ROOT / "profiles")
    text = params.read_text()
    assert text.startswith("# Profile seed001-qwen25-sft over the embedded default")
    lines = text.splitlines()
    # a value the profile does not change keeps the default's line and comment
    assert any(line.startswith("seed: 42") and "# one seed for sampling" in line for line in lines)
    alpha = next(line for line in lines if line.strip().startswith("alpha:"))
    assert alpha.split("#")[0].split() == ["alpha:", "64"] and "# seed001-qwen25-sft (default: 32)" in alpha
    rate = next(line for line in lines if line.startswith("  learning_rate: 3.0e-5"))
    assert "seed001-qwen25-sft" in rate and "2e-4 -> 6e-4" not in text.split("learning_rate: 3.0e-5")[1][:300]
    assert "  grad_accum: 16           # seed001-qwen25-sft: effective batch 32 (default: 2)" in lines
    assert all(lines[lines.index(block) - 1] == "" for block in ("clean:", "split:", "sft:", "dpo:"))
    assert yaml.safe_load(text) == resolve("seed001-qwen25-sft", ROOT / "profiles")[0]


def test_show_lists_what_the_profile_takes_from_the_default():
    taken = dict(from_default("seed002-gemma-psychology", ROOT / "profiles"))
    sets = {key for key, _ in flatten(load_overlay(ROOT / "profiles/seed002-gemma-psychology.yaml"))}
    resolved = dict(flatten(resolve("seed002-gemma-psychology", ROOT / "profiles")[0]))
    assert set(taken) | sets >= set(resolved) and not set(taken) & sets
    assert "sft.learning_rate" not in taken and taken["sft.weight_decay"] == 0.0  # the seed states neither
    assert taken["train.lora.alpha"] == 32 and taken["sft.scheduler"] == "cosine"
    text = show("seed002-gemma-psychology", ROOT / "profiles")
    assert f"these {len(taken)} are the default recipe's" in text
    assert '#   sft.scheduler: "cosine"' in text and "#   sft.learning_rate" not in text
    assert yaml.safe_load(text) == resolve("seed002-gemma-psychology", ROOT / "profiles")[0]  # still YAML


def test_args_for_dvc_exp_run(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(DEFAULTS_FILE, params)
    args = set_args("seed001-qwen25-sft", ROOT / "profiles", params)
    assert "-S=train.lora.alpha=64" in args and "-S=dpo.enabled=false" in args
    assert "-S=seed=42" not in args  # equal to params.yaml: nothing to set
    apply("seed001-qwen25-sft", params, ROOT / "profiles")
    assert set_args("seed001-qwen25-sft", ROOT / "profiles", params) == []
    # over seed001's params.yaml, seed002 resets what seed001 changed and seed002 does not set
    args = set_args("seed002-gemma-psychology", ROOT / "profiles", params)
    assert "-S=train.lora.alpha=32" in args and '-S=sft.scheduler="cosine"' in args
    assert "-S=dpo.enabled=false" not in args  # both profiles turn DPO off: already so


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
