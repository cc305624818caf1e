"""Unsloth's SFT data preparation, run for real on a CPU: unsloth_zoo's `sft_prepare_dataset` (what Unsloth's
SFTTrainer runs in place of TRL's `_prepare_dataset`) on the SFT rows qatune builds for every chat family it
trains, single- and multi-turn. The tokens it learns (labels != -100) and the tokens it feeds must equal the
transformers path's (TRL's SFTTrainer, as the sft stage builds it).

unsloth_zoo is installed in the CUDA-stack tier only (`make test-cuda-stack`, at docker/requirements-cuda.lock's
version); in the CPU venv this module is skipped. It imports without a GPU when UNSLOTH_ZOO_DISABLE_GPU_INIT=1 is
set first, and then puts a stand-in `triton` into sys.modules, so it runs in a child process of its own: the
other tests in this worker never see it.

DPO and KTO rows: unsloth_zoo 2026.10.7 has no preparation for text preference rows (its one preference
module, mlx/preference.py, serves Apple's MLX trainer). Unsloth 2026.10.7's DPO patch changes TRL's
`_prepare_dataset` only for vision models (unsloth/models/rl_replacements.py, dpo_trainer_prepare_dataset)
and its KTO patches only the log-probabilities, so text pairs go through TRL's own `tokenize_row`, which the
transformers path's tests already run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("unsloth_zoo") is None:
    pytest.skip(
        "unsloth_zoo is not installed: it belongs to the CUDA-stack tier (make test-cuda-stack), not the CPU venv",
        allow_module_level=True,
    )

from qatune.templates import sft_example, use_training_template  # noqa: E402
from tests.tiny import CHATML, MISTRAL, build_model, build_tokenizer  # noqa: E402
from tests.unit.test_chat_templates import CONVERSATION, FAMILIES, tokenizer_with  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MAX_LENGTH = 256
# name -> (tiny model family, the tokenizer's original template, system prompt): TRL's templates for Qwen2.5,
# Qwen3, Llama 3 and Gemma and Llama 3.2's own (test_chat_templates.py), SmolLM2's ChatML, Mistral Instruct's
# [INST] template (no system role, no training template: prompt/completion rows).
CASES = {
    **{
        name: (family, template, None if family == "gemma" else "Be safe.")
        for name, (family, template) in FAMILIES.items()
    },
    "chatml": ("llama", CHATML, "Be safe."),
    "mistral": ("mistral", MISTRAL, None),
}
ROW = {"prompt": CONVERSATION[:3], "chosen": CONVERSATION[3]["content"]}

# Run in the child: UNSLOTH_ZOO_DISABLE_GPU_INIT before the import; UNSLOTH_DATASET_NUM_PROC=0 tokenises in
# this process. `trainer` stands in for Unsloth's SFTTrainer: TRL 1.15 leaves `chat_template` None when the
# tokenizer's template already has generation markers (sft_trainer.py ~924), as qatune's training template has.
PREPARE = """
import json, os, sys
os.environ["UNSLOTH_ZOO_DISABLE_GPU_INIT"] = "1"
os.environ["UNSLOTH_DATASET_NUM_PROC"] = "0"
from types import SimpleNamespace
import unsloth_zoo
from unsloth_zoo.dataset_utils import sft_prepare_dataset
from datasets import Dataset
from transformers import AutoTokenizer
from trl import SFTConfig

jobs, out = json.load(open(sys.argv[1])), {"version": unsloth_zoo.__version__, "rows": {}}
for job in jobs:
    tok = AutoTokenizer.from_pretrained(job["tokenizer"])
    args = SFTConfig(output_dir=job["tmp"], assistant_only_loss=job["assistant_only_loss"], max_length=job["max_length"],
                     use_cpu=True, bf16=False, report_to="none")
    trainer = SimpleNamespace(chat_template=None, model=None)
    ds = sft_prepare_dataset(trainer, Dataset.from_list([job["example"]]), tok, args, packing=False,
                             formatting_func=None, dataset_name="train")
    row = ds[0]
    # TRL 1.15's collator trains on a row's labels when it has them, else on every input id.
    out["rows"][job["name"]] = {"input_ids": row["input_ids"], "labels": row.get("labels", row["input_ids"])}
json.dump(out, open(sys.argv[2], "w"))
"""


def case_ids() -> list[str]:
    return [f"{name}-{turns}" for name in CASES for turns in ("all", "last")]


def training_tokenizer(name: str):
    """(tokenizer carrying its training template, the SFT example the sft stage builds from ROW)."""
    family, template, system = CASES[name[: name.rindex("-")]]
    tok = tokenizer_with(family, template) if template != MISTRAL else build_tokenizer(family="mistral")
    _, kwargs, loss_mode = use_training_template(tok, enable_thinking=False)
    return tok, sft_example(ROW, system, loss_mode, name.rsplit("-", 1)[1], kwargs)


@pytest.fixture(scope="module")
def unsloth_rows(tmp_path_factory) -> dict:
    """Every case prepared by unsloth_zoo in one child process (its imports take most of the time)."""
    tmp = tmp_path_factory.mktemp("unsloth-zoo")
    jobs = []
    for name in case_ids():
        tok, example = training_tokenizer(name)
        tok.save_pretrained(tmp / name)
        jobs.append(
            {
                "name": name,
                "tokenizer": str(tmp / name),
                "example": example,
                "assistant_only_loss": "messages" in example,
                "max_length": MAX_LENGTH,
                "tmp": str(tmp / "out"),
            }
        )
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run(
        [sys.executable, "-c", PREPARE, str(tmp / "jobs.json"), str(tmp / "rows.json")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "rows.json").read_text())


def transformers_row(name: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of the first batch TRL's SFTTrainer gives the sft stage's example."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok, example = training_tokenizer(name)
    trainer = SFTTrainer(
        model=build_model(tok, CASES[name[: name.rindex("-")]][0]),
        processing_class=tok,
        train_dataset=Dataset.from_list([example]),
        args=SFTConfig(
            output_dir="/tmp/qatune-unsloth-zoo-prep",
            assistant_only_loss="messages" in example,
            use_cpu=True,
            bf16=False,
            report_to="none",
            per_device_train_batch_size=1,
            max_length=MAX_LENGTH,
        ),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    return batch["input_ids"][0].tolist(), batch["labels"][0].tolist()


def test_the_tier_runs_the_unsloth_zoo_the_cuda_lock_pins(unsloth_rows):
    lock = (ROOT / "docker/requirements-cuda.lock").read_text()
    pinned = re.search(r"^unsloth[_-]zoo==(\S+)", lock, re.MULTILINE).group(1)
    assert unsloth_rows["version"] == pinned


@pytest.mark.parametrize("name", case_ids())
def test_unsloth_learns_the_tokens_the_transformers_path_learns(unsloth_rows, name):
    ids, labels = transformers_row(name)
    theirs = unsloth_rows["rows"][name]
    assert theirs["input_ids"] == ids
    learned = [t for t in labels if t != -100]
    assert [t for t in theirs["labels"] if t != -100] == learned
    # and what both learn is the answers: the last one always, the earlier one with train_turns: all
    tok, _ = training_tokenizer(name)
    text = tok.decode(learned)
    assert "3 to 5 g a day." in text and "protein" not in text and "Be safe." not in text
    multi_turn = name.endswith("-all") and not name.startswith("mistral")
    assert ("About 1.6 g per kg." in text) == multi_turn
