"""The environment the Makefile gives every target: wandb logs offline unless a key is set, so seed 000's
online logging works through `make repro` with WANDB_API_KEY, and an explicit WANDB_MODE always wins."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from qatune import training

ROOT = Path(__file__).resolve().parents[2]


def make_wandb_mode(**env: str) -> str:
    """WANDB_MODE as a recipe of the Makefile sees it, for this environment."""
    base = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    show = 'show-wandb-mode: ; @echo "[$$WANDB_MODE]"'
    out = subprocess.run(
        ["make", "-s", "--no-print-directory", "--eval", show, "show-wandb-mode"],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_wandb_is_offline_without_a_key_and_online_with_one(monkeypatch):
    assert make_wandb_mode() == "[offline]"
    assert make_wandb_mode(WANDB_API_KEY="k") == "[]"  # left unset, for report_to to choose
    assert make_wandb_mode(WANDB_API_KEY="k", WANDB_MODE="disabled") == "[disabled]"
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert training.report_to(["wandb"]) == ["wandb"] and os.environ["WANDB_MODE"] == "online"
