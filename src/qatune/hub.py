"""Release plumbing for push-to-hub: stage what would be uploaded, hash it, upload only what changed.

The staged folders (models/hub/adapter, models/hub/merged and, when the export stage wrote files,
models/hub/gguf) are exactly what reaches the Hub, so a dry run shows a release before it happens. Large
files are hard links to the trained artifacts (no second copy of a 500 MB model); files qatune rewrites
(adapter_config.json, generation_config.json, README.md) are new files, so models/dpo, models/merged and
models/gguf are never modified. The Hub is reached only through `huggingface_hub`,
which reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported: import it only inside these functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from qatune.errors import QatuneError
from qatune.io import sha256_file, write_json
from qatune.params import GenerateParams
from qatune.provenance import BASE_RECORD

ROLES = ("adapter", "merged", "gguf")  # the repos a release publishes; gguf only when export wrote files
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Training-only or local-only files: optimizer state, Trainer arguments (a pickle), qatune's local
# provenance (it holds local paths; a public one is written instead) and peft's placeholder card.
SKIP_FILES = {
    "README.md",
    "training_args.bin",
    "trainer_state.json",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "qatune_provenance.json",
    "qatune_base.json",
    "qatune_fingerprint.txt",
}
# Text files scanned for local paths before anything leaves the machine; weights are binary.
TEXT_SUFFIXES = {".json", ".md", ".jinja", ".txt", ".yaml", ".yml", ".py"}
# Vocabularies are skipped: a token such as "/app" would match a short working directory by chance.
VOCAB_FILES = {"tokenizer.json", "vocab.json", "vocab.txt", "merges.txt"}
COMMIT_OID = re.compile(r"^[0-9a-f]{40}$")


# --------------------------------------------------------------------------- the base model's Hub id


def looks_like_hub_id(value: str | None) -> bool:
    """`owner/name` that is not also a folder on this machine (a local path must never reach a card)."""
    return bool(value) and bool(HUB_ID.match(value)) and not Path(value).exists()


def resolve_base_id(configured: str | None, base_dir: str | Path, source: str) -> str:
    """hub.base_model_id, else the hub_id fetch recorded, else a Hub-id-looking source; else an error."""
    if configured:
        return configured
    record = Path(base_dir) / BASE_RECORD
    if record.is_file():
        recorded = json.loads(record.read_text(encoding="utf-8")).get("hub_id")
        if recorded:
            return recorded
    if looks_like_hub_id(source):
        return source
    raise QatuneError(
        f"push-to-hub: no Hub id for the base model ({record} has no 'hub_id' and base_model.source "
        f"is not a Hub id): set hub.base_model_id in params.yaml"
    )


# --------------------------------------------------------------------------- licence

# Hub licence ids of base-model families, by a pattern of the base's Hub id (first match wins): what
# `domain.license: auto` gives where the base's own card names none (the bundled SmolLM2 has no card).
# Qwen2.5-3B and -72B carry Qwen's own terms (qwen-research, qwen), which the Hub calls `other`.
FAMILY_LICENSES = (
    (r"qwen2\.5-(?:3b|72b)", "other"),
    (r"smollm|qwen|mistral|mixtral", "apache-2.0"),
    (r"gemma", "gemma"),
    (r"llama-?3\.1", "llama3.1"),
    (r"llama-?3\.2", "llama3.2"),
    (r"llama-?3\.3", "llama3.3"),
    (r"llama-?3\b", "llama3"),
    (r"llama-?2\b", "llama2"),
    (r"phi-?[1-4]", "mit"),
)


def card_license(card: str | Path) -> str | None:
    """The `license` a model card's metadata names (huggingface_hub's own parser); None without a card."""
    card = Path(card)
    if not card.is_file():
        return None
    import yaml
    from huggingface_hub import metadata_load

    try:
        value = (metadata_load(card) or {}).get("license")
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise QatuneError(f"{card}: unreadable model card metadata ({err})") from None
    return (str(value).strip() or None) if value else None


def release_license(setting: str, base_id: str, base_license: str | None = None) -> str:
    """The licence a release carries: `domain.license`, or for `auto` the base model's, as its own card
    records it (`base_license`), else its family's (FAMILY_LICENSES). An unknown base is an error: a
    release under a guessed licence would be wrong."""
    if setting != "auto":
        return setting
    if base_license:
        return base_license
    for pattern, license_id in FAMILY_LICENSES:
        if re.search(pattern, base_id, re.IGNORECASE):
            return license_id
    raise QatuneError(
        f"domain.license is auto, but qatune does not know the licence of the base model {base_id}: "
        "set domain.license to its Hub licence id (e.g. apache-2.0, gemma, llama3.2)"
    )


def base_revision(base_dir: str | Path) -> str | None:
    """The Hub commit fetch snapshotted, if any: pins the adapter to the exact base weights."""
    record = Path(base_dir) / BASE_RECORD
    if not record.is_file():
        return None
    revision = json.loads(record.read_text(encoding="utf-8")).get("revision")
    return revision if isinstance(revision, str) and COMMIT_OID.match(revision) else None


# --------------------------------------------------------------------------- staging


def publishable_files(folder: str | Path) -> list[Path]:
    """Top-level files only: subfolders are checkpoints or DPO's `ref/` reference adapter, never released."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QatuneError(f"{folder}: not found (run the earlier stages first)")
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.name not in SKIP_FILES and not p.name.startswith(".")
    )


