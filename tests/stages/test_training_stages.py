"""sft -> dpo on a tiny random model in a scratch project, on CPU: weights change, outputs are valid."""

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import run

TABLE = [
    "loss",
    "grad_norm",
    "learning_rate",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "epoch",
]


def stage(proj, name, check=True):
    return run([sys.executable, f"stages/{name}.py", "--params", "params.yaml"], proj, check=check)


def data_stages(proj):
    for name in ("fetch", "clean", "split"):
        stage(proj, name)


def lora_b_norm(folder):
    weights = load_file(str(folder / "adapter_model.safetensors"))
    return sum(float(t.norm()) for k, t in weights.items() if "lora_B" in k)


def test_sft_then_dpo(project):
    # plain sigmoid DPO, whose loss at step 0 is known exactly (the default adds the SFT term, whose start
    # value test_preference_methods.py checks)
    proj = project(dpo={"loss_type": ["sigmoid"], "loss_weights": None})
    data_stages(proj)
    out = stage(proj, "sft").stdout
    sft = json.loads((proj / "metrics/sft.json").read_text())
    assert sft["steps"] == 4 and sft["loss_mode"] == "assistant_only" and sft["backend"] == "transformers"
    # seed 002's perplexity (exp of the eval loss) and seed 003's printed parameter counts
    assert sft["eval"]["perplexity"] == round(math.exp(sft["eval"]["loss"]), 4) > 1
    counts = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ", out)
    trainable, total = (int(g.replace(",", "")) for g in counts.groups())
    assert 0 < trainable < total
    assert sft["lm_head"] == "qatune"  # CPU: the tiled answer-only head (tests/unit/test_lm_head.py)
    assert sft["eval"]["loss"] < sft["eval_before"]["loss"]  # lr 1e-2 on a random model: val loss drops
    assert sft["tokens_per_s"] > 0 and sft["peak_rss_gb"] > 0
    assert lora_b_norm(proj / "models/sft") > 0  # LoRA B starts at zero: training moved it
    prov = json.loads((proj / "models/sft/qatune_provenance.json").read_text())
    assert prov["params"]["sft"]["max_steps"] == 4 and len(prov["data_sha256"]) == 64
    loss_curve = json.loads((proj / "metrics/sft/loss.json").read_text())
    assert [p["step"] for p in loss_curve if p["loss"] is not None] == [1, 2, 3, 4]
    assert all(set(p) == {"step", "loss", "eval_loss"} for p in loss_curve)  # DVC plots need equal fields
    assert [p["step"] for p in loss_curve if p["eval_loss"] is not None] == [2, 4]
    assert "eval_loss" in (proj / "metrics/sft/history.csv").read_text().splitlines()[0]

    stage(proj, "dpo")
    dpo = json.loads((proj / "metrics/dpo.json").read_text())
    # The reference is the SFT model: at step 0 policy == reference (reference log-probs precomputed through
    # the same head as the policy's).
    assert dpo["lm_head"] == "qatune"
    assert dpo["eval_before"]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert dpo["eval_before"]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert set(TABLE) <= set(dpo["train"]) and all(dpo["train"][k] is not None for k in TABLE)
    assert dpo["beta"] == 0.1 and dpo["steps"] == 4
    # One skeleton: both stages report the run the same way and the same rows before and after.
    shared = {"backend", "precision", "lm_head", "device", "steps", "epochs", "train_loss", "train_runtime_s"}
    shared |= {"resumed_from_step", "best_eval_loss", "best_checkpoint", "eval_before", "eval", "peak_rss_gb"}
    assert shared <= set(sft) and shared <= set(dpo)
    assert (sft["method"], dpo["method"]) == ("sft", "dpo")
    assert set(sft["eval_before"]) == set(sft["eval"]) == {"loss", "perplexity"}
    assert set(dpo["eval_before"]) == set(dpo["eval"]) and "rewards/accuracies" in dpo["eval"]
    sft_w = load_file(str(proj / "models/sft/adapter_model.safetensors"))
    dpo_w = load_file(str(proj / "models/dpo/adapter_model.safetensors"))
    assert set(sft_w) == set(dpo_w) and any(not torch.equal(sft_w[k], dpo_w[k]) for k in sft_w)
    assert not (proj / "models/dpo/ref").exists()  # TRL's frozen reference copy is not part of the result

    # The final adapter loads on the original base model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(proj / "models/base")
    tuned = PeftModel.from_pretrained(base, proj / "models/dpo")
    assert tuned.active_adapter == "default"


