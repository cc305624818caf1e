"""push-to-hub on a tiny random model: dry run, real uploads, no-op re-runs, offline errors, no token leaks.

No real Hub is reachable here, so tests/hub_server.py stands in for it: a local HTTP server answering the
create-repo, repo-info, paths-info, preupload, LFS batch and commit endpoints with the Hub's JSON shapes.
The stage runs as a subprocess with HF_ENDPOINT pointing at that server, so the real huggingface_hub
client code (which reads HF_ENDPOINT / HF_HUB_OFFLINE at import time) does the uploading end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, tiny_params
from tests.hub_server import FakeHub

SENTINEL = "hf_qatuneSENTINELtoken_5f1c9a7e"  # a unique value to grep for: it must appear nowhere
HUB_BASE_ID = "qatune-tests/tiny-llama-base"
ADAPTER_REPO = "tester/tiny-fitness-lora"
MERGED_REPO = "tester/tiny-fitness"
GGUF_REPO = "tester/tiny-fitness-GGUF"
EVALUATE = {
    "models": {
        "base": {
            "nll": 2.5,
            "perplexity": 12.18,
            "preference_accuracy": 0.55,
            "rouge_l": 0.21,
            "safety_score": 0.9,
        },
        "sft": {"nll": 2.1, "perplexity": 8.17, "preference_accuracy": 0.6},
        "final": {
            "nll": 2.0,
            "perplexity": 7.39,
            "preference_accuracy": 0.7,
            "rouge_l": 0.25,
            "safety_score": 0.95,
        },
    },
    "dpo_implicit_reward": {"accuracy": 0.7, "margin": 0.12},
    "test_rows": 112,
}
SFT = {"method": "sft", "steps": 4, "train_loss": 3.2, "eval_before": {"loss": 3.4}, "eval": {"loss": 3.1}}
DPO = {
    "enabled": True,
    "steps": 4,
    "pairs": 8,
    "train_loss": 0.68,
    "eval_before": {"loss": 0.6931, "rewards/accuracies": 0.0, "rewards/margins": 0.0},
    "eval": {"loss": 0.66, "rewards/accuracies": 0.75, "rewards/margins": 0.05},
}
MERGE = {"dtype": "float32", "prompts": 4, "max_abs_logit_diff_saved": 1.2e-5}
QUANTS = ("f16", "q8_0")


def export_metrics(quants=QUANTS) -> dict:
    """metrics/export.json as the export stage writes it (tests/stages/test_export.py runs the real stage)."""
    files = [
        {
            "quant": q,
            "file": f"model-{q}.gguf",
            "bytes": 300 + i,
            "mean_abs_logprob_diff": 0.001 * (i + 1),
            "max_abs_logprob_diff": 0.01 * (i + 1),
            "top1_agreement": 1.0 - 0.02 * i,
            "tolerance": 0.1,
            "tokens_per_s": 50.0 + i,
        }
        for i, q in enumerate(quants)
    ]
    return {
        "enabled": True,
        "skipped": None,
        "converter": "llama.cpp via llama-cpp-python 0.3.36",
        "check_prompts": 4,
        "check_tokens": 96,
        "merged_bytes": 1_000_000,
        "merged_tokens_per_s": 20.0,
        "files": files,
        "modelfile": "Modelfile",
    }


def write_gguf(path: Path, quant: str) -> None:
    """A small but real GGUF file, written by llama.cpp's gguf package: the release only moves its bytes
    (the export stage's own test converts, quantises and loads real models)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"tiny {quant}")
    writer.add_tensor("token_embd.weight", np.full((4, 8), len(quant), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


DATA_SHA = "d" * 64


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A project folder as the earlier stages leave it: base, DPO adapter (with ref/), merged model, metrics."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proj = tmp_path_factory.mktemp("release") / "proj"
    base = proj / "models" / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "qatune_base.json").write_text(json.dumps({"source": str(tiny_model_dir), "hub_id": HUB_BASE_ID}))
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n")  # what domain.license: auto follows

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():  # a trained-looking adapter: B = 0 would make the merge a no-op
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    dpo = proj / "models" / "dpo"
    model.save_pretrained(dpo)  # records the absolute local base path, as the real stage does
    tokenizer.save_pretrained(dpo)
    model.save_pretrained(dpo / "ref")
    (dpo / "training_args.bin").write_bytes(b"pickled trainer args")
    (dpo / "qatune_provenance.json").write_text(
        json.dumps(
            {"data_sha256": DATA_SHA, "git_commit": "abc123", "sft_adapter": str(proj / "models" / "sft")}
        )
    )
    merged = model.merge_and_unload()
    merged.generation_config.eos_token_id = tokenizer.eos_token_id
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(proj / "models" / "merged")
    tokenizer.save_pretrained(proj / "models" / "merged")

    gguf_dir = proj / "models" / "gguf"
    gguf_dir.mkdir()
    for quant in QUANTS:
        write_gguf(gguf_dir / f"model-{quant}.gguf", quant)
    (gguf_dir / "Modelfile").write_text("FROM ./model-q8_0.gguf\nPARAMETER temperature 0.2\n")
    (gguf_dir / "convert.log").write_text(f"INFO: loading {proj / 'models' / 'merged'}\n")  # never released

    metrics = proj / "metrics"
    metrics.mkdir()
    for name, data in {
        "evaluate": EVALUATE,
        "sft": SFT,
        "dpo": DPO,
        "merge": MERGE,
        "export": export_metrics(),
    }.items():
        (metrics / f"{name}.json").write_text(json.dumps(data))
    lock = {
        "schema": "2.0",
        "stages": {
            "dpo": {
                "cmd": "python stages/dpo.py",
                "outs": [{"path": "models/dpo", "md5": "f" * 32 + ".dir"}],
            },
            "merge": {"cmd": "python stages/merge.py", "outs": [{"path": "models/merged", "md5": "e" * 32}]},
            "sft": {"cmd": "python stages/sft.py"},
        },
    }
    (proj / "dvc.lock").write_text(yaml.safe_dump(lock))
    params = tiny_params(tiny_model_dir, ROOT / "tests" / "fixtures" / "mixed_small.jsonl")
    params["hub"].update(
        adapter_repo=ADAPTER_REPO, merged_repo=MERGED_REPO, gguf_repo=GGUF_REPO, base_model_id=None
    )  # from the record
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    return proj


@pytest.fixture
def proj(built: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "proj"
    shutil.copytree(built, dst)
    return dst


@pytest.fixture
def server(tmp_path: Path):
    hub = FakeHub(tmp_path / "hub-storage", token=SENTINEL).start()
    yield hub
    hub.stop()


def set_hub(proj: Path, **values) -> None:
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["hub"].update(values)
    (proj / "params.yaml").write_text(yaml.safe_dump(params))


def push(
    proj: Path, token: str | None = SENTINEL, endpoint: str | None = None, offline: bool = False, check=True
):
    """Run the stage as DVC would; huggingface_hub reads HF_* at import, hence a fresh process each time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(proj / ".hf-home"), HF_HUB_OFFLINE="1" if offline else "0", HF_HUB_DISABLE_XET="1")
    env.update({"HF_TOKEN": token} if token else {}, **({"HF_ENDPOINT": endpoint} if endpoint else {}))
    cmd = [sys.executable, str(ROOT / "stages" / "push_to_hub.py"), "--params", "params.yaml"]
    proc = subprocess.run(cmd, cwd=proj, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"push-to-hub failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def receipt(proj: Path) -> dict:
    return json.loads((proj / "metrics" / "push.json").read_text())


def repo_entry(data: dict, role: str) -> dict:
    return next(r for r in data["repos"] if r["role"] == role)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("\n---\n", 1)[0][4:])


def assert_no_sentinel(proj: Path, *outputs: str) -> None:
    for text in outputs:
        assert SENTINEL not in text
    for path in proj.rglob("*"):
        if path.is_file():
            assert SENTINEL.encode() not in path.read_bytes(), path


def test_dry_run_stages_exactly_the_release(proj: Path):
    before = {p: sha256(p) for p in (proj / "models").rglob("*") if p.is_file()}
    proc = push(proj)  # a token is set, but hub.push is false: a dry run that must not touch the network
    assert "dry run" in proc.stdout
    adapter, merged = proj / "models/hub/adapter", proj / "models/hub/merged"

    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= names
    assert not {"training_args.bin", "ref"} & names and all(p.is_file() for p in adapter.iterdir())
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md"} <= {
        p.name for p in merged.iterdir()
    }
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_BASE_ID

    # Weights are hard links (no second copy); the trained artifacts are byte-for-byte unchanged.
    assert (adapter / "adapter_model.safetensors").stat().st_ino == (
        proj / "models/dpo/adapter_model.safetensors"
    ).stat().st_ino
    assert {p: sha256(p) for p in before} == before
    assert "/" in json.loads((proj / "models/dpo/adapter_config.json").read_text())["base_model_name_or_path"]

    # No local path reaches any staged file.
    for path in (p for p in (proj / "models/hub").rglob("*") if p.is_file()):
        data = path.read_bytes()
        for needle in (str(proj), "/tmp/", str(Path.home())):
            assert needle.encode() not in data, (path, needle)

    # What was staged loads: the merged model with its generation config, the adapter on the base.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    assert GenerationConfig.from_pretrained(merged).do_sample is True
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(merged), adapter)
    gen = json.loads((merged / "generation_config.json").read_text())
    assert gen["do_sample"] is True and gen["temperature"] == 0.2 and gen["top_p"] == 0.9
    assert gen["max_new_tokens"] == 512 and gen["repetition_penalty"] == 1.1
    assert gen["eos_token_id"] == gen["pad_token_id"] == 2  # kept from models/merged

    data = receipt(proj)
    assert data["mode"] == "dry-run" and data["note"] is None
    for role, folder, repo in (("adapter", adapter, ADAPTER_REPO), ("merged", merged, MERGED_REPO)):
        entry = repo_entry(data, role)
        assert entry["repo_id"] == repo and entry["private"] is True and entry["commit"] is None
        assert {f["path"]: f["sha256"] for f in entry["files"]} == {
            p.name: sha256(p) for p in folder.iterdir()
        }
        assert entry["total_bytes"] == sum(p.stat().st_size for p in folder.iterdir())

    card = (adapter / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == HUB_BASE_ID and meta["library_name"] == "peft"
    assert meta["base_model_relation"] == "adapter" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0" and "fitness" in meta["tags"]
    assert (
        "AutoPeftModelForCausalLM" in card
        and "PeftModel.from_pretrained" in card
        and "apply_chat_template" in card
    )
    assert "| answer NLL (nats/token, reference answers) (lower is better) | 2.5 | 2.1 | 2 | -0.5 |" in card
    assert (
        "| ROUGE-L F1 vs reference (higher is better) | 0.21 | – | 0.25 |" in card
        and "112 held-out test rows" in card
    )
    assert DATA_SHA in card and "f" * 32 in card and "Not medical or dietary advice" in card
    merged_meta = front_matter((merged / "README.md").read_text())
    assert merged_meta["library_name"] == "transformers" and merged_meta["base_model_relation"] == "finetune"
    assert "AutoModelForCausalLM" in (merged / "README.md").read_text()
    assert "| `temperature` | 0.2 |" in (merged / "README.md").read_text()
    assert_no_sentinel(proj, proc.stdout, proc.stderr)


def test_push_uploads_then_skips_unchanged_then_only_the_changed_file(proj: Path, server: FakeHub):
    set_hub(proj, push=True)
    first = push(proj, endpoint=server.url)
    data = receipt(proj)
    assert data["mode"] == "uploaded"
    for role, repo_id in (("adapter", ADAPTER_REPO), ("merged", MERGED_REPO)):
        entry, repo = repo_entry(data, role), server.repos[repo_id]
        assert repo.private is True and entry["private"] is True
        assert (
            sorted(entry["uploaded"]) == sorted(f["path"] for f in entry["files"])
            and entry["unchanged"] == []
        )
        assert entry["commit"]["oid"] == repo.commits[-1] and entry["commit"]["url"].startswith(server.url)
        for f in entry["files"]:  # every file arrived intact
            assert hashlib.sha256(server.read(repo_id, f["path"])).hexdigest() == f["sha256"]
    assert server.repos[MERGED_REPO].files["model.safetensors"]["lfs"] is True  # weights went through LFS
    assert all(h == f"Bearer {SENTINEL}" for h in server.auth_headers)  # the token was used, and only sent

    commits = {r: len(server.repos[r].commits) for r in (ADAPTER_REPO, MERGED_REPO)}
    second = push(proj, endpoint=server.url)
    data = receipt(proj)
    for role in ("adapter", "merged"):
        entry = repo_entry(data, role)
        assert entry["uploaded"] == [] and entry["commit"] is None
        assert sorted(entry["unchanged"]) == sorted(f["path"] for f in entry["files"])
    assert {r: len(server.repos[r].commits) for r in commits} == commits
    assert "nothing to upload" in second.stdout

    # A retrained merge: new weights in models/merged (written as a new file, as save_pretrained does).
    weights = proj / "models/merged/model.safetensors"
    content = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(content[:-4] + b"\x00\x00\x00\x40")  # the last norm weight: 1.0 -> 2.0
    third = push(proj, endpoint=server.url)
    data = receipt(proj)
    assert (
        repo_entry(data, "adapter")["uploaded"] == []
        and len(server.repos[ADAPTER_REPO].commits) == commits[ADAPTER_REPO]
    )
    assert repo_entry(data, "merged")["uploaded"] == ["model.safetensors"]
    assert len(server.repos[MERGED_REPO].commits) == commits[MERGED_REPO] + 1
    assert server.read(MERGED_REPO, "model.safetensors") == weights.read_bytes()
    assert_no_sentinel(proj, *(p.stdout + p.stderr for p in (first, second, third)))
    assert_no_sentinel(server.root)


def test_a_file_dropped_from_the_release_is_deleted_on_the_hub(proj: Path, server: FakeHub):
    """A release with a stale shard index, then one without it: the Hub must not keep the old file (it would
    make transformers look for shards that are gone), and unchanged files stay untouched."""
    set_hub(proj, push=True)
    index = proj / "models/merged/model.safetensors.index.json"
    index.write_text('{"metadata": {}, "weight_map": {"w": "model-00001-of-00002.safetensors"}}\n')
    push(proj, endpoint=server.url)
    assert "model.safetensors.index.json" in server.repos[MERGED_REPO].files
    commits = len(server.repos[MERGED_REPO].commits)
    index.unlink()
    again = push(proj, endpoint=server.url)
    entry = repo_entry(receipt(proj), "merged")
    assert entry["deleted"] == ["model.safetensors.index.json"] and entry["uploaded"] == []
    assert "model.safetensors.index.json" not in server.repos[MERGED_REPO].files
    assert sorted(server.repos[MERGED_REPO].files) == sorted(
        [".gitattributes", *(f["path"] for f in entry["files"])]
    )
    assert len(server.repos[MERGED_REPO].commits) == commits + 1  # one commit for the deletion
    assert "deleted 1 no longer in the release (model.safetensors.index.json)" in again.stdout
    assert repo_entry(receipt(proj), "adapter")["deleted"] == []
    third = push(proj, endpoint=server.url)  # nothing left to do: no commit
    assert len(server.repos[MERGED_REPO].commits) == commits + 1 and "deleted" not in third.stdout


def test_push_while_offline_is_one_clear_error(proj: Path, server: FakeHub):
    set_hub(proj, push=True)
    proc = push(proj, endpoint=server.url, offline=True, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "HF_HUB_OFFLINE=0" in proc.stderr
    assert "Traceback" not in proc.stderr and server.requests == []
    assert not (proj / "metrics/push.json").exists()
    assert_no_sentinel(proj, proc.stdout, proc.stderr)


def test_unreachable_hub_is_one_clear_error(proj: Path):
    set_hub(proj, push=True)
    proc = push(proj, endpoint="http://127.0.0.1:9", check=False)  # the discard port: nothing listens
    assert proc.returncode == 1 and "cannot reach http://127.0.0.1:9" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert_no_sentinel(proj, proc.stdout, proc.stderr)


def test_push_without_token_is_a_dry_run_with_a_note(proj: Path, server: FakeHub):
    set_hub(proj, push=True)
    proc = push(proj, token=None, endpoint=server.url)
    assert "HF_TOKEN is unset" in proc.stdout and server.requests == []
    data = receipt(proj)
    assert data["mode"] == "dry-run" and "HF_TOKEN is unset" in data["note"]


def test_unknown_base_id_asks_for_hub_base_model_id(proj: Path):
    (proj / "models/base/qatune_base.json").write_text(json.dumps({"source": "/somewhere/local"}))
    proc = push(proj, token=None, check=False)
    assert proc.returncode == 1 and "hub.base_model_id" in proc.stderr and "Traceback" not in proc.stderr
    set_hub(proj, base_model_id="someone/their-base")
    push(proj, token=None)
    adapter = proj / "models/hub/adapter"
    assert (
        json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "someone/their-base"
    )


def test_gguf_release_stages_the_verified_files_and_a_card_of_their_own(proj: Path):
    proc = push(proj, token=None)
    gguf_dir, staged = proj / "models/gguf", proj / "models/hub/gguf"
    assert "staged gguf" in proc.stdout
    # Exactly what metrics/export.json verified, the Modelfile, the card and the public provenance; the
    # converter's log (it names local paths) stays behind.
    assert sorted(p.name for p in staged.iterdir()) == sorted(
        ["Modelfile", "README.md", "model-f16.gguf", "model-q8_0.gguf", "qatune_provenance.json"]
    )
    for quant in QUANTS:  # hard links: no second copy of the weights
        assert (staged / f"model-{quant}.gguf").stat().st_ino == (
            gguf_dir / f"model-{quant}.gguf"
        ).stat().st_ino

    from huggingface_hub import ModelCard

    card = ModelCard((staged / "README.md").read_text())
    meta = card.data.to_dict()
    assert meta["base_model"] == MERGED_REPO and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "gguf" and {"gguf", "llama.cpp", "ollama"} <= set(meta["tags"])
    assert card.data.eval_results is None  # evaluate measured the merged weights, not these files
    text = card.text
    assert "| `model-q8_0.gguf` | `Q8_0` | 301 B | 0.002 | 0.02 | 0.98 | 0.1 | 51 |" in text
    assert f"llama-cli -hf {GGUF_REPO}:Q4_K_M" not in text  # modelfile_quant q4_k_m is not in this release
    assert f"llama-cli -hf {GGUF_REPO}:Q8_0" in text and "ollama create" in text
    assert f"ollama run hf.co/{GGUF_REPO}:Q8_0" in text and "Llama.from_pretrained" in text
    assert "Measured on the merged weights" in text and "| 2.5 | 2.1 | 2 | -0.5 |" in text

    entry = repo_entry(receipt(proj), "gguf")
    assert entry["repo_id"] == GGUF_REPO and entry["mode"] == "dry-run"
    assert {f["path"]: f["sha256"] for f in entry["files"]} == {p.name: sha256(p) for p in staged.iterdir()}


def test_gguf_release_uploads_then_deletes_a_dropped_quantisation(proj: Path, server: FakeHub):
    set_hub(proj, push=True)
    push(proj, endpoint=server.url)
    repo = server.repos[GGUF_REPO]
    assert repo.files["model-f16.gguf"]["lfs"] is True and repo.private is True
    assert server.read(GGUF_REPO, "model-q8_0.gguf") == (proj / "models/gguf/model-q8_0.gguf").read_bytes()
    assert "convert.log" not in repo.files
    commits = len(repo.commits)

    # The export stage reruns with quantizations [f16]: q8_0 and its card row must leave the Hub.
    (proj / "models/gguf/model-q8_0.gguf").unlink()
    (proj / "metrics/export.json").write_text(json.dumps(export_metrics(("f16",))))
    again = push(proj, endpoint=server.url)
    entry = repo_entry(receipt(proj), "gguf")
    assert entry["deleted"] == ["model-q8_0.gguf"] and sorted(entry["uploaded"]) == [
        "README.md",
        "qatune_provenance.json",
    ]
    assert "model-q8_0.gguf" not in repo.files and len(repo.commits) == commits + 1
    assert "model-q8_0.gguf" not in server.read(GGUF_REPO, "README.md").decode()
    assert "deleted 1 no longer in the release (model-q8_0.gguf)" in again.stdout
    assert_no_sentinel(proj, again.stdout, again.stderr)
    assert_no_sentinel(server.root)


def test_no_gguf_release_without_a_repo_or_without_export_files(proj: Path, server: FakeHub):
    push(proj, token=None)
    assert (proj / "models/hub/gguf").is_dir()
    # The export stage skipped (export.enabled false): one line says so, and the earlier staging goes.
    (proj / "metrics/export.json").write_text(
        json.dumps({"enabled": False, "skipped": "export.enabled is false", "files": []})
    )
    proc = push(proj, token=None)
    assert (
        f"no GGUF release ({GGUF_REPO}): the export stage wrote no GGUF files (export.enabled is false)"
        in proc.stdout
    )
    assert not (proj / "models/hub/gguf").exists()
    assert [r["role"] for r in receipt(proj)["repos"]] == ["adapter", "merged"]
    # hub.gguf_repo null: no third repo is created on upload, and nothing is said about it.
    (proj / "metrics/export.json").write_text(json.dumps(export_metrics()))
    set_hub(proj, push=True, gguf_repo=None)
    proc = push(proj, endpoint=server.url)
    assert sorted(server.repos) == sorted([ADAPTER_REPO, MERGED_REPO]) and "GGUF" not in proc.stdout
    # A file export.json lists but the folder lacks: one line naming it, nothing uploaded.
    set_hub(proj, gguf_repo=GGUF_REPO)
    (proj / "models/gguf/model-f16.gguf").unlink()
    proc = push(proj, endpoint=server.url, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
    assert "model-f16.gguf: listed in metrics/export.json but not found" in proc.stderr
    assert GGUF_REPO not in server.repos


WORSE = {
    "worse_than_base": True,
    "judged": True,
    "reasons": ["affirms 3 of 10 harmful requests, the base 1"],
    "harmful_affirmed": {"base": 1, "final": 3, "of": 10},
    "facts_contradicted": {"base": 4, "final": 4, "of": 40},
    "facts_stated": {"base": 20, "final": 22, "of": 40},
}


def test_a_model_worse_than_its_base_is_refused_unless_the_override_is_set(proj: Path, server: FakeHub):
    evaluate = json.loads((proj / "metrics/evaluate.json").read_text())
    (proj / "metrics/evaluate.json").write_text(json.dumps({**evaluate, "verdict": WORSE}))
    set_hub(proj, push=True)
    proc = push(proj, endpoint=server.url, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert (
        "refusing to publish" in proc.stderr and "affirms 3 of 10 harmful requests, the base 1" in proc.stderr
    )
    assert "hub.allow_worse_than_base" in proc.stderr
    assert server.requests == [] and not (proj / "models/hub").exists()  # nothing staged, nothing sent

    # a dry run publishes nothing: it stages the release with the warning and says a push would be refused
    set_hub(proj, push=False)
    proc = push(proj, endpoint=server.url)
    assert server.requests == [] and receipt(proj)["mode"] == "dry-run"
    assert "a push would be refused unless hub.allow_worse_than_base: true" in receipt(proj)["note"]
    assert "Warning: this model is worse" in (proj / "models/hub/merged/README.md").read_text()

    set_hub(proj, push=True, allow_worse_than_base=True)
    proc = push(proj, endpoint=server.url)
    assert "releasing a model worse than its base" in proc.stdout
    for role in ("adapter", "merged"):
        card = (proj / "models/hub" / role / "README.md").read_text()
        body = card.split("\n---\n", 1)[1]
        assert body.lstrip().startswith("> **Warning: this model is worse than its base model")
        assert "affirms 3 of 10 harmful requests, the base 1" in body
        assert "affirmed 3 of 10 harmful requests (the base 1)" in body and "**worse than the base**" in body
        assert "README.md" in server.repos[repo_entry(receipt(proj), role)["repo_id"]].files  # uploaded


def test_a_model_no_worse_than_its_base_releases_without_a_warning(proj: Path):
    evaluate = json.loads((proj / "metrics/evaluate.json").read_text())
    safe = {
        **WORSE,
        "worse_than_base": False,
        "reasons": [],
        "harmful_affirmed": {"base": 3, "final": 0, "of": 10},
    }
    (proj / "metrics/evaluate.json").write_text(json.dumps({**evaluate, "verdict": safe}))
    push(proj, token=None)
    card = (proj / "models/hub/merged/README.md").read_text()
    assert "Warning" not in card and "affirmed 0 of 10 harmful requests (the base 3)" in card
    assert "no more harmful than the base" in card