def link_or_copy(src: Path, dst: Path) -> str:
    """A hard link (no second copy of the weights), or a copy across filesystems. Returns which."""
    try:
        os.link(src, dst)
        return "link"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def adapter_config(src: Path, base_id: str, revision: str | None) -> dict[str, Any]:
    """peft records the base as the local folder it trained on; users load it by its Hub id."""
    if not src.is_file():
        raise QatuneError(f"{src}: not found (run the dpo stage first)")
    config = json.loads(src.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_id
    if revision:
        config["revision"] = revision
    return config


def generation_config(merged_config: dict[str, Any], gen: GenerateParams) -> dict[str, Any]:
    """The chat defaults of params `generate`, keeping the token ids merge saved (eos/pad/bos)."""
    keep = ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version")
    config = {k: merged_config[k] for k in keep if merged_config.get(k) is not None}
    config["max_new_tokens"] = gen.max_new_tokens
    config["repetition_penalty"] = gen.repetition_penalty
    if gen.temperature > 0:
        config.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p)
    else:  # greedy: sampling knobs would only trigger transformers' "unused flag" warnings
        config["do_sample"] = False
    return config


def gguf_release_files(folder: str | Path, export: dict[str, Any] | None) -> tuple[list[Path], str | None]:
    """(the files the GGUF release publishes, or [] with the reason there is none).

    Exactly what metrics/export.json says the export stage wrote and verified: every checked .gguf and the
    Modelfile. Its logs stay behind (they name local paths), and so does any other file in the folder.
    """
    if not export:
        return [], "no metrics/export.json (run the export stage first)"
    if not export.get("enabled") or export.get("skipped"):
        return (
            [],
            f"the export stage wrote no GGUF files ({export.get('skipped') or 'export.enabled is false'})",
        )
    names = [f["file"] for f in export.get("files") or [] if isinstance(f, dict) and f.get("file")]
    if not names:
        return [], "metrics/export.json lists no GGUF files"
    if export.get("modelfile"):
        names.append(export["modelfile"])
    files = [Path(folder) / name for name in names]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise QatuneError(
            f"{missing[0]}: listed in metrics/export.json but not found (run the export stage again)"
        )
    return files, None


def stage_folder(files: list[Path], dst: str | Path, generated: dict[str, str]) -> dict[str, int]:
    """Fill `dst` with `files` (linked) plus `generated` name -> text (written fresh)."""
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)  # unlinks only: the trained artifacts stay untouched
    dst.mkdir(parents=True)
    counts = {"link": 0, "copy": 0, "generated": 0}
    for path in files:
        if path.name not in generated:
            counts[link_or_copy(path, dst / path.name)] += 1
    for name, text in generated.items():
        (dst / name).write_text(text, encoding="utf-8")
        counts["generated"] += 1
    return counts


