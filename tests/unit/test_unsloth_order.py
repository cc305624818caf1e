"""Unsloth must be imported before transformers, TRL and peft in any process that trains with it.

Unsloth itself cannot be imported without a GPU ("Unsloth cannot find any torch accelerator"), so a
stand-in `unsloth` package records what was already imported when it loads. That proves the stages' own
import order; Unsloth's patching itself is only exercised on a GPU (bench/gpu_check.py).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATCHED = ("transformers", "trl", "peft", "datasets")


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_the_backend_is_imported_before_trl_datasets_and_peft(stage):
    """Inside main(): import_backend(...) comes before the first import of trl, datasets or peft."""
    tree = ast.parse((ROOT / "stages" / f"{stage}.py").read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    order = []
    for node in ast.walk(main):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_backend":
            order.append(("backend", node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PATCHED:
            order.append((node.module, node.lineno))
    order.sort(key=lambda x: x[1])
    assert order and order[0][0] == "backend", order
    module_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    for node in module_level:
        names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        assert not any(str(n).split(".")[0] in PATCHED for n in names), ast.dump(node)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_nothing_the_stage_loads_first_imports_transformers(stage, tmp_path):
    """The stage's module-level imports and hardware.probe() leave transformers, TRL and peft unimported,
    so import_backend("unsloth") is the first to touch them (stand-in unsloth, see the module docstring)."""
    fake = tmp_path / "unsloth"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        f"import json, sys\nprint(json.dumps(sorted(m for m in {PATCHED!r} if m in sys.modules)))\n"
    )
    code = (
        "import runpy, sys\n"
        f"module = runpy.run_path({str(ROOT / 'stages' / f'{stage}.py')!r}, run_name='not_main')\n"
        "from qatune import hardware, modeling\n"
        "hardware.probe()\n"
        "modeling.import_backend('unsloth')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)}
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_unsloth_writes_its_generated_modules_under_the_cache_folder(tmp_path):
    """unsloth_zoo reads UNSLOTH_COMPILE_LOCATION once, at import: import_backend sets it first (not the
    repository root's ./unsloth_compiled_cache), and a location the user chose is kept."""
    fake = tmp_path / "unsloth"
    fake.mkdir()
    (fake / "__init__.py").write_text("import os\nprint(os.environ.get('UNSLOTH_COMPILE_LOCATION'))\n")
    code = "from qatune import modeling\nmodeling.import_backend('unsloth')\n"
    env = {"PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ".cache/unsloth_compiled_cache"
    env["UNSLOTH_COMPILE_LOCATION"] = "/tmp/mine"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.stdout.strip() == "/tmp/mine"
    ignored = (ROOT / ".gitignore").read_text().splitlines() + (ROOT / ".dvcignore").read_text().splitlines()
    assert "/.cache/" in ignored


def test_the_kto_check_before_the_backend_does_not_import_trl():
    """The dpo stage asks whether KTO can train before it imports the backend: the answer comes from
    package metadata, so TRL is still unimported when Unsloth patches it."""
    code = (
        "import json, sys\n"
        "from qatune import compat\n"
        "compat.installed_kto_blocker(False)\n"
        f"print(json.dumps(sorted(m for m in {PATCHED!r} if m in sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
