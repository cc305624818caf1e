"""The report on hand-made score files: it opens with the paired comparison, and its sample answers are the
ones that changed most, each labelled better or worse by the measure that picked it."""

from __future__ import annotations

import copy
import re

import pytest

from qatune import report
from qatune.errors import QatuneError

N = 12  # questions


def score_docs() -> dict[str, dict]:
    """Three models on N questions. Final: NLL 0.5 nats/token lower than base on every question, the same
    answers as base (so ROUGE-L cannot change), and a similarity to the reference that rises on q0 (+0.4)
    and q1 (+0.1), falls on q2 (-0.3) and is unchanged elsewhere."""
    rows = [
        {
            "id": f"q{i}",
            "topic": "t",
            "meta": {"safety": i == 0},
            "prompt": [{"role": "user", "content": f"Question {i}?"}],
            "chosen": f"Reference answer {i}, see a doctor.",
            "rejected": "No.",
        }
        for i in range(N)
    ]

    def part(nll: float, similarity: list[float] | None) -> dict:
        out = {
            "rows": copy.deepcopy(rows),
            "scores": [
                {
                    "chosen_logp": -nll * (10 + i),
                    "chosen_tokens": 10 + i,
                    "rejected_logp": -3.0 * (i + 1),
                    "rejected_tokens": i + 1,
                }
                for i in range(N)
            ],
        }
        if similarity is not None:
            out.update(
                answers=[f"Answer {i}." for i in range(N)],
                finished=[True] * N,
                similarity=similarity,
                similarity_rejected=[0.3] * N,
            )
        return out

    base_similarity = [0.5] * N
    final_similarity = [0.9, 0.6, 0.2] + [0.5] * (N - 3)
    settings = {"max_new_tokens": 8}
    return {
        "base": {"sets": {"test": part(3.0, base_similarity)}, "settings": settings},
        "sft": {"sets": {"test": part(2.6, None)}, "settings": settings},
        "final": {"sets": {"test": part(2.5, final_similarity)}, "settings": settings},
    }


def build(docs: dict[str, dict], samples: int = 4) -> tuple[dict, str]:
    metrics, records, demos = report.evaluation(docs, beta=0.1)
    metrics["differences"] = report.differences(report.paired_questions(docs), seed=42)
    return metrics, report.render_report(metrics, records, demos, samples, plot_dir="evaluate")


def test_the_report_opens_with_the_paired_comparison():
    metrics, text = build(score_docs())
    headings = re.findall(r"^## .*$", text, flags=re.MULTILINE)
    assert headings[0] == "## Is the tuned model better than the base?"
    assert headings.index("## Test split: base vs SFT vs final") > 0
    opening = text[: text.index("## Test split")]
    assert "](evaluate/per_question.png)" in opening
    # NLL 0.5 lower on every question: better, with an interval that is exactly that difference.
    nll = metrics["differences"]["final_vs_base"]["question_nll"]
    assert nll["verdict"] == "better" and nll["mean_diff"] == pytest.approx(-0.5) and nll["n"] == N
    assert "  - answer NLL per question (nats/token, reference answers): -0.500 [-0.500, -0.500]" in opening
    # The same answers: ROUGE-L cannot tell base from final, and the report says so plainly.
    rouge = metrics["differences"]["final_vs_base"]["rouge_l"]
    assert (rouge["ci_low"], rouge["ci_high"], rouge["verdict"]) == (0.0, 0.0, "no change")
    no_change = opening.split(f"- Not distinguishable from no change on {N} questions")[1].split("\n- ")[0]
    assert "ROUGE-L F1 vs reference: 0 [0, 0]" in no_change
    # Only one safety case: its measure says on how many questions it stands.
    assert "safety cases referred to a professional: 0 [0, 0] (on 1 question)" in opening
    # Final vs SFT compares likelihood only (SFT answers nothing).
    assert set(metrics["differences"]["final_vs_sft"]) == {
        "question_nll",
        "preference_margin",
        "preference_accuracy",
    }
    assert "**Final vs SFT: better on 2 of 3 measures, worse on none**" in opening
    assert "No interval for the corpus answer NLL and perplexity" in opening


def test_the_report_names_the_split_it_read():
    docs = score_docs()
    for doc in docs.values():
        doc["settings"] = {**doc["settings"], "split": "val"}  # a profile without a test split (seed 004)
    _, text = build(docs)
    assert "## Val split: base vs SFT vs final" in text and "## Test split" not in text
    assert f"on the {N} held-out val questions" in text and "bootstrap over the val questions" in text
    assert "test questions" not in text


def test_sample_answers_are_the_largest_gains_then_losses_labelled_with_the_change():
    _, text = build(score_docs(), samples=4)
    samples = text[text.index("## Sample answers") : text.index("## Cost")]
    headings = re.findall(r"^### .*$", samples, flags=re.MULTILINE)
    # Two gains, but only one answer got worse and unchanged ones are neither: three samples, not four.
    assert headings == [
        "### Better (+0.4): Question 0?",
        "### Better (+0.1): Question 1?",
        "### Worse (-0.3): Question 2?",
    ]
    assert "similarity to the reference answer (MiniLM cosine): base 0.5 → final 0.2*" in samples


def test_pick_changes_splits_n_between_gains_and_losses():
    records = [{"base_x": 0.0, "final_x": d} for d in (0.3, -0.1, 0.0, 0.2, -0.5, 0.1)]
    assert report.pick_changes(records, 3, "x") == [
        (0, "better", 0.3),
        (3, "better", 0.2),
        (4, "worse", -0.5),
    ]
    assert report.pick_changes(records, 0, "x") == []
    assert [i for i, _, _ in report.pick_changes(records, 10, "x")] == [0, 3, 5, 4, 1]


def test_differences_refuse_models_that_scored_different_questions():
    docs = score_docs()
    docs["final"]["sets"]["test"]["rows"][3]["id"] = "elsewhere"
    with pytest.raises(QatuneError, match=r"final and base scored different questions") as err:
        report.paired_questions(docs)
    assert "\n" not in str(err.value)


def test_interval_shows_the_digits_the_width_supports():
    assert report.interval({"mean_diff": -0.31612, "ci_low": -0.3331, "ci_high": -0.2987}) == (
        "-0.316 [-0.333, -0.299]"
    )
    assert report.interval({"mean_diff": 0.21, "ci_low": 0.0, "ci_high": 0.474}) == "+0.21 [0, +0.47]"
    assert report.interval({"mean_diff": -0.0046, "ci_low": -0.0105, "ci_high": -0.00034}) == (
        "-0.0046 [-0.0105, -0.0003]"
    )
