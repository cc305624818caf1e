"""`make sweep` on DVC's own queue with DVC's grid syntax, `make exps` led by the evaluation's measures, and
`qatune compare` ranking the runs; two queued experiments on the tiny profile, stopped at evaluate."""

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
from tests.e2e.test_experiments import dvc, experiments

ORDER = [key for key, _, _ in MEASURES]


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


def test_queued_learning_rate_sweep_ranked_on_the_evaluation(project):
    # No semantic model: it loads a second model in every evaluation and no measure here reads it.
    proj = project(evaluate={"semantic_model": None})
    dvc(proj, "repro", "evaluate")
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "baseline"], proj)

    queued = make(proj, "sweep", "-S 'dpo.learning_rate=1e-2,1e-3' evaluate").stdout
    assert queued.count("Queued experiment") == 2, queued
    deadline = time.monotonic() + 900  # each reruns fetch, sft, dpo, score@final and evaluate
    while time.monotonic() < deadline:
        status = dvc(proj, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") == 2, status
    rates = {
        name: data["params"]["params.yaml"]["data"]["dpo"]["learning_rate"]
        for name, data in experiments(json.loads(dvc(proj, "exp", "show", "--json").stdout)).items()
    }
    assert sorted(rates.values()) == [1e-3, 1e-2]

    # `make exps`: Experiment, Created, the final model's measures first, then only the param that changed.
    # The fixture's test split has yes/no questions but no harmful requests or key facts: DVC has a column
    # only for the measures metrics/evaluate.json holds, and the order is compare.MEASURES'.
    table = list(csv.reader(io.StringIO(make(proj, "exps", "--csv").stdout)))
    header = [column.rsplit(":", 1)[-1] for column in table[0]]
    assert header[:2] == ["Experiment", "Created"] and header[-1] == "dpo.learning_rate", header
    shown = [h.removeprefix("models.final.") for h in header[2:-1]]
    assert "yes_no_wrong_rate" in shown and shown == [m for m in ORDER if m in shown], header
    assert {row[0] for row in table[1:]} >= set(rates)

    # `qatune compare`: the baseline and both runs, ranked, each measure with final − base [interval].
    out = run([str(Path(sys.executable).parent / "qatune"), "compare", "--repo", str(proj)], proj).stdout
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3 and set(rates) < {r[1] for r in rows}, out
    assert "| dpo.learning_rate |" in out and {r[2] for r in rows} == {"0.01", "0.001"}
    assert all(re.fullmatch(r"[\d.]+ \(\d+/\d+\) \S+ \[\S+, \S+\] \|", r[-1]) for r in rows), out
