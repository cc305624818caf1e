"""The export stage with llama.cpp's real converter, quantiser and runtime (built by `make setup`).

A tiny random Llama with SmolLM2's own tokenizer and chat template (read from the bundled GGUF) stands in
for the merged model: the converter knows that tokenizer, so the whole path runs in seconds. A tiny model
with tests.tiny's in-process BPE tokenizer is one the converter does not know: the stage must say so in one
line and succeed without files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT


def tiny_llama(out: Path, tokenizer) -> Path:
    """tests.tiny's random 2-layer Llama, sized to this tokenizer."""
    from tests.tiny import build_model

    build_model(tokenizer, "llama").save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from qatune.base_model import bundled_tokenizer

    return bundled_tokenizer("smollm2-135m-instruct")


def run_export(proj: Path, merged: Path, **export) -> subprocess.CompletedProcess:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["export"].update(check_prompts=2, check_new_tokens=12, **export)
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, str(ROOT / "stages/export.py"), "--merged", str(merged)]
    cmd += ["--out", "models/gguf", "--metrics", "metrics/export.json"]
    return subprocess.run(cmd, cwd=proj, capture_output=True, text=True)


def test_export_writes_verified_gguf_files_and_a_modelfile(tmp_path, smollm2_tokenizer):
    merged = tiny_llama(tmp_path / "merged", smollm2_tokenizer)
    done = run_export(tmp_path, merged, quantizations=["f16", "q8_0", "q4_k_m"])
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics/export.json").read_text())
    files = {row["quant"]: row for row in metrics["files"]}
    assert set(files) == {"f16", "q8_0", "q4_k_m"} and metrics["skipped"] is None
    for quant, row in files.items():
        path = tmp_path / "models/gguf" / row["file"]
        assert path.stat().st_size == row["bytes"] and path.read_bytes()[:4] == b"GGUF"
        assert row["same_tokenization"] == "2/2"  # llama.cpp's tokenizer gives transformers' ids
        assert row["tokens"] > 0 and row["mean_abs_logprob_diff"] <= row["tolerance"], quant
    # 16-bit is close to exact; 8-bit rounds more; 4-bit is the smallest file.
    assert files["f16"]["mean_abs_logprob_diff"] < 0.01 and files["f16"]["top1_agreement"] >= 0.9
    assert files["f16"]["bytes"] > files["q8_0"]["bytes"] > files["q4_k_m"]["bytes"]
    modelfile = (tmp_path / "models/gguf/Modelfile").read_text()
    assert "FROM ./model-q4_k_m.gguf" in modelfile
    assert "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n<|im_start|>user\n" in modelfile
    assert "{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}<|im_end|>" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'SYSTEM """You are a friendly fitness' in modelfile
    from gguf import GGUFReader  # the chat template travels inside the file, the model's own

    reader = GGUFReader(tmp_path / "models/gguf/model-q8_0.gguf")
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == smollm2_tokenizer.chat_template


def test_a_file_over_its_tolerance_fails_in_one_line(tmp_path, smollm2_tokenizer):
    merged = tiny_llama(tmp_path / "merged", smollm2_tokenizer)
    done = run_export(
        tmp_path,
        merged,
        quantizations=["f16", "q4_0"],
        tolerance={"f16": 0.02, "q4_0": 1e-9},
        modelfile_quant="q4_0",
    )
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
    assert errors[0].startswith("error: export: model-q4_0.gguf: mean |log-prob diff|")
    assert errors[0].endswith("is over export.tolerance.q4_0 = 1e-09")


def test_a_model_the_converter_does_not_know_is_skipped_in_one_line(tmp_path):
    from tests.tiny import save_tiny

    merged = save_tiny(
        tmp_path / "merged", "llama"
    )  # an in-process BPE: llama.cpp has no pre-tokenizer for it
    done = run_export(tmp_path, merged)
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("export: skipped, llama.cpp's converter does not support this model:"), line
    assert not list((tmp_path / "models/gguf").glob("*.gguf"))
    assert (tmp_path / "models/gguf/NOT_EXPORTED.txt").is_file()
    assert json.loads((tmp_path / "metrics/export.json").read_text())["skipped"] == line.removeprefix(
        "export: skipped, "
    )


def test_qatune_ask_serves_the_gguf_in_llama_cpp(tmp_path, smollm2_tokenizer):
    merged = tiny_llama(tmp_path / "merged", smollm2_tokenizer)
    assert (
        run_export(
            tmp_path, merged, quantizations=["f16"], tolerance={"f16": 0.02}, modelfile_quant="f16"
        ).returncode
        == 0
    )
    exe = Path(sys.executable).parent / "qatune"
    ask = [str(exe), "ask", "--mode", "gguf", "--temperature", "0", "--max-new-tokens", "12"]
    done = subprocess.run([*ask, "How much protein do I need?"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        "qatune: models/gguf/model-f16.gguf on cpu (llama.cpp f16)" in done.stderr
    )  # export.modelfile_quant's file
    assert len(done.stdout) > 1, (
        "no answer text"
    )  # a random model's tokens (often whitespace), then the newline
    again = subprocess.run(
        [*ask, "How much protein do I need?"], cwd=tmp_path, capture_output=True, text=True
    )
    assert again.stdout == done.stdout  # greedy: the same answer
    missing = subprocess.run(
        [*ask, "--model-dir", "nowhere.gguf", "Q?"], cwd=tmp_path, capture_output=True, text=True
    )
    assert (
        missing.returncode == 1
        and "nowhere.gguf: no GGUF file found; run `dvc repro export` first" in missing.stderr
    )
