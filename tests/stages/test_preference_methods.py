"""The preference stage's methods on a tiny random model: DPO's loss menu, DPO from the base, and KTO.

Each loss is checked where its value is known exactly: before training, when the policy IS the reference
(log-ratios 0), so sigmoid = ln 2, ipo = (1 / (2 beta))^2, and a weighted mix adds its terms.
"""

import json
import math
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qatune import compat
from tests.conftest import run


def stage(proj, name, check=True):
    return run([sys.executable, f"stages/{name}.py", "--params", "params.yaml"], proj, check=check)


def set_params(proj, **blocks):
    params = yaml.safe_load((proj / "params.yaml").read_text())
    for key, value in blocks.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    return params


def metrics(proj, name):
    return json.loads((proj / f"metrics/{name}.json").read_text())


def lora_b_norm(folder):
    weights = load_file(str(folder / "adapter_model.safetensors"))
    return sum(float(t.norm()) for k, t in weights.items() if "lora_B" in k)


def test_dpo_loss_menu_each_loss_at_its_known_starting_value(project):
    proj = project()
    for name in ("fetch", "clean", "split", "sft"):
        stage(proj, name)
    beta = yaml.safe_load((proj / "params.yaml").read_text())["beta"]
    start = {}
    for losses, weights in (
        (["sigmoid"], None),
        (["ipo"], None),
        (["sigmoid_norm"], None),  # length-normalised (SimPO-style) DPO
        (["sft"], None),
        (["sigmoid", "sft"], [1.0, 0.5]),  # DPO plus the chosen answers' NLL
    ):
        set_params(proj, dpo={"loss_type": losses, "loss_weights": weights})
        stage(proj, "dpo")
        m = metrics(proj, "dpo")
        assert (m["loss_type"], m["loss_weights"], m["reference"]) == (losses, weights, "sft")
        assert m["eval_before"]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # policy == reference
        start["+".join(losses)] = m["eval_before"]["loss"]
        assert math.isfinite(m["train_loss"]) and m["steps"] == 4
    assert start["sigmoid"] == pytest.approx(math.log(2), abs=1e-3)
    assert start["sigmoid_norm"] == pytest.approx(math.log(2), abs=1e-3)
    assert start["ipo"] == pytest.approx((1 / (2 * beta)) ** 2, rel=1e-3)
    assert start["sft"] > 1.0  # a random model's NLL per token of the chosen answers
    assert start["sigmoid+sft"] == pytest.approx(math.log(2) + 0.5 * start["sft"], rel=1e-3)


