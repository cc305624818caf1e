"""`make sweep` on DVC's own queue with DVC's grid syntax (`dvc exp run --queue -S beta=0.2,0.5` + `dvc queue
start`), read back with `dvc exp show`, `make exps` led by the evaluation's measures, and `qatune compare` ranking
the runs; two queued experiments on the tiny profile, stopped at evaluate."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from qatune.compare import MEASURES
from tests.conftest import ROOT, run

ORDER = [key for key, _, _ in MEASURES]


def dvc(proj: Path, *args: str):
    return run([sys.executable, "-m", "dvc", *args], proj)


def experiments(shown: list[dict]) -> dict[str, dict]:
    """`dvc exp show --json` -> {experiment name: its data (params, metrics)}; the baseline is left out."""
    out = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                out[rev["name"]] = rev["data"]
    return out


def make(proj: Path, target: str, args: str) -> subprocess.CompletedProcess:
    """The repository's Makefile run in the scratch project, on this venv, with its setup step emptied."""
    venv = Path(sys.executable).parent
    cmd = [
        "make",
        "-s",
        "-C",
        str(proj),
        "-f",
        str(ROOT / "Makefile"),
        target,
        f"BIN={venv}",
        "STAMP=",
        "LLAMA_CPP_STAMP=",
    ]
    return run([*cmd, f"ARGS={args}"], proj)


def test_queued_beta_sweep_ranked_on_the_evaluation(project):
    """Two queued runs of DVC's grid `-S beta=0.2,0.5` through evaluate: each run's dpo stage trained with its
    own beta, the workspace stays at the baseline, and `make exps` and `qatune compare` show and rank both."""
    # No semantic model: it loads a second model in every evaluation and no measure here reads it.
    proj = project(evaluate={"semantic_model": None})
    dvc(proj, "repro", "evaluate")
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "baseline"], proj)

    queued = make(proj, "sweep", "-S 'beta=0.2,0.5' evaluate").stdout
    assert queued.count("Queued experiment") == 2, queued
    deadline = time.monotonic() + 900  # each reruns dpo and the stages after it
    while time.monotonic() < deadline:
        status = dvc(proj, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") == 2, status
    betas = {}
    for name, data in experiments(json.loads(dvc(proj, "exp", "show", "--json").stdout)).items():
        beta = data["params"]["params.yaml"]["data"]["beta"]
        assert data["metrics"]["metrics/dpo.json"]["data"]["beta"] == beta, (
            name
        )  # what dpo really trained with
        betas[name] = beta
    assert sorted(betas.values()) == [0.2, 0.5]

    # The workspace and params.yaml stay at the baseline; the sweep lives in git refs.
    assert json.loads((proj / "metrics/dpo.json").read_text())["beta"] == 0.1
    names = sorted(betas, key=betas.get)
    diff = json.loads(dvc(proj, "params", "diff", names[0], names[1], "--json").stdout)
    assert (diff["params.yaml"]["beta"]["old"], diff["params.yaml"]["beta"]["new"]) == (0.2, 0.5)

    # `make exps`: Experiment, Created, the final model's measures first, then only the param that changed.
    # The fixture's test split has yes/no questions but no harmful requests or key facts: DVC has a column
    # only for the measures metrics/evaluate.json holds, and the order is compare.MEASURES'.
    table = list(csv.reader(io.StringIO(make(proj, "exps", "--csv").stdout)))
    header = [column.rsplit(":", 1)[-1] for column in table[0]]
    assert header[:2] == ["Experiment", "Created"] and header[-1] == "beta", header
    shown = [h.removeprefix("models.final.") for h in header[2:-1]]
    assert "yes_no_wrong_rate" in shown and shown == [m for m in ORDER if m in shown], header
    assert {row[0] for row in table[1:]} >= set(betas)

    # `qatune compare`: the baseline and both runs, ranked, each measure with final − base [interval].
    out = run([str(Path(sys.executable).parent / "qatune"), "compare", "--repo", str(proj)], proj).stdout
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3 and set(betas) < {r[1] for r in rows}, out
    assert "| beta |" in out and {r[2] for r in rows} == {
        "0.1",
        "0.2",
        "0.5",
    }  # the baseline, then the two runs
    assert all(re.fullmatch(r"[\d.]+ \(\d+/\d+\) \S+ \[\S+, \S+\] \|", r[-1]) for r in rows), out
