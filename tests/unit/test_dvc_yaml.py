"""dvc.yaml stays honest: each stage's deps are exactly the code it can run (the transitive import closure
of its script inside src/qatune, lazy imports in functions included) plus its data inputs, and its params
are exactly the params fields that code reads. A missing dep would let the DVC cache skip a needed rerun;
an extra one reruns a stage for nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from qatune.params import Params

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "qatune"
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def stages() -> dict[str, dict]:
    """Every stage, `foreach` ones expanded into name@key with ${key} and ${item.*} substituted."""
    out = {}
    for name, stage in DVC["stages"].items():
        if "foreach" not in stage:
            out[name] = stage
            continue
        for key, item in stage["foreach"].items():
            text = yaml.safe_dump(stage["do"]).replace("${key}", key)
            for field, value in item.items():
                text = text.replace("${item." + field + "}", str(value))
            out[f"{name}@{key}"] = yaml.safe_load(text)
    return out


def imported_modules(path: Path) -> set[Path]:
    """qatune modules a file imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qatune":
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "qatune"]
        for name in names:
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # a package's __init__ runs on any import from it
                base = ROOT / "src" / Path(*parts[:depth])
                for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                    if candidate.is_file():
                        found.add(candidate)
    return found


def closure(script: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = imported_modules(script)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo |= imported_modules(module) - seen
    return seen


def package_data(modules: set[Path]) -> set[Path]:
    """Files under src/qatune/data that the modules name (read through importlib.resources)."""
    text = "\n".join(m.read_text(encoding="utf-8") for m in modules)
    return {f for f in (PACKAGE / "data").iterdir() if f.is_file() and f'"{f.name}"' in text}


def chain(node: ast.AST) -> list[str] | None:
    """['train', 'system_prompt'] for `params.train.system_prompt` (or `x.params.train...`), else None."""
    names = []
    while isinstance(node, ast.Attribute):
        if node.attr == "params":
            return names[::-1]
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "params":
        return names[::-1]
    return None


def params_read(files: set[Path]) -> set[str]:
    """The params fields the code reads, as dvc.yaml spells them ('train', 'train.system_prompt')."""
    blocks = Params.model_fields
    read: set[str] = set()
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            names = chain(node)
            if not names or isinstance(parents.get(node), ast.Attribute):
                continue  # only the longest chain counts
            if names == ["model_dump"]:
                call = parents.get(node)
                for kw in getattr(call, "keywords", []):
                    if kw.arg == "include":
                        read |= {ast.literal_eval(e) for e in kw.value.elts}
                continue
            if names[0] not in blocks:
                continue
            sub = getattr(blocks[names[0]].annotation, "model_fields", {})
            read.add(".".join(names[:2]) if len(names) > 1 and names[1] in sub else names[0])
    for block, spec in blocks.items():  # every field of a block read one by one = the block
        fields = getattr(spec.annotation, "model_fields", None)
        if fields and {f"{block}.{f}" for f in fields} <= read:
            read = {k for k in read if not k.startswith(block + ".")} | {block}
    return {k for k in read if not any(k.startswith(other + ".") for other in read)}


def stage_code(stage: dict) -> tuple[Path, set[Path]]:
    script = ROOT / stage["cmd"].split()[1]
    return script, closure(script)


STAGES = stages()


def code_mismatch(stage: dict) -> tuple[set[str], set[str]]:
    """(imported but not listed, listed but not imported), as paths relative to the project root."""
    script, modules = stage_code(stage)
    deps = {ROOT / d for d in stage.get("deps", [])}
    expected = {script} | modules | package_data(modules)
    listed = {d for d in deps if d.suffix == ".py" or d.parent == PACKAGE / "data"}
    rel = lambda paths: {str(p.relative_to(ROOT)) for p in paths}  # noqa: E731
    return rel(expected - listed), rel(listed - expected)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_deps_are_the_import_closure_plus_data(name):
    missing, extra = code_mismatch(STAGES[name])
    assert not missing and not extra, f"{name}: missing deps {sorted(missing)}, not imported {sorted(extra)}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_params_are_exactly_what_the_code_reads(name):
    stage = STAGES[name]
    script, modules = stage_code(stage)
    declared = set(stage.get("params", []))
    read = params_read({script} | modules)
    assert declared == read, (
        f"{name}: declared but not read {sorted(declared - read)}, read but not declared {sorted(read - declared)}"
    )


def test_the_checker_catches_a_removed_dep():
    """Drop a module the sft stage imports, or a data file the score stage reads, and the check names it."""
    sft = dict(STAGES["sft"])
    sft["deps"] = [d for d in sft["deps"] if d != "src/qatune/lm_head.py"]
    assert code_mismatch(sft) == ({"src/qatune/lm_head.py"}, set())
    score = dict(STAGES["score@final"])
    score["deps"] = [d for d in score["deps"] if d != "src/qatune/data/demo_questions.txt"]
    assert code_mismatch(score) == ({"src/qatune/data/demo_questions.txt"}, set())


def test_every_stage_follows_the_params_check():
    """check-params depends on the whole of params.yaml and every other stage descends from it."""
    check = STAGES["check-params"]
    assert "params.yaml" in check["deps"]
    out = check["outs"][0] if "outs" in check else next(iter(check["metrics"][0]))
    assert out in STAGES["fetch"]["deps"]


if __name__ == "__main__":  # print each stage's closure and params, to write dvc.yaml from
    for n, st in STAGES.items():
        s, m = stage_code(st)
        print(n, sorted(str(p.relative_to(ROOT)) for p in m), sorted(params_read({s} | m)))
