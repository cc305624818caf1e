"""The demo questions: questions that are not in the dataset, answered in the evaluation report, used for
merge's and export's checks and offered as examples in the chat app. params `domain.demo_questions` gives
them; `bundled` is the list shipped with the bundled dataset (src/qatune/data/demo_questions.txt)."""

from __future__ import annotations

from qatune.domain import word_list


def demo_questions(limit: int | None = None, questions: list[str] | str = "bundled") -> list[str]:
    """The first `limit` questions of `domain.demo_questions` (inline, a file, or `bundled`)."""
    return word_list(questions, "demo_questions.txt", "demo_questions")[:limit]


def demo_rows(limit: int | None = None, questions: list[str] | str = "bundled") -> list[dict]:
    """The demo questions as canonical prompt-only rows."""
    return [
        {"id": f"demo-{i}", "prompt": [{"role": "user", "content": q}]}
        for i, q in enumerate(demo_questions(limit, questions))
    ]
