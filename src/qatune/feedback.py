"""Side-by-side votes from `qatune chat --compare`, written as preference rows the fetch stage reads.

Each vote is one JSON line in chat.votes (default data/feedback/votes.jsonl):

    {"prompt": Q, "chosen": the picked answer, "rejected": the other one, "pick": "left"|"right"|"both_bad",
     "chosen_model": ..., "rejected_model": ..., "left_model": ..., "left_answer": ...,
     "right_model": ..., "right_answer": ..., "time": "2026-12-06T21:40:00+00:00"}

`prompt` + `chosen` is the `preference` format that clean auto-detects, so the file added as a `local`
source becomes preference pairs (chosen = picked, rejected = the other). A "both bad" vote keeps both
answers in the file but has `chosen` and `rejected` null: clean rejects that row (reason wrong_type on
`chosen`, listed in data/clean/rejects.jsonl) instead of learning either answer. The small fields (pick,
models, time) travel into each pair's `meta`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qatune.errors import QatuneError

SIDES = ("left", "right")
BOTH_BAD = "both_bad"
PICKS = (*SIDES, BOTH_BAD)


@dataclass(frozen=True)
class ModelSpec:
    """One contestant: what to load and the name shown after the vote (and in the tally)."""

    name: str
    mode: str  # merged (any full model folder), adapter or gguf, as qatune.inference.load_model takes it
    model_dir: str
    adapter_dir: str | None = None


def model_spec(arg: str, base_dir: str) -> ModelSpec:
    """A model from the command line: a .gguf file, a LoRA adapter folder (put on `base_dir`), or a full model
    folder (merged or base). Anything else is a one-line error naming the argument."""
    path = Path(arg)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise QatuneError(f"{arg}: no such GGUF file; run `dvc repro export` first")
        return ModelSpec(arg, "gguf", arg)
    if (path / "adapter_config.json").is_file():
        return ModelSpec(f"{base_dir} + {arg}", "adapter", base_dir, arg)
    if (path / "config.json").is_file():
        return ModelSpec(arg, "merged", arg)
    raise QatuneError(
        f"{arg}: not a model folder (config.json), a LoRA adapter folder (adapter_config.json) or a .gguf file"
    )


def default_specs(
    mode: str, base_dir: str, merged_dir: str, adapter_dir: str, gguf_path: str
) -> tuple[ModelSpec, ModelSpec]:
    """Base vs final: the bare base model, and the final model as generate.mode serves it (loading says which
    stage to run when one is missing)."""
    if mode == "adapter":
        final = ModelSpec(f"{base_dir} + {adapter_dir}", "adapter", base_dir, adapter_dir)
    elif mode == "gguf":
        final = ModelSpec(gguf_path, "gguf", gguf_path)
    else:
        final = ModelSpec(merged_dir, "merged", merged_dir)
    return ModelSpec(base_dir, "merged", base_dir), final


def deal(names: tuple[str, str], rng: random.Random) -> dict[str, str]:
    """Which model answers on which side, drawn afresh for every question: {"left": name, "right": name}."""
    left, right = rng.sample(names, 2)
    return {"left": left, "right": right}


def vote_row(
    question: str, sides: dict[str, str], answers: dict[str, str], pick: str, when: datetime | None = None
) -> dict[str, Any]:
    """The JSON line for one vote; `sides` and `answers` are keyed by "left"/"right"."""
    if pick not in PICKS:
        raise QatuneError(f"vote: pick must be one of {', '.join(PICKS)}, got {pick!r}")
    other = {"left": "right", "right": "left"}.get(pick)
    row: dict[str, Any] = {
        "prompt": question,
        "chosen": answers[pick] if other else None,
        "rejected": answers[other] if other else None,
        "pick": pick,
        "chosen_model": sides[pick] if other else None,
        "rejected_model": sides[other] if other else None,
    }
    for side in SIDES:
        row[f"{side}_model"] = sides[side]
        row[f"{side}_answer"] = answers[side]
    row["time"] = (when or datetime.now(UTC)).isoformat(timespec="seconds")
    return row


def append_vote(path: str | Path, row: dict[str, Any]) -> None:
    """One line appended (folder created); never rewrites earlier votes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_votes(path: str | Path) -> list[dict[str, Any]]:
    """Every vote in the file (none when it does not exist yet); a broken line is a one-line error."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise QatuneError(f"{path}: line {number}: not JSON ({err.msg})") from None
    return rows


def tally(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per model: votes it took part in, votes it won, votes where both answers were bad."""
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        for side in SIDES:
            name = row.get(f"{side}_model")
            if not name:
                continue
            counts = out.setdefault(name, {"votes": 0, "wins": 0, "both_bad": 0})
            counts["votes"] += 1
            counts["wins"] += row.get("pick") == side
            counts["both_bad"] += row.get("pick") == BOTH_BAD
    return out


def tally_markdown(counts: dict[str, dict[str, int]]) -> str:
    """The app's running tally, most wins first."""
    if not counts:
        return "No votes yet."
    lines = ["| model | preferred | both bad | votes |", "|---|---|---|---|"]
    for name, c in sorted(counts.items(), key=lambda item: (-item[1]["wins"], item[0])):
        lines.append(f"| `{name}` | {c['wins']} | {c['both_bad']} | {c['votes']} |")
    return "\n".join(lines)
