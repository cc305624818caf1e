"""Each seed profile's own values, run through the stages on a tiny random model of its architecture family
with the family's real chat template (the string TRL ships for Qwen2.5, Qwen3 and Gemma, Llama 3.2's own,
Mistral Instruct v0.1's own), which must train on assistant tokens only and be published unchanged; seed 001
trains and publishes its plain User:/Assistant: format instead (train.prompt_format: plain).

Only steps and sizes are cut, plus what cannot run here; each cut is listed in `cuts()` and printed, and the
test checks that every other value is the profile's (default recipe + profile) in the params file written, in
the params the training stage read (its provenance record) and in the TrainingArguments the run saved with
its checkpoint (learning rate, schedule, warmup, optimiser, beta, ...):
- the base model: the tiny model of the family (no download);
- each source: a local file in the source's own format with the same `use_as`, 12 rows (no Hub);
- CUDA-only switches: 4-bit, Unsloth and fp16 need a GPU (their selection logic is tested in tests/unit);
- steps, batch sizes and lengths: two optimiser steps of two short rows;
- the evaluation: four questions answered in eight greedy tokens, no sentence-embedding model.

After training, the run goes on as `dvc repro` does: score@{base,sft,final}, evaluate, merge, then one
`qatune ask` on the merged model, which must prompt it the way it was trained (the family's template, or
seed 001's plain text) and stop there.
"""

import json
import sys
from enum import Enum
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer
from trl import chat_template_utils as trl_templates

from qatune import training
from qatune.profiles import flatten, resolve
from qatune.provenance import PROVENANCE_FILE
from qatune.templates import is_plain
from tests.conftest import FIXTURES, ROOT, run
from tests.seeds import SEEDS
from tests.tiny import save_tiny

# mistralai/Mistral-7B-Instruct-v0.1's tokenizer_config.json chat_template.
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
TEMPLATES = {
    "qwen3": trl_templates.qwen3_chat_template,
    "qwen2": trl_templates.qwen2_5_chat_template,
    "gemma": trl_templates.gemma_chat_template,
    "llama": trl_templates.llama3_2_chat_template,
    "mistral": MISTRAL_V01,
}
MISSING = object()
ROWS_PER_SOURCE = 12  # a source that is one split; sources split by the split block share 24 rows
STEP_CUTS = {"max_steps": 2, "eval_steps": 2, "save_steps": 2, "logging_steps": 1, "batch_size": 2}
STEP_CUTS |= {"eval_batch_size": 2, "grad_accum": 1, "warmup_steps": 0, "max_length": 384, "eval_rows": 0}


