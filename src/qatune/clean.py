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

Token limits count what training feeds the model: the chat template and train.system_prompt around
the prompt. An over-long row is cut to fit by default, as the seeds and TRL truncate rather than lose
the row: a prompt loses its earliest turns, then the start of its last user turn (the question stays);
an answer keeps its start. `over_long="drop"` rejects such rows (prompt_too_long, too_long) instead.
Duplicates are checked on the row as read and again as cut.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from qatune.errors import QatuneError
from qatune.formats import (
    FORMATS,
    KTO_HINT,
    Record,
    RowError,
    dedup_key,
    detect_format,
    prompt_key,
    same_words,
    to_canonical,
    unpaired_bad_record,
    unpaired_completion,
)
from qatune.templates import conversation

# Counts the tokens of a chat (list of messages); `generation_prompt` adds the assistant header.
TokenCounter = Callable[[list[dict], bool], int]
DETECT_SAMPLE = 1000  # rows looked at to decide a file's format


@dataclass
class CleanResult:
    kept: list[Record] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    read: int = 0
    truncated: dict[str, int] = field(default_factory=dict)  # kept rows cut to fit: prompt, answer

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
            "truncated": {
                "prompt": self.truncated.get("prompt", 0),
                "answer": self.truncated.get("answer", 0),
            },
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
            good = next((g for g in free if not same_words(g[1], bad_text)), None)
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


Drop = tuple[str, str | None, str]  # (reason, field, detail): why a row goes to the rejects file


class _Cut(Exception):
    """A row that does not fit the token limits (drop mode, or no cut makes it fit)."""

    def __init__(self, reason: str, field_name: str, detail: str) -> None:
        super().__init__(detail)
        self.drop: Drop = (reason, field_name, detail)


@dataclass(frozen=True)
class Limits:
    """Token limits as training sees a row: its prompt behind train.system_prompt (chat.conversation
    adds it unless the row brings its own system turn), rendered by the base model's chat template."""

    count_tokens: TokenCounter
    max_prompt_length: int
    max_length: int
    system_prompt: str | None = None
    over_long: Literal["truncate", "drop"] = "truncate"  # params.CleanParams.over_long

    def prompt_tokens(self, prompt: list[dict]) -> int:
        return self.count_tokens(conversation({"prompt": prompt}, self.system_prompt), True)

    def total_tokens(self, prompt: list[dict], answer: str) -> int:
        chat = [
            *conversation({"prompt": prompt}, self.system_prompt),
            {"role": "assistant", "content": answer},
        ]
        return self.count_tokens(chat, False)


_FIRST_WORD = re.compile(r"^\S*\s+")  # a partial (or first) word and the spaces after it
_LAST_WORD = re.compile(r"\s+\S*$")


def longest_fitting(text: str, fits: Callable[[str], bool], keep_end: bool) -> str:
    """The longest part of `text` that fits, from its end (keep_end) or its start, never splitting a
    word; '' when not even one word fits. A binary search over characters: about log2(len) counts."""
    piece = (lambda n: text[len(text) - n :]) if keep_end else (lambda n: text[:n])
    ok, bad = 0, len(text)  # the empty piece is taken to fit, the whole text is known not to
    while bad - ok > 1:
        mid = (ok + bad) // 2
        ok, bad = (mid, bad) if fits(piece(mid)) else (ok, mid)
    part = piece(ok)
    trim = _FIRST_WORD if keep_end else _LAST_WORD
    whole_word = ok == 0 or text[len(text) - ok - 1 if keep_end else ok].isspace()
    if not whole_word:
        part = trim.sub("", part, count=1)
    part = part.strip()
    while part and not fits(part):  # BPE counts are not quite monotonic in length: recheck, word by word
        shorter = trim.sub("", part, count=1).strip()
        part = shorter if shorter != part else (part[1:] if keep_end else part[:-1])  # one unspaced word
    return part


def _later_turns(prompt: list[dict]) -> list[list[dict]]:
    """Ever shorter prompts, earliest exchanges dropped first, each still opening on a user turn after
    any system turn (the order every chat template accepts) and ending on the last user turn."""
    head = 1 if prompt[0]["role"] == "system" else 0
    starts = [i for i in range(head, len(prompt)) if prompt[i]["role"] == "user"]
    return [prompt[:head] + prompt[i:] for i in starts if i > head]


def fit_prompt(prompt: list[dict], limits: Limits) -> tuple[list[dict], bool]:
    """(the prompt within clean.max_prompt_length, whether it was cut). The last user turn matters
    most: earlier turns go first, then the start of the last turn's text (its end, the question, stays)."""
    tokens = limits.prompt_tokens(prompt)
    if tokens <= limits.max_prompt_length:
        return prompt, False
    detail = f"prompt is {tokens} tokens (clean.max_prompt_length={limits.max_prompt_length})"
    if limits.over_long == "drop":
        raise _Cut("prompt_too_long", "prompt", detail)
    shorter = _later_turns(prompt)
    for candidate in shorter:
        if limits.prompt_tokens(candidate) <= limits.max_prompt_length:
            return candidate, True
    head = (shorter[-1] if shorter else prompt)[:-1]  # any system turn, then the last user turn alone
    last = longest_fitting(
        prompt[-1]["content"],
        lambda text: (
            limits.prompt_tokens([*head, {"role": "user", "content": text}]) <= limits.max_prompt_length
        ),
        keep_end=True,
    )
    if not last:
        raise _Cut(
            "prompt_too_long",
            "prompt",
            f"{detail}; not one word of the last user turn fits beside the system prompt",
        )
    return [*head, {"role": "user", "content": last}], True


