"""The shipped demo questions (src/qatune/data/demo_questions.txt): questions that are not in the dataset,
answered in the evaluation report, used for merge's logit check and offered as examples in the chat app."""

from __future__ import annotations

from importlib import resources


def demo_questions(limit: int | None = None) -> list[str]:
    """The shipped questions that are not in the dataset (src/qatune/data/demo_questions.txt)."""
    text = (resources.files("qatune") / "data" / "demo_questions.txt").read_text(encoding="utf-8")
    questions = [q.strip() for q in text.splitlines() if q.strip() and not q.startswith("#")]
    return questions[:limit]


def demo_rows(limit: int | None = None) -> list[dict]:
    """The demo questions as canonical prompt-only rows."""
    return [
        {"id": f"demo-{i}", "prompt": [{"role": "user", "content": q}]}
        for i, q in enumerate(demo_questions(limit))
    ]