def in_format(row: dict, fmt: str) -> dict:
    """A fixture row (question, chosen, rejected) written in a source format."""
    q, good, bad = row["question"], row["chosen"], row["rejected"]
    return {
        "auto": row,
        "qa": {"question": q, "answer": good},
        "alpaca": {"instruction": q, "input": "", "output": good},
        "response_jk": {"question": q, "response_j": good, "response_k": bad},
        "sharegpt": {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": good}]},
    }[fmt]


def cuts(data: dict, model_dir: Path, data_dir: Path) -> dict[str, object]:
    """The values this test changes, as dotted keys, and the local source files they point at."""
    rows = [json.loads(line) for line in (FIXTURES / "mixed_small.jsonl").read_text().splitlines()]
    out: dict[str, object] = {"base_model.source": str(model_dir)}
    sources, start = [], 0
    to_split = sum(1 for src in data["fetch"]["sources"] if not src.get("use_as"))
    for src in data["fetch"]["sources"]:
        fmt = src.get("format", "auto")
        n = ROWS_PER_SOURCE if src.get("use_as") else 2 * ROWS_PER_SOURCE // to_split
        chunk, start = rows[start : start + n], start + n
        path = data_dir / f"{src['name']}.jsonl"
        path.write_text("".join(json.dumps(in_format(r, fmt)) + "\n" for r in chunk))
        local = {"name": src["name"], "type": "local", "path": str(path), "format": fmt}
        if src.get("use_as"):
            local["use_as"] = src["use_as"]
        sources.append(local)
    out["fetch.sources"] = sources
    out |= {"train.load_in_4bit": False, "train.backend": "transformers", "train.precision": "fp32"}
    out["train.require_cuda"] = False  # the GPU profiles stop without CUDA; this runs them on the CPU
    for block in ("sft", "dpo"):
        out |= {f"{block}.{key}": value for key, value in STEP_CUTS.items()}
    out["clean.max_length"] = 384
    out |= {"evaluate.batch_size": 4, "evaluate.max_new_tokens": 8, "evaluate.generate_rows": 4}
    out |= {"evaluate.semantic_model": None, "evaluate.sample_answers": 2}
    # Room for the default's system prompt (203 tokens under the tiny Qwen3 tokenizer, which clean counts in
    # the prompt) and a question, below clean.max_length: seed 000's own 256 stays.
    out["clean.max_prompt_length"] = min(data["clean"]["max_prompt_length"], 320)
    return out


def put(data: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[leaf] = value


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: s.profile)
def test_seed_profile_runs_its_own_values_on_a_tiny_model_of_its_family(seed, project, tmp_path):
    template = TEMPLATES[seed.family]
    model_dir = save_tiny(tmp_path / "tiny", seed.family)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if "<|start_header_id|>" in template:
        tok.bos_token = "<|begin_of_text|>"
    tok.chat_template = template
    tok.save_pretrained(model_dir)
    profile, params = resolve(seed.profile, ROOT / "profiles")
    data = json.loads(json.dumps(profile))
    (tmp_path / "data").mkdir()
    changes = cuts(data, model_dir, tmp_path / "data")
    for key, value in changes.items():
        put(data, key, value)
    print(f"{seed.profile}: cut {sorted(changes)}")
    assert params.base_model.source == seed.base_model

    proj = project()
    (proj / "params.yaml").write_text(yaml.safe_dump(data))
    # The file the stages read differs from default + profile in the listed cuts and nowhere else.
    want = dict(flatten(profile))
    written = yaml.safe_load((proj / "params.yaml").read_text())
    got = dict(flatten(written))
    differ = {k for k in want.keys() | got.keys() if want.get(k, MISSING) != got.get(k, MISSING)}
    assert differ <= set(changes), f"changed beyond the cuts: {sorted(differ - set(changes))}"
    for stage in ["fetch", "clean", "split", "sft", "dpo"]:  # dpo.enabled false: the SFT adapter is copied
        run([sys.executable, f"stages/{stage}.py"], proj)
    split = json.loads((proj / "metrics/split.json").read_text())
    sft = json.loads((proj / "metrics/sft.json").read_text())
    if params.sft.enabled:
        assert sft["steps"] == 2 and sft["train_loss"] > 0
        published = AutoTokenizer.from_pretrained(proj / "models/sft").chat_template
        if (
            params.train.prompt_format == "plain"
        ):  # seed 001: its text, learned whole, published as the template
            assert sft["loss_mode"] == "whole_text" and is_plain(published)
        else:
            # Loss on answer tokens only: by the template's generation marks, or (a template without them, such
            # as Mistral's) as prompt/completion pairs.
            assert sft["loss_mode"] == ("completion_only" if seed.family == "mistral" else "assistant_only")
            assert published == template  # the original
        adapter = proj / "models/sft"
    else:
        assert sft == {"method": "none", "enabled": False, "adapter": None}
        adapter = proj / "models/dpo"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(data["train"]["lora"]["target_modules"])
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (
        params.train.lora.r,
        params.train.lora.alpha,
        params.train.lora.dropout,
    )
    # The profile's last training stage: the params it read and the TrainingArguments it built.
    trained = "dpo" if params.dpo.enabled else "sft"
    used = json.loads((proj / f"models/{trained}" / PROVENANCE_FILE).read_text())["params"]
    compared = {k: v for k, v in flatten(used) if k in want and k not in changes}
    assert len(compared) > 30  # seed, train.* and the method's block, less the cuts (33 for an SFT block)
    assert compared == {k: want[k] for k in compared}  # what the stage read is the profile's, cuts aside
    saved = torch.load(
        proj / f"models/{trained}-checkpoints/checkpoint-2/training_args.bin", weights_only=False
    )
    block = written[trained]
    built = {
        "learning_rate": block["learning_rate"],
        "lr_scheduler_type": block["scheduler"],
        "warmup_steps": training.warmup(getattr(params, trained).model_copy(update=block)),
        "optim": block["optim"],
        "weight_decay": block["weight_decay"],
        "max_grad_norm": block["max_grad_norm"],
        "num_train_epochs": block["epochs"],
        "max_steps": block["max_steps"],
        "per_device_train_batch_size": block["batch_size"],
        "gradient_accumulation_steps": block["grad_accum"],
        "logging_steps": block["logging_steps"],
        "eval_steps": block["eval_steps"],
        "save_steps": block["save_steps"],
        "save_total_limit": block["save_total_limit"],
        "load_best_model_at_end": block["load_best_model_at_end"],
        "max_length": block["max_length"],
        "seed": written["seed"],
        "gradient_checkpointing": written["train"]["activation_checkpointing"],
    }
    if trained == "dpo":
        built |= {"beta": written["beta"], "loss_type": written["dpo"]["loss_type"]}
    ran = {k: v.value if isinstance(v, Enum) else v for k, v in ((k, getattr(saved, k)) for k in built)}
    assert ran == built
    after_training(proj, params, want_template=None if params.train.prompt_format == "plain" else template)
    if params.dpo.enabled:
        dpo = json.loads((proj / "metrics/dpo.json").read_text())
        assert dpo["steps"] == 2 and dpo["reference"] == "base" and dpo["loss_type"] == params.dpo.loss_type
        assert AutoTokenizer.from_pretrained(proj / "models/dpo").chat_template == template
    given = {s.use_as for s in params.fetch.sources if s.use_as}
    if given:  # the sources' own split, not re-split
        assert split["rows"]["val"] == ROWS_PER_SOURCE and split["rows"]["test"] == 0
    if params.evaluate.split == "val":
        assert split["rows"]["test"] == 0 and split["rows"]["val"] > 0
    if "tensorboard" in params.train.report_to:  # the real TensorBoard writer, event files on disk
        assert list(proj.glob("**/events.out.tfevents.*")), "no TensorBoard events"


def after_training(proj: Path, params, want_template: str | None) -> None:
    """score@{base,sft,final}, evaluate, merge and one `qatune ask`, with the commands dvc.yaml runs."""
    models = {
        "base": ("models/base", ["--generate"]),
        "sft": ("models/sft", []),
        "final": ("models/dpo", ["--generate"]),
    }
    for name, (adapter, generate) in models.items():
        cmd = ["stages/score.py", "--model", "models/base", "--adapter", adapter, "--name", name, *generate]
        cmd += ["--data", "data/split", "--out", f"data/scores/{name}.json"]
        run([sys.executable, *cmd], proj)
    final = json.loads((proj / "data/scores/final.json").read_text())
    scored = final["sets"]["test"]  # the held-out set, whichever split (evaluate.split) it came from
    answers = scored["answers"]
    assert len(answers) == min(4, len(scored["rows"])) > 0 and all(isinstance(a, str) for a in answers)
    run([sys.executable, "stages/evaluate.py", "--judge-cache", "data/judge/cache.jsonl"], proj)
    evaluated = json.loads((proj / "metrics/evaluate.json").read_text())
    assert evaluated["verdict"] and (proj / "metrics/report.md").read_text().startswith("#")
    run([sys.executable, "stages/merge.py"], proj)
    merged = AutoTokenizer.from_pretrained(proj / "models/merged").chat_template
    assert (merged == want_template) if want_template else is_plain(merged)
    asked = run(
        [str(Path(sys.executable).parent / "qatune"), "ask", "--max-new-tokens", "6", "How much water?"], proj
    )
    # The model the profile serves (generate.mode: the merged folder, or seed 004's base + adapter on the CPU
    # in float32) answered; a random tiny model's six tokens may all be blank, so only the line is asserted.
    source = "models/merged" if params.generate.mode == "merged" else "models/base + models/dpo"
    device = "cpu (float32)" if params.chat.device == "cpu" else "cpu"
    assert f"qatune: {source} on {device}" in asked.stderr and asked.stdout.endswith("\n"), asked.stderr
