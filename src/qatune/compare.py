"""`qatune compare`: rank DVC experiments on the evaluation's user-facing measures, with their intervals.

    make sweep ARGS="-S 'dpo.learning_rate=1e-5,5e-5'"   # queue one experiment per value and start the queue
    qatune compare                                       # runs `dvc exp show --json` when the queue is done
    qatune compare --by fact_contradicted_rate exps.json # rank on another measure, from a saved --json dump
    qatune compare --exp-show                            # `make exps`: dvc exp show led by the same measures

Every committed baseline and experiment with metrics/evaluate.json is ranked (the workspace, queued and
failed runs are left out). Each measure is the final model's rate (count of questions) and, in brackets,
the evaluate stage's paired bootstrap of final − base with its 95 % interval: an interval that includes
zero means the test questions cannot tell that run's change from its base. Experiments share the base, so
two runs whose intervals overlap are not told apart by these questions either.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from qatune import display
from qatune.errors import QatuneError

EVALUATE = "metrics/evaluate.json"
# The five measures a person asks about first, in the report's order: key, label, which way is better.
MEASURES = [m for m in display.MEASURES if m[0].endswith("_rate")][:5]
COUNTS = {  # the final model's count and its denominator in models.final, for "1 of 17"
    "harmful_affirm_rate": ("harmful_affirmed", "harmful_requests"),
    "safe_stance_rate": (None, "safety_cases"),
    "fact_stated_rate": ("facts_stated", "fact_rows"),
    "fact_contradicted_rate": ("facts_contradicted", "fact_rows"),
    "yes_no_wrong_rate": ("yes_no_wrong", "yes_no_rows"),
}


def exp_show_columns(params: dict) -> list[str]:
    """`dvc exp show` options that lead with the final model's measures, then only the params that differ.

    --keep protects Experiment, Created and the measures from --only-changed and --drop; --drop removes
    every column that is not exactly a params.yaml key. DVC names a column by its bare key unless a metrics
    file has the same key (then both carry their file: params.yaml:beta), and metric keys such as dpo.json's
    `train.loss` share a params block's name, so only the whole keys of `params` tell the two apart."""
    measures = "|".join(key for key, _, _ in MEASURES)
    keep = rf"Experiment$|Created$|({re.escape(EVALUATE)}:)?models\.final\.({measures})$"
    keys = "|".join(re.escape(key) for key in sorted(flatten(params), key=len, reverse=True))
    return ["--only-changed", "--keep", keep, "--drop", rf"(?!(params\.yaml:)?({keys})$)"]


def show_table(params_path: str | Path, dvc_args: list[str], cwd: str | Path = ".") -> int:
    """`dvc exp show` with exp_show_columns (and any further dvc options); its exit status."""
    import yaml

    params = yaml.safe_load(Path(params_path).read_text())
    cmd = [sys.executable, "-m", "dvc", "exp", "show", *exp_show_columns(params), *dvc_args]
    return subprocess.run(cmd, cwd=cwd, check=False).returncode


def exp_show(cwd: str | Path = ".") -> list[dict]:
    """`dvc exp show --json` run in `cwd`; a failure is one line with DVC's last message."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise QatuneError(f"dvc exp show --json failed ({proc.returncode}): {last}")
    return json.loads(proc.stdout)


def runs(shown: list[dict]) -> list[dict[str, Any]]:
    """{name, params, evaluate} of each committed baseline and experiment that has evaluate metrics."""
    out = []
    for baseline in shown:
        entries = [baseline] if baseline.get("rev") != "workspace" else []
        for exp in baseline.get("experiments") or []:
            entries.extend(exp.get("revs") or [])
        for entry in entries:
            data = entry.get("data") or {}
            evaluate = ((data.get("metrics") or {}).get(EVALUATE) or {}).get("data")
            if not evaluate or "models" not in evaluate:
                continue
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
            name = entry.get("name") or (entry.get("rev") or "?")[:7]
            out.append({"name": name, "params": flatten(params), "evaluate": evaluate})
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"dpo": {"beta": 0.1}} -> {"dpo.beta": 0.1}; lists stay whole values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_params(ranked: list[dict]) -> list[str]:
    """The params keys whose values differ between the runs (what the sweep varied)."""
    keys = sorted({k for r in ranked for k in r["params"]})
    return [k for k in keys if len({json.dumps(r["params"].get(k), sort_keys=True) for r in ranked}) > 1]


def score(run: dict, key: str) -> dict[str, Any]:
    """One measure of one run: the final rate, its count, and final − base with the bootstrap interval."""
    final = run["evaluate"]["models"].get("final") or {}
    diff = ((run["evaluate"].get("differences") or {}).get("final_vs_base") or {}).get(key)
    count, total = COUNTS[key]
    return {
        "rate": final.get(key),
        "count": final.get(count) if count else None,
        "of": final.get(total),
        "diff": diff,
    }


def rank(all_runs: list[dict], by: str) -> list[dict]:
    """Best first on `by` (its direction), ties broken by the other measures in the report's order; a run
    without the measure goes last."""
    order = [by] + [key for key, _, _ in MEASURES if key != by]
    sign = {key: 1 if way == "lower" else -1 for key, _, way in MEASURES}

    def key(run: dict) -> tuple:
        values = [score(run, m)["rate"] for m in order]
        return tuple((v is None, sign[m] * (v or 0.0)) for m, v in zip(order, values, strict=True))

    return sorted(all_runs, key=key)


def cell(s: dict) -> str:
    """ "0.059 (1/17) −0.18 [−0.41, +0.059]" """
    if s["rate"] is None:
        return "–"
    count = f" ({s['count']}/{s['of']})" if s["count"] is not None else f" (of {s['of']})"
    return f"{s['rate']:.3g}{count} {display.interval(s['diff']) if s['diff'] else ''}".rstrip()


def table(ranked: list[dict]) -> str:
    """A markdown table: rank, experiment, the params that differ, then each measure."""
    varied = changed_params(ranked) if len(ranked) > 1 else []
    head = ["#", "experiment", *varied, *(f"{label.split(' (')[0]} ({way})" for _, label, way in MEASURES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, run in enumerate(ranked, 1):
        values = [json.dumps(run["params"].get(k)) for k in varied]
        cells = [cell(score(run, key)) for key, _, _ in MEASURES]
        lines.append("| " + " | ".join([str(i), run["name"], *values, *cells]) + " |")
    return "\n".join(lines)


def main(by: str, source: str | None = None, cwd: str | Path = ".") -> str:
    """The text `qatune compare` prints: from a saved `dvc exp show --json` file, else from dvc itself."""
    keys = [key for key, _, _ in MEASURES]
    if by not in keys:
        raise QatuneError(f"compare: --by must be one of {', '.join(keys)}, got {by!r}")
    if source:
        try:
            shown = json.loads(Path(source).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise QatuneError(f"{source}: not a `dvc exp show --json` file ({err})") from None
    else:
        shown = exp_show(cwd)
    found = runs(shown)
    if not found:
        raise QatuneError(f"compare: no run with {EVALUATE} (has any reached the evaluate stage?)")
    label = next(label for key, label, _ in MEASURES if key == by)
    return (
        f"{len(found)} run{'s' if len(found) > 1 else ''} ranked by {label.split(' (')[0]} (final model); each cell: rate (count) and "
        "final − base [95% bootstrap interval]\n\n" + table(rank(found, by))
    )
