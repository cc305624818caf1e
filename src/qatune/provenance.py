"""Where every artifact came from: file digests, the git commit, the code a process runs, and the provenance
files written next to weights."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

from qatune.io import sha256_file, write_json

BASE_RECORD = "qatune_base.json"  # written by fetch next to the base weights: source, Hub id, revision
PROVENANCE_FILE = "qatune_provenance.json"  # written next to every adapter and merged model


def sha256_files(paths: list[str | Path]) -> str:
    """One digest over several files (order-independent), each read in chunks: weights can be large."""
    digest = hashlib.sha256()
    for path in sorted(str(p) for p in paths):
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def code_digest() -> str:
    """The running script and every qatune module imported so far: the code a stage's result depends on."""
    files = {Path(sys.argv[0]).resolve()} if sys.argv and sys.argv[0].endswith(".py") else set()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if (name == "qatune" or name.startswith("qatune.")) and path:
            files.add(Path(path).resolve())
    return sha256_files(sorted(files))


# What the pipeline itself writes into tracked files while it runs: a change there is the run, not the code.
PIPELINE_WRITES = ("dvc.lock", "metrics")


def git_commit() -> str | None:
    """HEAD's commit, with "-dirty" when tracked files other than the pipeline's own outputs (dvc.lock,
    metrics/) have uncommitted changes; None outside git. A `dvc repro` of a clean checkout rewrites those
    as it goes, so without the exclusion every stage after the first would call its own commit dirty."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        excluded = [f":(top,exclude){path}" for path in PIPELINE_WRITES]
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", *excluded],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def write_provenance(out: str | Path, payload: dict[str, Any]) -> None:
    """The provenance record next to an adapter or merged model: ASCII-only, anything JSON has no type for as
    its str()."""
    write_json(Path(out) / PROVENANCE_FILE, payload, ensure_ascii=True, default=str)
