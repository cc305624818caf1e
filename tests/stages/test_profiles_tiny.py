"""Each seed profile, on a tiny random model of its architecture family, runs two SFT steps on CPU.

Everything but the download and the GPU is exercised: the profile's LoRA targets, optimizer (adamw_8bit
included), lengths, schedule and the family's real chat template (the string TRL ships for Qwen2.5, Qwen3
and Gemma, Llama 3.2's own), which must train on assistant tokens only and be published unchanged. CUDA-only switches (4-bit, unsloth) are
turned off here because this machine has no GPU; their selection logic is tested in tests/unit.
"""

import json
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer
from trl import chat_template_utils as trl_templates

from qatune.profiles import merged
from qatune.tiny import save_tiny
from tests.conftest import FIXTURES, ROOT, run

FAMILY = {
    "seed000-qwen3-dpo": ("qwen3", trl_templates.qwen3_chat_template),
    "seed001-qwen25-sft": ("qwen2", trl_templates.qwen2_5_chat_template),
    "seed002-gemma-psychology": ("gemma", trl_templates.gemma_chat_template),
    "seed004-llama32-finetome": ("llama", trl_templates.llama3_2_chat_template),
}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_seed_profile_trains_two_steps_on_a_tiny_model_of_its_family(name, project, tmp_path):
    family, template = FAMILY[name]
    model_dir = save_tiny(tmp_path / "tiny", family)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if "<|start_header_id|>" in template:
        tok.bos_token = "<|begin_of_text|>"
    tok.chat_template = template
    tok.save_pretrained(model_dir)
    data, _ = merged(name, ROOT / "params.yaml", ROOT / "profiles")
    data["base_model"]["source"] = str(model_dir)
    data["fetch"]["sources"] = [
        {"name": "fixture", "type": "local", "path": str(FIXTURES / "mixed_small.jsonl")}
    ]
    data["train"].update(load_in_4bit=False, backend="transformers", precision="fp32", report_to=[])
    data["sft"].update(
        max_steps=2, eval_steps=2, save_steps=2, batch_size=2, grad_accum=1, warmup_steps=0, max_length=384
    )
    data["split"] = {"val": 0.2, "test": 0.1, "stratify": None}
    proj = project()
    (proj / "params.yaml").write_text(yaml.safe_dump(data))
    for stage in ("fetch", "clean", "split", "sft"):
        run([sys.executable, f"stages/{stage}.py"], proj)
    metrics = json.loads((proj / "metrics/sft.json").read_text())
    assert metrics["steps"] == 2 and metrics["train_loss"] > 0
    assert metrics["loss_mode"] == "assistant_only"
    assert AutoTokenizer.from_pretrained(proj / "models/sft").chat_template == template  # the original
    cfg = json.loads((Path(proj) / "models/sft/adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(data["train"]["lora"]["target_modules"])
    assert cfg["r"] == data["train"]["lora"]["r"]
