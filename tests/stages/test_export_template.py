"""The export stage checks one chat template everywhere (qatune.prompts): a tiny random Llama with SmolLM2's
tokenizer, converted by llama.cpp's real converter, renders a multi-turn conversation to the same prompt ids
in training, in transformers and in llama.cpp, and metrics/export.json says so."""

from __future__ import annotations

import json

from tests.stages.test_export import run_export, smollm2_tokenizer, tiny_llama  # noqa: F401 (fixture)


def test_the_export_records_one_template_everywhere(tmp_path, smollm2_tokenizer):  # noqa: F811
    merged = tiny_llama(tmp_path / "merged", smollm2_tokenizer)
    done = run_export(tmp_path, merged, quantizations=["f16"], tolerance={"f16": 0.02}, modelfile_quant="f16")
    assert done.returncode == 0, done.stderr[-2000:]
    template = json.loads((tmp_path / "metrics/export.json").read_text())["template"]
    assert template["ok"] and template["problems"] == [] and template["gguf"] == "model-f16.gguf"
    tokens = template["prompt_tokens"]
    assert set(tokens) == {"training", "merged", "gguf"} and len(set(tokens.values())) == 1
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert template["end_of_turn_ids"] == {"merged": [im_end], "training": [im_end], "gguf": [im_end]}
    assert template["modelfile_template"].startswith("same text")