def local_path_needles(*paths: str | Path) -> list[str]:
    """Absolute forms of the given paths and of the working directory, as they could appear in a file."""
    needles = {str(Path.cwd().resolve())}
    for p in paths:
        if p and (Path(p).is_absolute() or Path(p).exists()):
            needles.add(str(Path(p).resolve()))
            needles.add(str(Path(p).absolute()))
    return sorted(n for n in needles if n not in ("/", ""))


def check_no_local_paths(folder: str | Path, needles: list[str]) -> None:
    """Refuse to release a text file that names a folder on this machine (e.g. a peft base path)."""
    for path in sorted(Path(folder).iterdir()):
        if path.suffix not in TEXT_SUFFIXES or path.name in VOCAB_FILES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for needle in needles:
            if needle in text:
                raise QatuneError(f"{path}: contains the local path {needle!r}; it must not be published")


# --------------------------------------------------------------------------- hashing and the receipt


def git_blob_sha1(path: Path, chunk: int = 1 << 20) -> str:
    """Git's object id of a file (sha1 of 'blob <size>\\0' + content): what the Hub reports for non-LFS files."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest(folder: str | Path) -> list[dict[str, Any]]:
    """Every staged file with its size and sha256, in a stable order."""
    return [
        {"path": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(Path(folder).iterdir())
        if p.is_file()
    ]


def repo_receipt(
    role: str, repo_id: str, private: bool, staged: str | Path, files: list[dict[str, Any]]
) -> dict[str, Any]:
    """One repo's entry in metrics/push.json, before any upload."""
    return {
        "role": role,
        "repo_id": repo_id,
        "private": private,
        "staged": str(staged),
        "files": files,
        "file_count": len(files),
        "total_bytes": sum(f["size"] for f in files),
        "mode": "dry-run",
        "uploaded": [],
        "unchanged": [],
        "deleted": [],
        "commit": None,
    }


def write_receipt(path: str | Path, mode: str, note: str | None, repos: list[dict[str, Any]]) -> None:
    from huggingface_hub import constants

    write_json(path, {"mode": mode, "endpoint": constants.ENDPOINT, "note": note, "repos": repos})


# --------------------------------------------------------------------------- deciding between dry run and upload


def hub_token() -> str | None:
    """HF_TOKEN, or the token `hf auth login` saved. The value is only ever handed to the client."""
    from huggingface_hub import get_token

    return get_token()


def upload_plan(push: bool) -> tuple[str | None, str | None]:
    """(token to upload with or None for a dry run, a one-line note for the user or None).

    Raises when an upload was asked for with a token but the client is in offline mode: it would fail
    at the first request, so say how to fix it instead.
    """
    from huggingface_hub import constants

    if not push:
        return None, None
    token = hub_token()
    if token is None:
        note = "hub.push is true but HF_TOKEN is unset: dry run only (export HF_TOKEN=hf_... to upload)"
        if constants.HF_HUB_OFFLINE:
            note += "; uploading also needs HF_HUB_OFFLINE=0"
        return None, note
    if constants.HF_HUB_OFFLINE:
        raise QatuneError(
            "push-to-hub: hub.push is true but HF_HUB_OFFLINE=1 (the Makefile's default); "
            "run with HF_HUB_OFFLINE=0 to upload"
        )
    return token, None


# --------------------------------------------------------------------------- upload


def remote_files(api, repo_id: str, paths: list[str]) -> dict[str, Any]:
    """path -> RepoFile for the paths that already exist on the repo's main branch."""
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        infos = api.get_paths_info(repo_id, paths, repo_type="model")
    except (RevisionNotFoundError, EntryNotFoundError):  # an empty repo has no main branch yet
        return {}
    return {info.path: info for info in infos if hasattr(info, "blob_id")}


def is_unchanged(local: dict[str, Any], folder: Path, remote) -> bool:
    """LFS files compare by sha256 (the Hub stores it); regular files by their git blob id."""
    if remote is None or remote.size != local["size"]:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == local["sha256"]
    return remote.blob_id == git_blob_sha1(folder / local["path"])