def fit_answer(prompt: list[dict], answer: str, name: str, limits: Limits) -> tuple[str, bool]:
    """(the answer within clean.max_length with its prompt, whether it was cut): its start stays, as
    TRL's keep_start truncation keeps it."""
    total = limits.total_tokens(prompt, answer)
    if total <= limits.max_length:
        return answer, False
    detail = f"prompt + {name} is {total} tokens (clean.max_length={limits.max_length})"
    if limits.over_long == "drop":
        raise _Cut("too_long", name, detail)
    cut = longest_fitting(
        answer, lambda text: limits.total_tokens(prompt, text) <= limits.max_length, keep_end=False
    )
    if not cut:
        raise _Cut("too_long", name, f"{detail}; not one word of it fits after the prompt")
    return cut, True


def fit(rec: Record, limits: Limits) -> tuple[Record, set[str]]:
    """The row within the token limits and what was cut ({"prompt", "answer"}); raises _Cut."""
    prompt, prompt_cut = fit_prompt(rec["prompt"], limits)
    out, cut = {**rec, "prompt": prompt}, {"prompt"} if prompt_cut else set()
    for name in ("chosen", "rejected"):
        if rec[name]:
            out[name], answer_cut = fit_answer(prompt, rec[name], name, limits)
            cut |= {"answer"} if answer_cut else set()
    if out["chosen"] and out["rejected"] and same_words(out["chosen"], out["rejected"]):
        raise _Cut(
            "chosen_equals_rejected",
            "rejected",
            f"chosen and rejected are the same text once cut to clean.max_length={limits.max_length} tokens",
        )
    return out, cut


class _Gate:
    """The checks every candidate row passes, in order: duplicates, then token limits (cut or drop),
    then duplicates again on the cut row, so that no two kept rows share an id."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.exact: dict[str, str] = {}
        self.normalised: dict[str, str] = {}  # id of a row as read, or as cut -> id of the row kept
        self.truncated: Counter[str] = Counter()  # kept rows whose prompt / an answer was cut

    def check(self, rec: Record, raw_key: str) -> tuple[Record, Drop | None]:
        """(the row to keep, None), or (the row, why it must be dropped); a kept row is remembered."""
        if raw_key in self.exact:
            return rec, ("exact_duplicate", None, f"same row as id {self.exact[raw_key]}")
        rec_id = record_id(rec)
        if rec_id in self.normalised:
            return rec, ("normalised_duplicate", None, f"same text as id {self.normalised[rec_id]}")
        try:
            fitted, cut = fit(rec, self.limits)
        except _Cut as err:
            return rec, err.drop
        kept_id = record_id(fitted)
        if kept_id in self.normalised:
            return rec, (
                "normalised_duplicate",
                None,
                f"same text as id {kept_id} once cut to the token limits",
            )
        self.exact[raw_key] = self.normalised[rec_id] = self.normalised[kept_id] = kept_id
        self.truncated.update(cut)
        return fitted, None


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
    system_prompt: str | None = None,
    over_long: Literal["truncate", "drop"] = "truncate",
) -> CleanResult:
    """Canonicalise, normalise, deduplicate and fit rows from fetch to the token limits.

    `formats` maps each source name to its format. Rows are processed in order, so the first of
    several duplicates is the one kept; rejects are listed in input order. Token counts include
    `system_prompt` (train.system_prompt), which training puts before every prompt without its own;
    `over_long` "truncate" cuts a row to fit (see fit), "drop" rejects it.
    """
    envelopes = list(envelopes)
    plan = pair_unpaired(envelopes, formats, max_field_chars)
    gate = _Gate(Limits(count_tokens, max_prompt_length, max_length, system_prompt, over_long))
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
            pair, dropped = gate.check(
                {**rec, "rejected": bad_text}, _raw_key(env["record"], envelopes[bad]["record"])
            )
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
                rec, dropped = gate.check(rec, _raw_key(env["record"]))
            else:
                rejects[bad] = _reject(
                    envelopes[bad],
                    "merged_into_pair",
                    "label",
                    f"label is false: merged as the rejected answer into line {env['line']}, "
                    f"whose pair was dropped ({dropped[0]}: {dropped[2]})",
                )
        else:
            rec, dropped = gate.check(rec, _raw_key(env["record"]))
        if dropped:
            rejects[i] = _reject(env, *dropped)
            continue
        kept.append((i, keep(env, rec)))
    for bad, good in plan.merged.items():  # a good row that failed to_canonical leaves its bad alone
        if bad not in rejects and keep_unpaired_bad:
            rec = unpaired_bad_record(envelopes[bad]["record"], max_field_chars)
            rec, dropped = gate.check(rec, _raw_key(envelopes[bad]["record"]))
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
    result.truncated = {what: gate.truncated[what] for what in ("prompt", "answer")}
    return result