def test_a_wrong_loss_is_refused_in_one_line(project):
    proj = project()
    set_params(proj, dpo={"loss_type": ["simpo"]})
    proc = stage(proj, "dpo", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "dpo.loss_type ['simpo']" in last and "sigmoid_norm" in last
    set_params(proj, dpo={"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]})
    last = stage(proj, "dpo", check=False).stderr.strip().splitlines()[-1]
    assert "dpo.loss_weights has 1 values for 2 loss types" in last


def test_dpo_straight_from_the_base_when_sft_is_disabled(project):
    """Seed 000: no SFT run; a new adapter on the base, and the base itself is the reference."""
    proj = project(sft={"enabled": False}, dpo={"loss_type": ["sigmoid"], "loss_weights": None})
    for name in ("fetch", "clean", "split", "sft"):
        stage(proj, name)
    assert not (proj / "models/sft/adapter_config.json").exists()
    assert metrics(proj, "sft") == {"method": "none", "enabled": False, "adapter": None}
    # `dvc repro` (the embedded default runs no SFT) needs every output the sft stage lists
    outs = yaml.safe_load((proj / "dvc.yaml").read_text())["stages"]["sft"]["outs"]
    missing = [
        p for p in (o if isinstance(o, str) else next(iter(o)) for o in outs) if not (proj / p).exists()
    ]
    assert missing == []
    stage(proj, "dpo")
    m = metrics(proj, "dpo")
    assert (m["method"], m["reference"]) == ("dpo", "base")
    # a new LoRA adapter starts as the identity: at step 0 the policy is the base, which is the reference
    assert m["eval_before"]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert m["eval_before"]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert lora_b_norm(proj / "models/dpo") > 0 and m["eval"]["rewards/margins"] > 0
    prov = json.loads((proj / "models/dpo/qatune_provenance.json").read_text())
    assert prov["sft_adapter"] is None and prov["params"]["sft_enabled"] is False
    # the score stages read the disabled SFT output as "no adapter": the base, scored as such
    stage_cmd = [sys.executable, "stages/score.py", "--params", "params.yaml", "--adapter", "models/sft"]
    run([*stage_cmd, "--name", "sft", "--out", "data/scores/sft.json"], proj)
    assert json.loads((proj / "data/scores/sft.json").read_text())["adapter"] is None


def unpaired_rows():
    """TRL-style unpaired preference data: some prompts with a good and a bad answer, some with only a bad
    one, some with only a good one."""
    rows = []
    for i in range(24):
        q = f"How many sets of exercise {i} should a beginner do?"
        good = (
            f"Start with two or three sets of exercise {i}, with good form, and rest a day between sessions."
        )
        bad = f"Do twenty sets of exercise {i} every day until it hurts; pain means progress."
        if i % 3 != 2:
            rows.append({"prompt": q, "completion": good, "label": True})
        if i % 3 != 1:
            rows.append({"prompt": q, "completion": bad, "label": False})
    return rows


def test_kto_trains_unpaired_answers_and_never_learns_a_bad_one_as_good(project, tmp_path):
    data = tmp_path / "unpaired.jsonl"
    rows = unpaired_rows()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = {r["completion"] for r in rows if not r["label"]}

    proj = project(
        data, dpo={"method": "kto", "loss_type": ["kto"], "loss_weights": None}, split={"stratify": None}
    )
    for name in ("fetch", "clean", "split"):
        stage(proj, name)
    clean = metrics(proj, "clean")
    assert clean["formats"] == {"fixture": "unpaired"} and clean["without_chosen"] == 8  # lone bad answers
    assert clean["kept"] + clean["dropped"] == clean["read"] == len(rows)
    split_rows = [
        json.loads(line)
        for s in ("train", "val", "test")
        for line in (proj / f"data/split/{s}.jsonl").read_text().splitlines()
    ]
    assert not {r["chosen"] for r in split_rows} & bad  # never a bad answer as `chosen`
    stage(proj, "sft")
    blocker = compat.installed_kto_blocker(cuda=torch.cuda.is_available())
    if blocker:  # the CUDA image's trl 1.15 off a GPU (`make test-cuda-stack`): refused in one line, up front
        proc = stage(proj, "dpo", check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and "dpo.method kto" in last and blocker in last
        assert not (proj / "models/dpo").exists() and not (proj / "metrics/dpo.json").exists()
    else:
        stage(proj, "dpo")
        m = metrics(proj, "dpo")
        assert (m["method"], m["loss_type"], m["reference"]) == ("kto", ["kto"], "sft")
        assert m["answers"] == 8 and m["steps"] == 4  # max_steps 4 x batch 2 labelled answers
        # KTO at step 0 (policy == reference, KL estimate 0): each answer's loss is 1 - sigmoid(0) = 0.5
        assert m["eval_before"]["loss"] == pytest.approx(0.5, abs=1e-3)
        assert lora_b_norm(proj / "models/dpo") != lora_b_norm(proj / "models/sft")
        assert math.isfinite(m["train_loss"]) and "rewards/chosen" in m["train"]

    # The same data under DPO: the lone bad answers are rejects with the reason, never answers
    set_params(proj, dpo={"method": "dpo", "loss_type": ["sigmoid"]})
    stage(proj, "clean")
    clean = metrics(proj, "clean")
    assert clean["without_chosen"] == 0 and clean["dropped_by_reason"]["unpaired_bad_completion"] == 8
    assert clean["kept"] + clean["dropped"] == clean["read"]