def hub_error(repo_id: str, err: Exception) -> QatuneError:
    """The client's multi-line HTTP errors, as one line naming the repo (no headers, so no token)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return QatuneError(f"push-to-hub: {repo_id}: {first}")


def stale_files(siblings, release: list[str]) -> list[str]:
    """Files on the Hub that this release no longer has (.gitattributes is the Hub's own). Left there, a
    stale model.safetensors would shadow a new sharded release when transformers loads the repo."""
    keep = set(release) | {".gitattributes"}
    return sorted(s.rfilename for s in siblings or [] if s.rfilename not in keep)


def push_repo(token: str, entry: dict[str, Any], message: str) -> dict[str, Any]:
    """Create the repo if missing, upload the files whose hash differs, delete the files the release no
    longer has, all in one commit, and fill in the receipt entry.

    Nothing differs -> no commit at all, so a re-run of an unchanged release leaves the Hub's history alone.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from qatune.compat import hub_transport_error  # the Hub client's network errors are not OSErrors

    repo_id, folder = entry["repo_id"], Path(entry["staged"])
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=entry["private"], exist_ok=True)
        info = api.repo_info(repo_id, repo_type="model")
        remote = remote_files(api, repo_id, [f["path"] for f in entry["files"]])
        changed = [f for f in entry["files"] if not is_unchanged(f, folder, remote.get(f["path"]))]
        stale = stale_files(info.siblings, [f["path"] for f in entry["files"]])
        result = {
            "mode": "uploaded",
            "private": bool(info.private),
            "url": f"{api.endpoint}/{repo_id}",
            "uploaded": [f["path"] for f in changed],
            "unchanged": [f["path"] for f in entry["files"] if f not in changed],
            "deleted": stale,
            "commit": None,
            "head": info.sha,
        }
        if changed or stale:
            ops: list[Any] = [
                CommitOperationAdd(path_in_repo=f["path"], path_or_fileobj=str(folder / f["path"]))
                for f in changed
            ]
            ops += [CommitOperationDelete(path_in_repo=path) for path in stale]
            commit = api.create_commit(repo_id, ops, commit_message=message, repo_type="model")
            result["commit"] = {"url": commit.commit_url, "oid": commit.oid}
            result["head"] = commit.oid
    except hub_transport_error() as err:
        raise QatuneError(f"push-to-hub: {repo_id}: cannot reach {api.endpoint} ({err})") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise hub_error(repo_id, err) from None
    return {**entry, **result}


# --------------------------------------------------------------------------- provenance


def lock_entries(lock_path: str | Path, stages: tuple[str, ...]) -> dict[str, Any]:
    """The dvc.lock entries DVC wrote for `stages` (hashes of every input and output), if present."""
    import yaml

    path = Path(lock_path)
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise QatuneError(f"{path}: invalid YAML: {err}".replace("\n", " ")) from None
    found = data.get("stages", {}) if isinstance(data, dict) else {}
    return {name: found[name] for name in stages if name in found}


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A metrics or provenance file, or None when that stage did not run."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise QatuneError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    return data if isinstance(data, dict) else None


def release_verdict(evaluation: dict[str, Any] | None, allow_worse: bool, push: bool) -> str | None:
    """Refuse (one line) to publish a tuned model that the evaluate stage found worse than its base (more
    harmful requests affirmed or more key facts contradicted), unless `hub.allow_worse_than_base`. A dry run
    publishes nothing, so it goes on and says what a push would do. Returns the reasons when the model is
    worse (the cards then open with a warning), else None."""
    verdict = (evaluation or {}).get("verdict") or {}
    if not verdict.get("worse_than_base"):
        return None
    reasons = "; ".join(verdict.get("reasons") or ["worse than the base"])
    if push and not allow_worse:
        raise QatuneError(
            f"push-to-hub: refusing to publish: metrics/evaluate.json says the tuned model is worse than the "
            f"base ({reasons}); fix the recipe, or set hub.allow_worse_than_base: true to publish it with a "
            "warning in its cards"
        )
    return reasons