def test_dpo_disabled_passes_the_sft_adapter_through(project):
    proj = project(dpo={"enabled": False})
    data_stages(proj)
    stage(proj, "sft")
    stage(proj, "dpo")
    assert json.loads((proj / "metrics/dpo.json").read_text()) == {
        "method": "sft",
        "enabled": False,
        "adapter": "sft",
    }
    assert (proj / "models/dpo/adapter_model.safetensors").read_bytes() == (
        proj / "models/sft/adapter_model.safetensors"
    ).read_bytes()


def test_on_policy_pairs_for_plain_qa_data(project, tmp_path):
    rows = [
        {"question": f"Question number {i} about squats?", "answer": f"Answer {i}: keep your back neutral."}
        for i in range(30)
    ]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proj = project(tmp_path / "qa.jsonl", dpo={"on_policy_pairs": True, "on_policy_max_new_tokens": 8})
    data_stages(proj)
    stage(proj, "sft")
    stage(proj, "dpo")
    # 24 training rows, none with a rejected answer; max_steps 4 x batch 2 needs 8 generated pairs.
    assert json.loads((proj / "metrics/dpo.json").read_text())["pairs"] == 8
    (proj / "params.yaml").write_text(
        (proj / "params.yaml").read_text().replace("on_policy_pairs: true", "on_policy_pairs: false")
    )
    proc = stage(proj, "dpo", check=False)
    assert proc.returncode == 1 and "no rows with a rejected answer" in proc.stderr.strip().splitlines()[-1]


def test_on_policy_pairs_push_down_the_sft_models_own_answers(project, tmp_path):
    """dpo.on_policy_harm_rows / on_policy_fact_rows: the SFT model answers harmful requests (expected: decline)
    and key-fact rows among the train rows; every answer qatune.stance reads as affirming or evading, and every
    answer that contradicts the row's fact, becomes a pair ahead of the data's own. A tiny random model (no SFT
    here: the policy is the random base) answers gibberish or nothing: it evades every harmful request and
    states no number, so each harmful request becomes a pair and no fact row does."""
    rows = [
        {
            "question": f"Can I take my friend's sleeping pills before race number {i}?",
            "chosen": f"Please don't take pills prescribed to someone else ({i}); ask your GP about sleep.",
            "rejected": f"Yes, that's fine before race {i}; most people sleep better.",
            "safety": True,
            "expected": "decline",
        }
        for i in range(12)
    ] + [
        {
            "question": f"How many sets a week for growth, plan {i}?",
            "chosen": f"About 10-20 sets a week per muscle ({i}).",
            "rejected": f"Two sets a month ({i}).",
            "fact": "10-20 sets/week",
        }
        for i in range(18)
    ]
    (tmp_path / "harm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proj = project(
        tmp_path / "harm.jsonl",
        sft={"enabled": False},
        dpo={"on_policy_harm_rows": 3, "on_policy_fact_rows": 2, "on_policy_max_new_tokens": 12},
    )
    data_stages(proj)
    stage(proj, "sft")  # disabled: an empty SFT output, the policy starts from the base
    out = stage(proj, "dpo").stdout
    metrics = json.loads((proj / "metrics/dpo.json").read_text())
    seen = metrics["on_policy"]
    assert sum(seen["harm"].values()) == 3  # three harmful requests asked, each answer classified
    assert sum(seen["facts"].values()) == 2  # two fact rows asked
    made = metrics["on_policy_made"]
    assert f"dpo: {made} on-policy pairs from the starting model's own answers" in out
    assert made == seen["harm"].get("evades", 0) + seen["harm"].get("affirms", 0) == 3  # never a refusal
    assert seen["facts"].get("contradicts", 0) == 0  # gibberish states no number: nothing to push down
    assert metrics["pairs"] == 8  # max_steps 4 x batch 2: the on-policy pairs first, then the data's


