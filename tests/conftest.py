"""Shared fixtures: a tiny random model folder and a scratch project with the real stages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qatune.profiles import deep_merge
from tests import warm

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_params(model_dir: Path, data_file: Path, **overrides) -> dict:
    """The project's own params.yaml, pointed at a tiny local model and a small local data file."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base_model"]["source"] = str(model_dir)
    params["fetch"]["sources"] = [
        {"name": "fixture", "type": "local", "path": str(data_file), "format": "auto"}
    ]
    # Seconds, not minutes: a handful of steps with frequent evaluation and checkpoints.
    small = {
        "max_steps": 4,
        "batch_size": 2,
        "grad_accum": 1,
        "max_length": 128,
        "logging_steps": 1,
        "eval_steps": 2,
        "save_steps": 2,
        "optim": "adamw_torch",
    }
    # SFT then DPO, the path the GPU profiles take (the embedded default runs DPO alone; tests that need that
    # path turn SFT off)
    params["sft"].update(small, learning_rate=1.0e-2, enabled=True)
    params["dpo"].update(small, learning_rate=1.0e-2)
    params["train"]["lora"]["r"] = 4
    params["train"]["precision"] = "fp32"
    params["train"]["system_prompt"] = "Be safe."
    params["evaluate"].update(batch_size=4, max_new_tokens=12, sample_answers=2)
    params["hub"]["base_model_id"] = "qatune-tests/tiny-random-llama"  # a local base has no Hub id
    params["domain"]["license"] = "apache-2.0"  # licence auto knows no test model
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(params.get(key), dict):
            params[key] = deep_merge(params[key], value)
        else:
            params[key] = value
    return params


@pytest.fixture
def project(tmp_path: Path, tiny_model_dir: Path):
    """A scratch copy of the pipeline (dvc.yaml, stages, package source) in its own git + DVC repo."""

    def make(data_file: Path | None = None, **overrides) -> Path:
        proj = tmp_path / "proj"
        shutil.copytree(ROOT / "stages", proj / "stages")
        shutil.copytree(
            ROOT / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
        shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
        data = data_file or FIXTURES / "mixed_small.jsonl"
        (proj / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_model_dir, data, **overrides)))
        run(["git", "init", "-q"], proj)
        run(["git", "config", "user.email", "tests@qatune.invalid"], proj)  # dvc exp run commits refs
        run(["git", "config", "user.name", "qatune tests"], proj)
        run([sys.executable, "-m", "dvc", "init", "-q"], proj)
        run(["git", "add", "-A"], proj)
        run(["git", "-c", "user.email=t@qatune.invalid", "-c", "user.name=t", "commit", "-qm", "init"], proj)
        return proj

    return make


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env = warm.prepare(env)  # DVC's `python stages/...` is forked by the warm server too
    if warm.forkable(cmd, env):  # a stage script, forked with its libraries already imported
        proc = warm.run_script(cmd, cwd, env)
    else:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc
