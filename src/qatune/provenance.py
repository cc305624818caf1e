"""Where every artifact came from: file digests, the git commit, the provenance files written next to
weights, the code a process runs, peak memory, and the check that a stage's inputs exist."""

from __future__ import annotations

import hashlib
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from qatune.errors import QatuneError
from qatune.io import sha256_file

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


def peak_memory_gb() -> dict[str, float]:
    """Peak CPU RSS of this process and, on a GPU, the CUDA peak reserved memory with its share of the
    device's memory (what seed 004's notebook prints after training)."""
    import torch

    out = {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)}
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(device).total_memory
        out.update(cuda_memory(torch.cuda.max_memory_reserved(device), total))
    return out


def cuda_memory(peak_reserved_bytes: int, device_total_bytes: int) -> dict[str, float]:
    """Peak reserved GPU memory, the device's total, and the peak as a percentage of it."""
    return {
        "peak_cuda_reserved_gb": round(peak_reserved_bytes / 1024**3, 3),
        "cuda_device_memory_gb": round(device_total_bytes / 1024**3, 3),
        "peak_cuda_reserved_pct": round(100 * peak_reserved_bytes / device_total_bytes, 3),
    }


def training_report(method: str, metrics: dict) -> str:
    """One line at the end of a training stage: time, final train and validation loss, peak memory."""
    minutes = metrics.get("train_runtime_s", 0.0) / 60
    parts = [f"{method}: {metrics.get('steps')} steps in {minutes:.2f} min"]
    if metrics.get("train_loss") is not None:
        parts.append(f"train loss {metrics['train_loss']:.4f}")
    val = (metrics.get("eval") or {}).get("loss")
    if val is not None:
        parts.append(f"validation loss {val:.4f}")
    if "peak_cuda_reserved_gb" in metrics:
        parts.append(
            f"peak reserved memory {metrics['peak_cuda_reserved_gb']:.3f} GB "
            f"({metrics['peak_cuda_reserved_pct']:.3f}% of {metrics['cuda_device_memory_gb']:.3f} GB)"
        )
    parts.append(f"peak RSS {metrics.get('peak_rss_gb', 0.0):.2f} GB")
    return ", ".join(parts)


def require(path: str | Path, what: str) -> Path:
    """The path, or a one-line error saying that an earlier stage has not run."""
    path = Path(path)
    if not path.exists():
        raise QatuneError(f"{path}: missing {what}; run the earlier stages first (dvc repro)")
    return path


def write_provenance(out: str | Path, payload: dict[str, Any]) -> None:
    (Path(out) / PROVENANCE_FILE).write_text(json.dumps(payload, indent=2, default=str) + "\n")
