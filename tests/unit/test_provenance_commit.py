"""provenance.git_commit: "-dirty" means code or params differ from HEAD, not that the pipeline is running."""

import subprocess
from pathlib import Path

from qatune.provenance import git_commit


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def test_dirty_only_for_changes_outside_what_the_pipeline_writes(tmp_path, monkeypatch):
    for path in ("dvc.lock", "metrics/report.md", "params.yaml", "src/qatune/x.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("v1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "-c", "user.email=t@qatune.invalid", "-c", "user.name=t", "commit", "-qm", "init")
    head = git(tmp_path, "rev-parse", "HEAD")
    (tmp_path / "metrics" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "metrics" / "sub")  # from a subfolder too: paths are the repository's
    assert git_commit() == head

    (tmp_path / "dvc.lock").write_text("v2\n")  # a stage finished
    (tmp_path / "metrics" / "report.md").write_text("v2\n")
    assert git_commit() == head

    (tmp_path / "params.yaml").write_text("v2\n")  # the run's inputs changed
    assert git_commit() == f"{head}-dirty"
    git(tmp_path, "checkout", "--", "params.yaml")
    (tmp_path / "src" / "qatune" / "x.py").write_text("v2\n")
    assert git_commit() == f"{head}-dirty"
