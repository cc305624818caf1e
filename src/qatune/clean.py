"""Normalise raw rows to canonical records; every dropped row becomes a reject with its reason.

Pure functions: the stage supplies the rows and a token counter, so tests can run this on
in-memory data with any tokenizer.

Every input row is counted once, as kept or as one reject, so kept + dropped == read. Unpaired
preference rows (format `unpaired`, TRL/KTO style: one completion with a true/false label) need the
whole file: a bad completion is paired with a good completion of the same prompt (same
formats.prompt_key) in the same file, in file order, one bad per good. The pair is kept on the good
row's line (chosen = good, rejected = bad); the bad row is written to the rejects file with reason
`merged_into_pair` and the kept pair's line and id, so it is accounted for and nothing is lost. A bad
completion with no good partner left is rejected as `unpaired_bad_completion`, unless the preference
stage runs KTO (`keep_unpaired_bad`, from dpo.method: kto): then it is kept alone, with no `chosen`
(chosen: null, rejected: the completion), for KTOTrainer only. A bad completion is never a `chosen` answer. If only the bad answer keeps a pair out (prompt + rejected too
long), the bad row takes that reject and the good row is tried again alone.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from qatune.errors import QatuneError
from qatune.formats import (
    FORMATS,
    KTO_HINT,
    Record,
    RowError,
    dedup_key,
    detect_format,
    prompt_key,
    to_canonical,
    unpaired_bad_record,
    unpaired_completion,
)

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
            "without_chosen": sum(r["chosen"] is None for r in self.kept),
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
            dedup_key(rec["chosen"] or ""),
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


@dataclass
class Pairing:
    """How clean_rows merges unpaired rows (indices into the envelope list)."""

    partner: dict[int, tuple[int, str]] = field(default_factory=dict)  # good -> (bad, bad completion)
    merged: dict[int, int] = field(default_factory=dict)  # bad -> good
    left_over: dict[int, str] = field(default_factory=dict)  # unpaired bad -> reject detail


def pair_unpaired(envelopes: list[dict[str, Any]], formats: dict[str, str], max_field_chars: int) -> Pairing:
    """Pair each label-false completion with an unused label-true one of the same prompt and file."""
    groups: dict[tuple, tuple[list[tuple[int, str]], list[tuple[int, str]]]] = {}
    for i, env in enumerate(envelopes):
        if formats.get(env.get("source")) != "unpaired" or "record" not in env:
            continue
        try:
            prompt, completion, label = unpaired_completion(env["record"], max_field_chars)
        except RowError:
            continue  # clean_rows rejects it with this reason
        key = (env["source"], env.get("file"), prompt_key(prompt))
        groups.setdefault(key, ([], []))[0 if label else 1].append((i, completion))
    plan = Pairing()
    for goods, bads in groups.values():
        free = list(goods)
        for bad, bad_text in bads:
            good = next((g for g in free if g[1] != bad_text), None)
            if good is None:
                if goods:
                    lines = ", ".join(str(envelopes[g]["line"]) for g, _ in goods)
                    plan.left_over[bad] = (
                        f"label is false (a bad completion); every good completion of its prompt (line {lines}) "
                        f"is already paired with an earlier bad one or has the same text: {KTO_HINT}"
                    )
                continue
            free.remove(good)
            plan.partner[good[0]] = (bad, bad_text)
            plan.merged[bad] = good[0]
    return plan


class _Gate:
    """The checks every candidate row passes, in order: duplicates, then token limits."""

    def __init__(self, count_tokens: TokenCounter, max_prompt_length: int, max_length: int) -> None:
        self.count_tokens = count_tokens
        self.max_prompt_length = max_prompt_length
        self.max_length = max_length
        self.exact: dict[str, str] = {}
        self.normalised: dict[str, str] = {}

    def check(self, rec: Record, raw_key: str) -> tuple[str, str | None, str] | None:
        """(reason, field, detail) if the row must be dropped, else None (and the row is remembered)."""
        if raw_key in self.exact:
            return "exact_duplicate", None, f"same row as id {self.exact[raw_key]}"
        rec_id = record_id(rec)
        if rec_id in self.normalised:
            return "normalised_duplicate", None, f"same text as id {rec_id}"
        prompt_tokens = self.count_tokens(rec["prompt"], True)
        if prompt_tokens > self.max_prompt_length:
            return (
                "prompt_too_long",
                "prompt",
                f"prompt is {prompt_tokens} tokens (clean.max_prompt_length={self.max_prompt_length})",
            )
        answers = [(name, rec[name]) for name in ("chosen", "rejected") if rec[name]]
        for name, answer in answers:
            total = self.count_tokens(rec["prompt"] + [{"role": "assistant", "content": answer}], False)
            if total > self.max_length:
                return (
                    "too_long",
                    name,
                    f"prompt + {name} is {total} tokens (clean.max_length={self.max_length})",
                )
        self.exact[raw_key] = rec_id
        self.normalised[rec_id] = rec_id
        return None


def keep(env: dict[str, Any], rec: Record) -> Record:
    """The canonical row clean writes."""
    return {
        "id": record_id(rec),
        "prompt": rec["prompt"],
        "chosen": rec["chosen"],
        "rejected": rec["rejected"],
        "source": env["source"],
        "topic": rec["topic"],
        "meta": rec["meta"],
    }


def _raw_key(*records: Any) -> str:
    value = records[0] if len(records) == 1 else list(records)
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def clean_rows(
    envelopes: Iterable[dict[str, Any]],
    formats: dict[str, str],
    count_tokens: TokenCounter,
    max_prompt_length: int,
    max_length: int,
    max_field_chars: int,
    keep_unpaired_bad: bool = False,
) -> CleanResult:
    """Canonicalise, normalise, deduplicate and length-check rows from fetch.

    `formats` maps each source name to its format. Rows are processed in order, so the first of
    several duplicates is the one kept; rejects are listed in input order.
    """
    envelopes = list(envelopes)
    plan = pair_unpaired(envelopes, formats, max_field_chars)
    gate = _Gate(count_tokens, max_prompt_length, max_length)
    result = CleanResult(read=len(envelopes))
    rejects: dict[int, dict[str, Any]] = {}
    kept: list[tuple[int, Record]] = []
    kept_late: list[tuple[int, Record]] = []  # bad rows kept alone once their good partner fell out

    def unpaired(env: dict[str, Any]) -> bool:
        return formats.get(env["source"]) == "unpaired"

    for i, env in enumerate(envelopes):
        if "error" in env:
            reason, _, detail = env["error"].partition(": ")
            rejects[i] = _reject(env, reason, None, detail or reason)
            continue
        if i in plan.merged:
            continue  # a bad completion: accounted for below, once its good partner is decided
        try:
            rec = to_canonical(env["record"], formats[env["source"]], max_field_chars)
        except RowError as err:
            if not (keep_unpaired_bad and err.reason == "unpaired_bad_completion" and unpaired(env)):
                rejects[i] = _reject(env, err.reason, err.field, plan.left_over.get(i, err.detail))
                continue
            rec = unpaired_bad_record(env["record"], max_field_chars)  # alone, for KTO
        dropped = None
        if i in plan.partner:
            bad, bad_text = plan.partner[i]
            pair = {**rec, "rejected": bad_text}
            dropped = gate.check(pair, _raw_key(env["record"], envelopes[bad]["record"]))
            if dropped is None:
                rec = pair
                line, rec_id = env["line"], record_id(pair)
                rejects[bad] = _reject(
                    envelopes[bad],
                    "merged_into_pair",
                    "label",
                    f"label is false: kept as the rejected answer of the pair on line {line} (id {rec_id})",
                )
            elif dropped[1] == "rejected":  # only the bad answer is the problem: it takes the reject
                rejects[bad] = _reject(envelopes[bad], *dropped)
                dropped = gate.check(rec, _raw_key(env["record"]))
            else:
                rejects[bad] = _reject(
                    envelopes[bad],
                    "merged_into_pair",
                    "label",
                    f"label is false: merged as the rejected answer into line {env['line']}, "
                    f"whose pair was dropped ({dropped[0]}: {dropped[2]})",
                )
        else:
            dropped = gate.check(rec, _raw_key(env["record"]))
        if dropped:
            rejects[i] = _reject(env, *dropped)
            continue
        kept.append((i, keep(env, rec)))
    for bad, good in plan.merged.items():  # a good row that failed to_canonical leaves its bad alone
        if bad not in rejects and keep_unpaired_bad:
            rec = unpaired_bad_record(envelopes[bad]["record"], max_field_chars)
            dropped = gate.check(rec, _raw_key(envelopes[bad]["record"]))
            if dropped is None:
                kept_late.append((bad, keep(envelopes[bad], rec)))
            else:
                rejects[bad] = _reject(envelopes[bad], *dropped)
        elif bad not in rejects:
            rejects[bad] = _reject(
                envelopes[bad],
                "unpaired_bad_completion",
                "label",
                f"label is false and its good partner on line {envelopes[good]['line']} was dropped: {KTO_HINT}",
            )
    result.kept = [rec for _, rec in sorted(kept + kept_late, key=lambda item: item[0])]
    result.rejects = [rejects[i] for i in sorted(rejects)]
    return result
