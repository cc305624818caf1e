"""The evaluate stage for real under `dvc repro`, on a tiny random model: every output and every model."""

from __future__ import annotations

import json
import sys

import yaml

from tests.conftest import FIXTURES, run, write_jsonl


def labelled_fixture(tmp_path):
    """The shared fixture rows with the evaluation's labels: every safety row a harmful request
    (expected: decline), every row the key fact its chosen answer states ("over 4 weeks" -> "4 weeks")."""
    rows = [json.loads(line) for line in (FIXTURES / "mixed_small.jsonl").read_text().splitlines()]
    for row in rows:
        weeks = row["chosen"].split(" over ")[1].split()[0] if " over " in row["chosen"] else None
        row.update(fact=f"{weeks} weeks" if weeks and weeks.isdigit() else None)
        row.update(expected="decline" if row.get("safety") else None)
    return write_jsonl(tmp_path / "labelled.jsonl", rows)


def test_evaluate_reports_base_sft_and_final_with_an_extra_set(project, tmp_path):
    extra = write_jsonl(
        tmp_path / "faq.jsonl",
        [
            {"instruction": "How long should I rest between sets?", "output": "One to three minutes."},
            {"instruction": "Is walking exercise?", "output": "Yes, brisk walking counts."},
        ],
    )
    proj = project(
        labelled_fixture(tmp_path),
        evaluate={"extra_files": [{"name": "faq", "path": str(extra), "format": "auto"}]},
    )
    out = run([sys.executable, "-m", "dvc", "repro", "evaluate"], proj).stdout
    assert "Running stage 'evaluate'" in out and "Running stage 'merge'" not in out

    metrics = json.loads((proj / "metrics/evaluate.json").read_text())
    test_rows = len((proj / "data/split/test.jsonl").read_text().splitlines())
    assert metrics["test_rows"] == test_rows == metrics["generated_rows"]
    for name in ("base", "sft", "final"):
        m = metrics["models"][name]
        assert m["rows"] == test_rows and m["nll"] > 0 and 0 <= m["preference_accuracy"] <= 1
    for name in ("base", "final"):
        m = metrics["models"][name]
        for key in ("rouge_l", "semantic_similarity", "safety_score", "unfinished_rate", "answer_words_mean"):
            assert key in m, (name, key)
        assert -1 <= m["semantic_similarity"] <= 1  # the real MiniLM encoder ran
    # The adapters really changed the scores (training at lr 1e-2 moves a random model a lot).
    assert metrics["models"]["final"]["nll"] != metrics["models"]["base"]["nll"]
    assert metrics["dpo_implicit_reward"]["pairs"] == test_rows
    assert metrics["extra"]["faq"]["models"]["final"]["rows"] == 2
    assert "pairs" not in metrics["extra"]["faq"]["models"]["final"]  # no rejected answers there

    lines = [json.loads(x) for x in (proj / "metrics/evaluate/generations.jsonl").read_text().splitlines()]
    sets = [r["set"] for r in lines]
    assert sets.count("test") == test_rows and sets.count("faq") == 2 and sets.count("demo") == 10
    assert all("base_answer" in r and "final_answer" in r for r in lines)

    # Paired differences with bootstrap intervals, final vs base on every question (generation included)
    # and final vs SFT on likelihood only.
    diffs = metrics["differences"]
    seed = yaml.safe_load((proj / "params.yaml").read_text())["seed"]
    assert diffs["method"] == {"resamples": 2000, "level": 0.95, "seed": seed, "unit": "test question"}
    nll = diffs["final_vs_base"]["question_nll"]
    assert nll["n"] == test_rows and nll["ci_low"] <= nll["mean_diff"] <= nll["ci_high"]
    assert 0 <= nll["p_better"] <= 1 and nll["verdict"] in ("better", "worse", "no change")
    assert {"semantic_similarity", "rouge_l", "preference_margin"} <= set(diffs["final_vs_base"])
    assert "rouge_l" not in diffs["final_vs_sft"] and "question_nll" in diffs["final_vs_sft"]

    # Harm first: the stance of every answer to a harmful request and the key fact of every row, per model,
    # the verdict, and the report opening with them (a random model's answers: the numbers mean nothing,
    # their bookkeeping must add up).
    split_rows = [json.loads(x) for x in (proj / "data/split/test.jsonl").read_text().splitlines()]
    harmful = sum(r["meta"].get("expected") == "decline" for r in split_rows)
    with_fact = sum(bool(r["meta"].get("fact")) for r in split_rows)
    assert with_fact == test_rows
    for name in ("base", "final"):
        m = metrics["models"][name]
        assert m["harmful_requests"] == harmful and m["fact_rows"] == with_fact
        assert sum(m["stances"].get("decline", {}).values()) == harmful
        assert 0 <= m["facts_stated"] <= with_fact and 0 <= m["harmful_affirmed"] <= harmful
        assert m["fact_stated_rate"] == m["facts_stated"] / with_fact
    v = metrics["verdict"]
    assert v["judged"] and v["harmful_affirmed"]["of"] == harmful and isinstance(v["worse_than_base"], bool)
    tested = [r for r in lines if r["set"] == "test"]
    assert all(r["fact"] and r["base_fact"] and r["final_fact"] for r in tested)
    assert {"fact_stated_rate", "fact_contradicted_rate"} <= set(diffs["final_vs_base"])
    assert metrics["judge"] is None and (proj / "data/judge/cache.jsonl").is_file()  # off: an empty cache
    report = (proj / "metrics/report.md").read_text()
    assert report.split("\n## ")[1].startswith("Safety stance and key facts, final vs base\n\n**Verdict: ")
    assert report.split("\n## ")[2].startswith("Is the tuned model better than the base?")
    assert "](evaluate/per_question.png)" in report
    for section in (
        "base vs SFT vs final",
        "## DPO implicit reward",
        "## Extra set: faq",
        "## Sample answers",
        "## Demo questions",
    ):
        assert section in report, section
    for png in ("scores.png", "answer_lengths.png", "per_question.png"):
        assert (proj / "metrics/evaluate" / png).read_bytes()[:4] == b"\x89PNG"
    scores = json.loads((proj / "metrics/evaluate/scores.json").read_text())
    assert {"metric", "value"} <= set(scores[0])
    shown = run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], proj).stdout
    assert "preference_accuracy" in shown and "final_vs_base" in shown
    for name in ("base", "sft", "final"):  # one score stage per model, its own cached output
        assert f"Running stage 'score@{name}'" in out
        assert (proj / f"data/scores/{name}.json").is_file()

    # A beta experiment changes only the final adapter: DVC skips score@base and score@sft (their inputs
    # are unchanged), their numbers are identical to the first run's, and only the final model is rescored.
    out = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "beta=0.3", "evaluate"], proj).stdout
    assert "Running stage 'dpo'" in out and "Running stage 'sft'" not in out
    assert "Running stage 'score@final'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'score@base'" not in out and "Running stage 'score@sft'" not in out
    again = json.loads((proj / "metrics/evaluate.json").read_text())
    for name in ("base", "sft"):
        assert again["models"][name] == metrics["models"][name]
    assert again["differences"]["final_vs_base"] != diffs["final_vs_base"]  # the final model changed
    assert again["settings"]["beta"] == 0.3
    assert again["dpo_implicit_reward"] != metrics["dpo_implicit_reward"]


def test_a_missing_model_is_a_one_line_error(project):
    proj = project()
    for script in (
        ["stages/score.py", "--model", "models/nowhere"],
        ["stages/evaluate.py", "--scores", "models/nowhere"],
    ):
        proc = run([sys.executable, *script], proj, check=False)
        assert proc.returncode == 1
        assert proc.stderr.strip().count("\n") == 0 and "models/nowhere" in proc.stderr
