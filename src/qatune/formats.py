"""Adapters from every data format the seed systems use to one canonical record.

Canonical record (what data/clean/*.jsonl holds):
    {"id": str, "prompt": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "chosen": str, "rejected": str | None, "source": str, "topic": str | None, "meta": {...}}

`prompt` always ends with a user turn; `chosen` is the assistant reply to learn, `rejected` the
worse one (None for plain QA data). Formats:

    qa          question / answer (any capitalisation)                       seed 001
    alpaca      instruction / input / output                                 seed 003
    sharegpt    conversations: [{from: human|gpt|system, value}]            seed 004 (FineTome)
    messages    messages: [{role, content}] (OpenAI style)
    preference  prompt|question / chosen / rejected (TRL style, str or messages) seed 000
    response_jk question / response_j / response_k (j is chosen)             seed 002
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

Record = dict[str, Any]


class RowError(ValueError):
    """One row cannot be used; `reason` is a stable key for metrics, `field` names the culprit."""

    def __init__(self, reason: str, field: str | None, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.field = field
        self.detail = detail


# ShareGPT speaker names, mapped as unsloth's standardize_sharegpt maps them.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}
_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[^\S\n]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_NOT_WORD = re.compile(r"[\W_]+")


def normalise_text(text: str) -> str:
    """NFC, no control or zero-width characters, single spaces, at most one blank line, stripped."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", _ZERO_WIDTH.sub("", text))
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def dedup_key(text: str) -> str:
    """Case-, punctuation- and spacing-insensitive form used for duplicate detection and splitting."""
    return " ".join(_NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split())


def _keys(rec: Mapping[str, Any]) -> dict[str, str]:
    return {k.lower(): k for k in rec if isinstance(k, str)}


def _field(rec: Mapping[str, Any], name: str, *, required: bool = True) -> Any:
    key = _keys(rec).get(name)
    if key is None:
        if required:
            raise RowError("missing_field", name, f"missing field '{name}'")
        return None
    return rec[key]


