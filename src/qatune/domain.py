"""The lists a domain gives in params `domain` (demo questions, referral words): inline in the params, a text
file, or `bundled`, the list qatune ships under src/qatune/data for its bundled dataset.

    domain.demo_questions: ["How do I ...?", ...]        # inline: as given
    domain.demo_questions: profiles/my-questions.txt     # a file: one item a line, `#` comments
    domain.demo_questions: bundled                       # src/qatune/data/demo_questions.txt

A file given by path is read relative to the working directory, like every other path in params.yaml;
a stage that reads one lists it in its dvc.yaml deps.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from qatune.errors import QatuneError


def lines(text: str) -> list[str]:
    """Non-empty lines, stripped, without `#` comment lines."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def word_list(value: list[str] | str, bundled_file: str, key: str) -> list[str]:
    """The list `domain.<key>` gives: inline, `bundled` (src/qatune/data/<bundled_file>), or a file path."""
    if isinstance(value, list):
        items = [v.strip() for v in value if v.strip()]
    elif value == "bundled":
        items = lines((resources.files("qatune") / "data" / bundled_file).read_text(encoding="utf-8"))
    else:
        path = Path(value)
        if not path.is_file():
            raise QatuneError(
                f"domain.{key}: {value}: no such file (give a path, an inline list, or 'bundled')"
            )
        items = lines(path.read_text(encoding="utf-8"))
    if not items:
        raise QatuneError(f"domain.{key}: the list is empty")
    return items