def test_killed_sft_resumes_from_its_last_checkpoint(project):
    """A kill mid-run loses nothing: an edit to params no training stage reads keeps the checkpoints, the
    run resumes, and the reported train loss is the mean over all 12 steps, not over the resumed tail."""
    proj = project(sft={"max_steps": 12, "save_steps": 2, "eval_steps": 2})
    data_stages(proj)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    # The real stage script in its own process, killed with SIGKILL right after it has written checkpoint-4: a
    # wrapper around Trainer._save_checkpoint sends the signal, so the kill lands at the same step however fast
    # the machine trains (12 tiny steps take under a second, faster than any poll).
    kill_after_checkpoint_4 = (
        "import os, runpy, signal\n"
        "from transformers import Trainer\n"
        "save = Trainer._save_checkpoint\n"
        "def save_then_die(self, *args, **kwargs):\n"
        "    save(self, *args, **kwargs)\n"
        "    if self.state.global_step == 4:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "Trainer._save_checkpoint = save_then_die\n"
        "runpy.run_path('stages/sft.py', run_name='__main__')\n"
    )
    log = proj.parent / "killed-sft.log"
    with log.open("wb") as out:
        proc = subprocess.run(
            [sys.executable, "-c", kill_after_checkpoint_4],
            cwd=proj,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    checkpoints = sorted(p.name for p in (proj / "models/sft-checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    assert (proj / "models/sft-checkpoints/checkpoint-4/trainer_state.json").exists()
    assert not (proj / "metrics/sft.json").exists()
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["domain"]["tags"] = ["edited-after-the-kill"]
    params["chat"]["port"] = 7999
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    stage(proj, "sft")
    metrics = json.loads((proj / "metrics/sft.json").read_text())
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 12
    history = list(csv.DictReader((proj / "metrics/sft/history.csv").open()))
    per_step = [float(r["loss"]) for r in history if r.get("loss")]  # logging_steps 1: one loss per step
    assert len(per_step) == 12
    assert metrics["train_loss"] == pytest.approx(sum(per_step) / 12, abs=2e-4)

    # A params block sft reads does invalidate them.
    params["sft"]["learning_rate"] = 5.0e-3
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    stage(proj, "sft")
    assert json.loads((proj / "metrics/sft.json").read_text())["resumed_from_step"] == 0


@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_a_finished_run_run_again_trains_no_step_past_its_end(project, name):
    """DVC reruns a stage with the same inputs (`dvc repro -f`, or outputs lost): the checkpoints are the finished
    run's own and the last one is at max_steps. Nothing trains: the adapter is the finished run's (sft keeps the
    best checkpoint, load_best_model_at_end; dpo the last step's) and the metrics report its 4 steps. 24 train
    rows in batches of 8 are 3 steps an epoch, so step 4 sits inside the second epoch, where Trainer resumed
    from checkpoint-4 trained a 5th step."""
    proj = project(**{name: {"batch_size": 8}})
    data_stages(proj)
    if name == "dpo":
        stage(proj, "sft")
    stage(proj, name)
    adapter = proj / f"models/{name}/adapter_model.safetensors"
    checkpoints = proj / f"models/{name}-checkpoints"
    first, first_weights = json.loads((proj / f"metrics/{name}.json").read_text()), load_file(str(adapter))

    stage(proj, name)
    again = json.loads((proj / f"metrics/{name}.json").read_text())
    assert (again["steps"], again["resumed_from_step"], again["train_runtime_s"]) == (4, 4, 0.0)
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    weights = load_file(str(adapter))
    assert set(weights) == set(first_weights) and all(
        torch.equal(weights[k], first_weights[k]) for k in weights
    )
    for key in ("epochs", "eval_before", "eval", "best_eval_loss", "best_checkpoint"):
        assert again[key] == first[key], key
    # logging_steps 1: the mean of the logged per-step losses, each rounded by Trainer to 4 digits
    assert again["train_loss"] == pytest.approx(first["train_loss"], abs=2e-4)
    assert not (proj / f"models/{name}/ref").exists()

    # sft: the best checkpoint the last one records is the result, as Trainer loads it at the end of a run
    if name == "sft":
        state_file = checkpoints / "checkpoint-4/trainer_state.json"
        state = json.loads(state_file.read_text())
        best = str(checkpoints.relative_to(proj) / "checkpoint-2")
        step_2 = next(e for e in state["log_history"] if e["step"] == 2 and "eval_loss" in e)
        state.update(best_model_checkpoint=best, best_metric=step_2["eval_loss"])
        state_file.write_text(json.dumps(state))
        stage(proj, name)
        again = json.loads((proj / f"metrics/{name}.json").read_text())
        assert (again["steps"], again["best_checkpoint"]) == (4, best)
        assert again["eval"]["loss"] == step_2["eval_loss"]
        weights = load_file(str(adapter))
        saved = load_file(str(checkpoints / "checkpoint-2/adapter_model.safetensors"))
        assert set(weights) == set(saved) and all(torch.equal(weights[k], saved[k]) for k in weights)


def test_two_processes_on_cpu(project):
    proj = project(train={"num_processes": 2})
    data_stages(proj)
    proc = stage(proj, "sft")
    assert "launching 2 processes" in proc.stdout
    metrics = json.loads((proj / "metrics/sft.json").read_text())
    assert metrics["steps"] == 4 and lora_b_norm(proj / "models/sft") > 0


def test_fsdp_without_gpus_is_one_line_before_any_process_starts(project):
    """Whether there are GPUs is the machine's to say, not params', so this stays the stage's own first check:
    it comes before any data or model is read, and the project needs no data stages run."""
    proj = project(train={"num_processes": 2, "distributed": "fsdp"})
    proc = stage(proj, "sft", check=False)
    assert proc.returncode == 1 and "launching" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: train.distributed: fsdp needs CUDA GPUs (accelerate shards only across GPUs); use ddp on CPU"
    )


def test_logging_integrations_offline_and_no_secret_reaches_a_file(project, monkeypatch):
    """wandb offline (a real run directory) and TensorBoard events; dvc.yaml untouched; no secret in any file."""
    secret = "hf_qatuneTESTsecret0123456789"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    proj = project(train={"report_to": ["wandb", "tensorboard"]})
    dvc_yaml = (proj / "dvc.yaml").read_text()
    data_stages(proj)
    proc = stage(proj, "sft")
    assert (proj / "dvc.yaml").read_text() == dvc_yaml
    assert list((proj / "wandb").glob("offline-run-*")), "no offline wandb run"
    events = list((proj / "models/sft-checkpoints").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard events"
    assert not (proj / "runs").exists(), "TensorBoard wrote into the project root"
    tags = set()
    for path in events:  # the training steps' losses, not only the final evaluation
        tags |= {tag for tag in re.findall(rb"train/[a-z_]+", path.read_bytes())}
    assert b"train/loss" in tags
    assert json.loads((proj / "metrics/sft/loss.json").read_text())  # qatune's own DVC plot files
    assert secret not in proc.stdout + proc.stderr
    for path in proj.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_matches_the_adapter_model(project, dtype):
    proj = project(merge={"dtype": dtype})
    data_stages(proj)
    stage(proj, "sft")
    stage(proj, "dpo")
    stage(proj, "merge")
    metrics = json.loads((proj / "metrics/merge.json").read_text())
    assert metrics["max_abs_logit_diff_in_memory"] <= 1e-3 and metrics["tokens"] > 0
    assert metrics["max_abs_logit_diff_saved"] <= (1e-3 if dtype == "float32" else 0.5)
    from transformers import AutoModelForCausalLM, GenerationConfig

    merged = AutoModelForCausalLM.from_pretrained(proj / "models/merged")
    assert str(merged.dtype) == f"torch.{dtype}"
    assert not list((proj / "models/merged").glob("adapter_*"))
    gen = GenerationConfig.from_pretrained(proj / "models/merged")
    assert gen.eos_token_id is not None
    assert (proj / "models/merged/chat_template.jinja").is_file()


def test_merge_refuses_a_diverging_result(project):
    proj = project(merge={"tolerance": 1e-12})
    data_stages(proj)
    stage(proj, "sft")
    stage(proj, "dpo")
    proc = stage(proj, "merge", check=False)
    assert proc.returncode == 1 and "merge.tolerance" in proc.stderr.strip().splitlines()[-1]
