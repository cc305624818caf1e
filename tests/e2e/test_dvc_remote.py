"""`dvc push` to a local directory remote, then `git clone` + `dvc pull` restores data and adapters byte for byte."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tests.conftest import ROOT, run


def dvc(proj: Path, *args: str):
    return run([sys.executable, "-m", "dvc", *args], proj)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_then_pull_in_a_fresh_clone(project, tmp_path):
    proj = project()
    # As in the real repo: models/ and data/ stay out of git.
    shutil.copy(ROOT / ".gitignore", proj / ".gitignore")
    dvc(proj, "repro", "sft")
    remote = tmp_path / "remote"
    dvc(proj, "remote", "add", "-d", "local", str(remote))
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "sft on the tiny profile"], proj)
    tracked = run(["git", "ls-files"], proj).stdout.split()
    assert not any(name.startswith(("models/", "data/split/")) for name in tracked)

    pushed = dvc(proj, "push").stdout
    assert "files pushed" in pushed
    assert "Everything is up to date" in dvc(proj, "push").stdout

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(proj), str(clone)], tmp_path)
    assert not (clone / "data/split").exists() and not (clone / "models").exists()
    # Only fetch..sft have run, so the later stages have no hashes in dvc.lock: a bare `dvc pull` fails
    # on them ("Checkout failed for models/dpo"). After a full `dvc repro`, plain `dvc pull` works.
    dvc(clone, "pull", "--with-deps", "sft")

    # Cached outputs come back byte for byte: the split data and the SFT adapter.
    assert tree(clone / "data/split") == tree(proj / "data/split")
    assert tree(clone / "models/sft") == tree(proj / "models/sft")
    assert (clone / "models/sft/adapter_model.safetensors").is_file()
    assert (clone / "data/clean/rows.jsonl").read_bytes() == (proj / "data/clean/rows.jsonl").read_bytes()

    # `cache: false` outputs are never pushed, and `dvc pull` skips them without an error: models/base
    # (a full copy of the base model) and the checkpoints are missing until a stage writes them again.
    assert not (clone / "models/base").exists() and not (clone / "models/sft-checkpoints").exists()
    assert "deleted:            models/base" in dvc(clone, "status", "fetch").stdout
    # fetch is deterministic: re-running it alone restores models/base with the hash dvc.lock records.
    dvc(clone, "repro", "--single-item", "fetch")
    assert tree(clone / "models/base") == tree(proj / "models/base")
    assert "Data and pipelines are up to date" in dvc(clone, "status", "fetch", "clean", "split").stdout
