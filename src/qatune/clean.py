"""Normalise raw rows to canonical records; every dropped row becomes a reject with its reason.

Pure functions: the stage supplies the rows and a token counter, so tests can run this on
in-memory data with any tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from qatune.errors import QatuneError
from qatune.formats import FORMATS, Record, RowError, dedup_key, detect_format, to_canonical

# Counts the tokens of a chat (list of messages); `generation_prompt` adds the assistant header.
TokenCounter = Callable[[list[dict], bool], int]
DETECT_SAMPLE = 1000  # rows looked at to decide a file's format


@dataclass
class CleanResult:
    kept: list[Record] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    read: int = 0

    def counts(self) -> dict[str, Any]:
        reasons = Counter(r["reason"] for r in self.rejects)
        by_source: dict[str, Counter] = {}
        for r in self.kept:
            by_source.setdefault(r["source"], Counter())["kept"] += 1
        for r in self.rejects:
            by_source.setdefault(r["source"], Counter())["dropped"] += 1
        return {
            "read": self.read,
            "kept": len(self.kept),
            "dropped": len(self.rejects),
            "dropped_by_reason": dict(sorted(reasons.items())),
            "by_source": {
                s: {"kept": c["kept"], "dropped": c["dropped"]} for s, c in sorted(by_source.items())
            },
            "with_rejected": sum(r["rejected"] is not None for r in self.kept),
        }


def choose_format(envelopes: list[dict[str, Any]], override: str, label: str) -> str:
    """The explicit format, or the most common one among the first parseable rows."""
    if override != "auto":
        if override not in FORMATS:
            raise QatuneError(
                f"{label}: unknown format '{override}' (use auto or one of {', '.join(FORMATS)})"
            )
        return override
    seen: Counter[str] = Counter()
    first_line, first_keys = None, None
    for env in envelopes[:DETECT_SAMPLE]:
        rec = env.get("record")
        if not isinstance(rec, dict):
            continue
        fmt = detect_format(rec)
        if fmt:
            seen[fmt] += 1
        elif first_line is None:
            first_line, first_keys = env["line"], sorted(rec)[:12]
    if not seen:
        if first_line is None:
            raise QatuneError(f"{label}: no parseable rows to detect the format from")
        raise QatuneError(
            f"{label}:{first_line}: unknown format, fields {first_keys} match none of "
            f"{', '.join(FORMATS)} (set the source's 'format' to force one)"
        )
    return seen.most_common(1)[0][0]


def record_id(rec: Record) -> str:
    key = "\x1f".join(
        [
            dedup_key(" ".join(t["content"] for t in rec["prompt"])),
            dedup_key(rec["chosen"]),
            dedup_key(rec["rejected"] or ""),
        ]
    )
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]


def _reject(env: dict[str, Any], reason: str, field_name: str | None, detail: str) -> dict[str, Any]:
    out = {
        "source": env["source"],
        "file": env.get("file"),
        "line": env["line"],
        "reason": reason,
        "field": field_name,
        "detail": detail,
    }
    if "record" in env:
        out["record"] = env["record"]  # nothing is lost: the raw row travels with its reason
    return out


def clean_rows(
    envelopes: Iterable[dict[str, Any]],
    formats: dict[str, str],
    count_tokens: TokenCounter,
    max_prompt_length: int,
    max_length: int,
    max_field_chars: int,
) -> CleanResult:
    """Canonicalise, normalise, deduplicate and length-check rows from fetch.

    `formats` maps each source name to its format. Rows are processed in order, so the first of
    several duplicates is the one kept.
    """
    result = CleanResult()
    exact: dict[str, str] = {}
    normalised: dict[str, str] = {}
    for env in envelopes:
        result.read += 1
        if "error" in env:
            reason, _, detail = env["error"].partition(": ")
            result.rejects.append(_reject(env, reason, None, detail or reason))
            continue
        try:
            rec = to_canonical(env["record"], formats[env["source"]], max_field_chars)
        except RowError as err:
            result.rejects.append(_reject(env, err.reason, err.field, err.detail))
            continue
        raw_key = json.dumps(env["record"], sort_keys=True, ensure_ascii=False, default=str)
        if raw_key in exact:
            result.rejects.append(_reject(env, "exact_duplicate", None, f"same row as id {exact[raw_key]}"))
            continue
        rec_id = record_id(rec)
        if rec_id in normalised:
            result.rejects.append(_reject(env, "normalised_duplicate", None, f"same text as id {rec_id}"))
            continue
        prompt_tokens = count_tokens(rec["prompt"], True)
        if prompt_tokens > max_prompt_length:
            result.rejects.append(
                _reject(
                    env,
                    "prompt_too_long",
                    "prompt",
                    f"prompt is {prompt_tokens} tokens (clean.max_prompt_length={max_prompt_length})",
                )
            )
            continue
        answers = [("chosen", rec["chosen"])] + ([("rejected", rec["rejected"])] if rec["rejected"] else [])
        too_long = None
        for name, answer in answers:
            total = count_tokens(rec["prompt"] + [{"role": "assistant", "content": answer}], False)
            if total > max_length:
                too_long = (name, total)
                break
        if too_long:
            result.rejects.append(
                _reject(
                    env,
                    "too_long",
                    too_long[0],
                    f"prompt + {too_long[0]} is {too_long[1]} tokens (clean.max_length={max_length})",
                )
            )
            continue
        exact[raw_key] = rec_id
        normalised[rec_id] = rec_id
        result.kept.append(
            {
                "id": rec_id,
                "prompt": rec["prompt"],
                "chosen": rec["chosen"],
                "rejected": rec["rejected"],
                "source": env["source"],
                "topic": rec["topic"],
                "meta": rec["meta"],
            }
        )
    return result
