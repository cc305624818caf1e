"""`dvc repro` of the data stages on a tiny profile: the DAG, caching and experiments for real."""

import json
import sys

from tests.conftest import run


def dvc(proj, *args):
    return run([sys.executable, "-m", "dvc", *args], proj)


def test_dvc_repro_split_dag_and_rerun(project):
    proj = project()
    out = dvc(proj, "repro", "split").stdout
    for name in ("fetch", "clean", "split"):
        assert f"Running stage '{name}'" in out
    assert (proj / "data/split/train.jsonl").is_file()
    lock = (proj / "dvc.lock").read_text()
    assert "models/base" in lock and "data/split" in lock
    dag = dvc(proj, "dag", "--dot").stdout
    assert '"fetch" -> "clean"' in dag and '"clean" -> "split"' in dag
    assert "Running stage" not in dvc(proj, "repro", "split").stdout  # nothing changed, nothing reruns

    # A split param reruns split only; fetch and clean stay cached.
    out = dvc(proj, "exp", "run", "-S", "split.test=0.2", "split").stdout
    assert "Running stage 'split'" in out and "Running stage 'fetch'" not in out
    assert json.loads((proj / "metrics/split.json").read_text())["rows"]["test"] == 6


STAGES = (
    "check-params",
    "fetch",
    "clean",
    "split",
    "sft",
    "dpo",
    "score@base",
    "score@sft",
    "score@final",
    "evaluate",
    "merge",
    "export",
    "push-to-hub",
)


def test_full_repro_then_beta_experiment_reruns_only_dpo_and_after(project):
    proj = project()
    out = dvc(proj, "repro").stdout
    for name in STAGES:
        assert f"Running stage '{name}'" in out
    assert json.loads((proj / "metrics/dpo.json").read_text())["beta"] == 0.1
    receipt = json.loads((proj / "metrics/push.json").read_text())  # the dry-run receipt
    # The tiny model's made-up tokenizer is not one llama.cpp's converter knows: export says so in one line,
    # writes no files, and the rest of the pipeline goes on with two releases (tests/stages/test_export.py
    # exports a model with SmolLM2's tokenizer; tests/stages/test_push_to_hub.py releases GGUF files).
    export = json.loads((proj / "metrics/export.json").read_text())
    assert export["files"] == [] and "converter does not support this model" in export["skipped"]
    assert [r["role"] for r in receipt["repos"]] == ["adapter", "merged"]
    assert "no GGUF release" in out
    dag = dvc(proj, "dag", "--dot").stdout
    for edge in (
        '"check-params" -> "fetch"',
        '"dpo" -> "score@final"',
        '"score@final" -> "evaluate"',
        '"dpo" -> "merge"',
        '"merge" -> "export"',
        '"export" -> "push-to-hub"',
        '"evaluate" -> "push-to-hub"',
    ):
        assert edge in dag

    out = dvc(proj, "exp", "run", "-S", "beta=0.2").stdout  # the literal command users run
    for name in ("dpo", "score@final", "evaluate", "merge", "export", "push-to-hub"):
        assert f"Running stage '{name}'" in out
    skipped = ("fetch", "clean", "split", "sft", "score@base", "score@sft")
    assert all(f"Running stage '{s}'" not in out for s in skipped)
    assert json.loads((proj / "metrics/dpo.json").read_text())["beta"] == 0.2
    assert json.loads((proj / "metrics/evaluate.json").read_text())["dpo_implicit_reward"]["beta"] == 0.2
    diff = json.loads(dvc(proj, "params", "diff", "--json").stdout)
    assert (diff["params.yaml"]["beta"]["old"], diff["params.yaml"]["beta"]["new"]) == (0.1, 0.2)


def test_a_misspelled_key_fails_the_experiment_naming_it(project):
    """A typo in `-S` never "succeeds" with nothing changed: DVC refuses a plain `-S bta=0.2`, and a key
    forced in (`-S +bta=0.2`, or typed into params.yaml by hand) fails check-params, naming it."""
    proj = project()
    dvc(proj, "repro", "check-params")
    proc = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "bta=0.2"], proj, check=False)
    assert proc.returncode != 0 and "'bta'" in proc.stdout + proc.stderr
    proc = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "+bta=0.2"], proj, check=False)
    assert proc.returncode != 0
    assert "params.yaml: unknown key 'bta'" in proc.stdout + proc.stderr
    assert "Running stage 'fetch'" not in proc.stdout
