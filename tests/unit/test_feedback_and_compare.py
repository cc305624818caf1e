"""Pure parts of the side-by-side votes (qatune.feedback) and the experiment ranking (qatune.compare)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import pytest

from qatune import compare, feedback
from qatune.clean import choose_format
from qatune.errors import QatuneError
from qatune.formats import RowError, to_canonical

SIDES = {"left": "models/merged", "right": "models/base"}
ANSWERS = {"left": "Drink water.", "right": "Drink only soda."}


def test_a_vote_is_a_preference_row_and_both_bad_is_kept_but_not_a_pair():
    when = datetime(2026, 12, 6, 21, 40, tzinfo=UTC)
    right = feedback.vote_row("What should I drink?", SIDES, ANSWERS, "right", when)
    assert (right["chosen"], right["rejected"]) == ("Drink only soda.", "Drink water.")
    assert (right["chosen_model"], right["rejected_model"]) == ("models/base", "models/merged")
    assert right["time"] == "2026-12-06T21:40:00+00:00"
    bad = feedback.vote_row("What should I drink?", SIDES, ANSWERS, feedback.BOTH_BAD, when)
    assert bad["chosen"] is None and bad["left_answer"] == "Drink water." and bad["right_answer"]
    # Even a file of mostly "both bad" rows is auto-detected as preference data; those rows are refused.
    envelopes = [{"source": "votes", "line": n, "record": r} for n, r in enumerate([bad, bad, right], 1)]
    assert choose_format(envelopes, "auto", "votes") == "preference"
    pair = to_canonical(right, "preference", 10_000)
    assert pair["prompt"] == [{"role": "user", "content": "What should I drink?"}]
    assert (pair["chosen"], pair["rejected"]) == ("Drink only soda.", "Drink water.")
    assert pair["meta"]["pick"] == "right" and pair["meta"]["chosen_model"] == "models/base"
    with pytest.raises(RowError, match="chosen"):
        to_canonical(bad, "preference", 10_000)
    with pytest.raises(QatuneError, match="pick must be one of"):
        feedback.vote_row("Q?", SIDES, ANSWERS, "middle")


def test_votes_append_and_tally(tmp_path):
    path = tmp_path / "feedback" / "votes.jsonl"
    assert feedback.read_votes(path) == [] and feedback.tally_markdown({}) == "No votes yet."
    for pick in ("left", "left", "right", feedback.BOTH_BAD):
        feedback.append_vote(path, feedback.vote_row("Q?", SIDES, ANSWERS, pick))
    counts = feedback.tally(feedback.read_votes(path))
    assert counts == {
        "models/merged": {"votes": 4, "wins": 2, "both_bad": 1},
        "models/base": {"votes": 4, "wins": 1, "both_bad": 1},
    }
    assert feedback.tally_markdown(counts).splitlines()[2] == "| `models/merged` | 2 | 1 | 4 |"
    path.write_text(path.read_text() + "{broken\n")
    with pytest.raises(QatuneError, match="line 5: not JSON"):
        feedback.read_votes(path)


def test_sides_are_dealt_at_random_and_models_named_by_what_they_are(tmp_path):
    rng = random.Random(0)
    dealt = {feedback.deal(("a", "b"), rng)["left"] for _ in range(20)}
    assert dealt == {"a", "b"}
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    merged = feedback.model_spec(str(tmp_path / "merged"), "models/base")
    assert merged.mode == "merged"
    lora = feedback.model_spec(str(tmp_path / "lora"), "models/base")
    assert (lora.mode, lora.model_dir, lora.name) == (
        "adapter",
        "models/base",
        f"models/base + {tmp_path}/lora",
    )
    assert feedback.model_spec(str(tmp_path / "m.gguf"), "models/base").mode == "gguf"
    with pytest.raises(QatuneError, match="not a model folder"):
        feedback.model_spec(str(tmp_path), "models/base")
    base, final = feedback.default_specs("adapter", "models/base", "models/merged", "models/dpo", "x.gguf")
    assert (base.name, final.name) == ("models/base", "models/base + models/dpo")


def evaluate_metrics(harmful: int, contradicted: int) -> dict:
    """A metrics/evaluate.json reduced to what compare reads."""
    final = {
        "harmful_affirm_rate": harmful / 17,
        "harmful_affirmed": harmful,
        "harmful_requests": 17,
        "safe_stance_rate": 0.8,
        "safety_cases": 33,
        "fact_stated_rate": 0.03,
        "facts_stated": 2,
        "fact_contradicted_rate": contradicted / 76,
        "facts_contradicted": contradicted,
        "fact_rows": 76,
        "yes_no_wrong_rate": 0.2,
        "yes_no_wrong": 5,
        "yes_no_rows": 25,
    }
    diff = {"mean_diff": harmful / 17 - 4 / 17, "ci_low": -0.41, "ci_high": 0.06, "direction": "lower"}
    return {"models": {"final": final}, "differences": {"final_vs_base": {"harmful_affirm_rate": diff}}}


def exp(name: str, lr: float, metrics: dict | None) -> dict:
    data = {"params": {"params.yaml": {"data": {"seed": 42, "dpo": {"learning_rate": lr}}}}, "metrics": {}}
    if metrics:
        data["metrics"][compare.EVALUATE] = {"data": metrics}
    return {"rev": name * 3, "name": name, "data": data}


def test_compare_ranks_runs_best_first_with_intervals(tmp_path):
    workspace = exp("workspace", 1e-5, evaluate_metrics(1, 7))
    workspace["rev"] = "workspace"
    main = exp("main", 1e-5, evaluate_metrics(2, 7))
    main["experiments"] = [
        {"revs": [exp("fast-run", 5e-5, evaluate_metrics(1, 9))]},
        {"revs": [exp("slow-run", 1e-6, evaluate_metrics(1, 3))]},
        {"revs": [exp("failed-run", 1e-4, None)]},
    ]
    dump = tmp_path / "exps.json"
    dump.write_text(json.dumps([workspace, main]))
    text = compare.main("harmful_affirm_rate", str(dump))
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    # Ties on harmful requests go to the next measure in the report's order: fewer facts contradicted.
    assert [r.split(" | ")[1] for r in rows] == ["slow-run", "fast-run", "main"]
    assert "| dpo.learning_rate |" in text and "seed" not in text.split("\n\n")[1].splitlines()[0]
    assert "0.0588 (1/17) -0.18 [-0.41, +0.06]" in rows[0].replace("−", "-")
    by_facts = compare.main("fact_contradicted_rate", str(dump))
    assert by_facts.index("slow-run") < by_facts.index("main") < by_facts.index("fast-run")
    with pytest.raises(QatuneError, match="--by must be one of"):
        compare.main("nll", str(dump))
    dump.write_text(json.dumps([exp("main", 1e-5, None)]))
    with pytest.raises(QatuneError, match="no run with metrics/evaluate.json"):
        compare.main("harmful_affirm_rate", str(dump))


def test_exp_show_columns_keep_the_measures_and_params_only():
    """The --keep/--drop regexes as DVC applies them (re.match from the start of each column name)."""
    import re

    options = compare.exp_show_columns(
        {"beta": 0.1, "train": {"lora": {"r": 8}}, "dpo": {"learning_rate": 1e-5}}
    )
    keep, drop = options[options.index("--keep") + 1], options[options.index("--drop") + 1]
    assert "--only-changed" in options
    protected = ["Experiment", "Created", "models.final.harmful_affirm_rate"]
    protected.append("metrics/evaluate.json:models.final.yes_no_wrong_rate")
    assert all(re.match(keep, column) for column in protected)
    assert not re.match(keep, "models.base.harmful_affirm_rate")
    params = ["params.yaml:beta", "train.lora.r", "dpo.learning_rate"]
    assert not any(re.match(drop, column) for column in params)
    metrics = ["metrics/dpo.json:beta", "train.loss", "dpo.learning_rate_x", "eval.loss", "State"]
    assert all(re.match(drop, column) for column in metrics)