def _text(rec: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
    value = _field(rec, name, required=required)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise RowError("wrong_type", name, f"field '{name}': expected a string, got {type(value).__name__}")
    return value


def _messages(
    value: Any, field: str, role_key: str, content_key: str, roles: Mapping[str, str]
) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError("wrong_type", field, f"field '{field}': expected a non-empty list of turns")
    out = []
    for i, turn in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(turn, Mapping):
            raise RowError("wrong_type", where, f"field '{where}': expected an object")
        role = _field(turn, role_key)
        content = _field(turn, content_key)
        if not isinstance(role, str) or role.lower() not in roles:
            raise RowError(
                "bad_conversation",
                f"{where}.{role_key}",
                f"field '{where}.{role_key}': unknown role {role!r}",
            )
        if not isinstance(content, str):
            raise RowError(
                "wrong_type",
                f"{where}.{content_key}",
                f"field '{where}.{content_key}': expected a string, got {type(content).__name__}",
            )
        out.append({"role": roles[role.lower()], "content": content})
    return out


def _split_conversation(turns: list[dict], field: str) -> tuple[list[dict], str]:
    if turns[-1]["role"] != "assistant":
        raise RowError("bad_conversation", field, f"field '{field}': the last turn must be the assistant's")
    prompt = turns[:-1]
    if not any(t["role"] == "user" for t in prompt):
        raise RowError("bad_conversation", field, f"field '{field}': no user turn before the last answer")
    return prompt, turns[-1]["content"]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _prompt_or_question(rec: Mapping[str, Any]) -> list[dict]:
    name = "prompt" if "prompt" in _keys(rec) else "question"
    value = _field(rec, name)
    if isinstance(value, list):
        prompt = _messages(value, name, "role", "content", {r: r for r in ("system", "user", "assistant")})
        if prompt[-1]["role"] != "user":
            raise RowError("bad_conversation", name, f"field '{name}': the prompt must end with a user turn")
        return prompt
    return _user(_text(rec, name))


def _answer(rec: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
    value = _field(rec, name, required=required)
    if value is None and not required:
        return None
    if isinstance(value, list):  # TRL conversational preference data: the answer as a list of turns
        turns = _messages(value, name, "role", "content", {r: r for r in ("system", "user", "assistant")})
        if turns[-1]["role"] != "assistant":
            raise RowError("bad_conversation", name, f"field '{name}': the last turn must be the assistant's")
        return turns[-1]["content"]
    return _text(rec, name)


def from_qa(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    return _user(_text(rec, "question")), _text(rec, "answer"), None


def from_alpaca(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    instruction = _text(rec, "instruction")
    extra = _text(rec, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return _user(prompt), _text(rec, "output"), None


def from_sharegpt(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    turns = _messages(_field(rec, "conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    prompt, answer = _split_conversation(turns, "conversations")
    return prompt, answer, None


def from_messages(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    roles = {r: r for r in ("system", "user", "assistant")}
    turns = _messages(_field(rec, "messages"), "messages", "role", "content", roles)
    prompt, answer = _split_conversation(turns, "messages")
    return prompt, answer, None


def from_preference(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    return _prompt_or_question(rec), _answer(rec, "chosen"), _answer(rec, "rejected", required=False)


def from_response_jk(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    return _prompt_or_question(rec), _text(rec, "response_j"), _text(rec, "response_k")


Adapter = Callable[[Mapping[str, Any]], tuple[list[dict], str, str | None]]
FORMATS: dict[str, Adapter] = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "response_jk": from_response_jk,
    "preference": from_preference,
    "qa": from_qa,
}
# Fields consumed by an adapter; anything else small and scalar is kept in `meta`.
_CONSUMED = {
    "messages",
    "conversations",
    "instruction",
    "input",
    "output",
    "question",
    "answer",
    "prompt",
    "chosen",
    "rejected",
    "response_j",
    "response_k",
    "topic",
    "category",
    "id",
    "source",
    "meta",
}


def detect_format(rec: Mapping[str, Any]) -> str | None:
    """The format a record looks like, judged by its field names, or None."""
    keys = set(_keys(rec))
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"response_j", "response_k"} <= keys:
        return "response_jk"
    if "chosen" in keys and keys & {"prompt", "question"}:
        return "preference"
    if {"question", "answer"} <= keys:
        return "qa"
    return None


def _meta(rec: Mapping[str, Any]) -> dict[str, Any]:
    meta = dict(rec["meta"]) if isinstance(rec.get("meta"), Mapping) else {}
    for key, value in rec.items():
        if (
            key.lower() not in _CONSUMED
            and isinstance(value, str | int | float | bool)
            and len(str(value)) <= 200
        ):
            meta[key] = value
    return meta


def to_canonical(rec: Any, fmt: str, max_field_chars: int) -> Record:
    """Convert one raw record; raises RowError naming the field when it cannot be used."""
    if not isinstance(rec, Mapping):
        raise RowError("not_an_object", None, f"expected a JSON object, got {type(rec).__name__}")
    for key, value in rec.items():
        if isinstance(value, str) and len(value) > max_field_chars:
            raise RowError(
                "field_too_long",
                str(key),
                f"field '{key}': {len(value)} characters (limit clean.max_field_chars={max_field_chars})",
            )
    prompt, chosen, rejected = FORMATS[fmt](rec)
    prompt = [{"role": t["role"], "content": normalise_text(t["content"])} for t in prompt]
    for i, turn in enumerate(prompt):
        if not turn["content"]:
            raise RowError("empty_field", f"prompt[{i}]", f"field 'prompt[{i}]' is empty")
    chosen = normalise_text(chosen)
    if not chosen:
        raise RowError("empty_field", "chosen", "the answer (chosen) is empty")
    if rejected is not None:
        rejected = normalise_text(rejected)
        if not rejected:
            raise RowError("empty_field", "rejected", "the rejected answer is empty")
        if rejected == chosen:
            raise RowError("chosen_equals_rejected", "rejected", "chosen and rejected are the same text")
    topic = _field(rec, "topic", required=False) or _field(rec, "category", required=False)
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "topic": normalise_text(topic) if isinstance(topic, str) and topic.strip() else None,
        "meta": _meta(rec),
    }


def question_text(prompt: list[dict]) -> str:
    """The user's side of a prompt, the unit that must never straddle two splits."""
    return "\n".join(t["content"] for t in prompt if t["role"] == "user")
