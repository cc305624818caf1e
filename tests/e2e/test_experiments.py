"""A queued DVC sweep over beta: `dvc exp run --queue -S beta=...` + `dvc queue start`, read back with `dvc exp show`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.conftest import run


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


def test_queued_beta_sweep_lists_both_runs(project):
    proj = project()
    dvc(proj, "repro", "dpo")
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "baseline"], proj)

    queued = dvc(proj, "exp", "run", "--queue", "-S", "beta=0.2,0.5", "dpo").stdout
    assert queued.count("Queued experiment") == 2
    dvc(proj, "queue", "start")  # one worker; returns at once, the runs go on in the background
    deadline = time.monotonic() + 600  # ~1 min each on an idle 2-core machine
    while time.monotonic() < deadline:
        status = dvc(proj, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    assert status.count("Success") == 2, status

    runs = experiments(json.loads(dvc(proj, "exp", "show", "--json").stdout))
    assert len(runs) == 2, runs.keys()
    betas = {}
    for name, data in runs.items():
        beta = data["params"]["params.yaml"]["data"]["beta"]
        metrics = data["metrics"]["metrics/dpo.json"]["data"]
        assert metrics["beta"] == beta, name  # what the dpo stage really trained with
        betas[name] = beta
    assert sorted(betas.values()) == [0.2, 0.5]

    # The workspace and params.yaml stay at the baseline; the sweep lives in git refs.
    assert json.loads((proj / "metrics/dpo.json").read_text())["beta"] == 0.1
    names = sorted(betas, key=betas.get)
    diff = json.loads(dvc(proj, "params", "diff", names[0], names[1], "--json").stdout)
    assert (diff["params.yaml"]["beta"]["old"], diff["params.yaml"]["beta"]["new"]) == (0.2, 0.5)
