"""Adapters from every data format users bring to one canonical record.

Canonical record (what data/clean/*.jsonl holds):
    {"id": str, "prompt": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "chosen": str, "rejected": str | None, "source": str, "topic": str | None, "meta": {...}}

`prompt` always ends with a user turn; `chosen` is the assistant reply to learn, `rejected` the
worse one (None for plain QA data). A multi-turn chat keeps every turn before its last assistant
turn as the prompt and learns that last turn. Formats, in the order `detect_format` tries them
(field names are case-insensitive; docs/formats.md has an example row of each):

    name                 detected by (field names)                        from
    unpaired             prompt + completion + label, or messages +      TRL unpaired preference (KTO)
                         label (label true/false)
    sharegpt_preference  conversations|messages + chosen (+ rejected,    LLaMA-Factory sharegpt preference
                         system); turns end on the user's
    messages             messages: [{role, content}]                      OpenAI chat
    sharegpt             conversations: [{from, value}] (+ system,        seed 004 (FineTome), LLaMA-Factory
                         tools)
    alpaca_preference    instruction + chosen|chosen_response (+ input,   LLaMA-Factory alpaca preference,
                         system, history, rejected|rejected_response)     Axolotl chatml.argilla
    alpaca               instruction + output (+ input, system, history)  seed 003, LLaMA-Factory alpaca
    response_jk          response_j + response_k (j is chosen)            seed 002
    preference           prompt|question + chosen (+ rejected, system;    seed 000, TRL explicit prompt,
                         str or messages)                                 Axolotl chatml.intel
    implicit_preference  chosen + rejected, no prompt: the prompt is      TRL implicit prompt
                         their shared prefix
    qa                   question + answer                                seed 001
    prompt_completion    prompt + completion (str or messages)            TRL prompt-completion
    prompt_only          prompt alone: always rejected (prompt_only)      TRL prompt-only
    text                 text alone: always rejected (no_answer)          TRL language modelling

Reject reasons raised here: missing_field, wrong_type, empty_field, field_too_long, not_an_object,
bad_conversation, chosen_equals_rejected, unsupported_role (tool calls: a tool/function_call/
observation turn, tool_calls on a turn, a non-empty `tools` column), no_shared_prompt,
unpaired_bad_completion (a completion labelled false is never an answer), prompt_only, no_answer.
clean.py adds the file-level ones (duplicates, token limits, merged_into_pair).
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
CHAT_ROLES = {r: r for r in ("system", "user", "assistant")}
# Turns of tool-use data (ShareGPT function_call/observation, OpenAI tool/function): not supported.
TOOL_ROLES = frozenset(
    {"function_call", "observation", "tool", "function", "tool_call", "tool_response", "ipython"}
)
_TOOL_KEYS = ("tool_calls", "function_call")  # an OpenAI assistant turn that calls a tool
_LABEL_TRUE = {"true", "1"}
_LABEL_FALSE = {"false", "0"}
# Zero-width joiners (U+200C/U+200D) stay in the text: Persian words and emoji sequences need them;
# duplicate detection ignores them, as it did when they were removed.
_ZERO_WIDTH = re.compile("[\u200b\u2060\ufeff]")
_JOINERS = re.compile("[\u200c\u200d]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)
_NOT_WORD = re.compile(r"[\W_]+")

KTO_HINT = "only dpo.method: kto trains a bad answer alone (it is never used as an answer)"


def normalise_text(text: str) -> str:
    """The text as written, minus what no reader sees: \\n line endings, no control characters or stray
    zero-width spaces/BOMs, NFC, no spaces at line ends, no blank lines or spaces around the whole.

    Indentation, runs of spaces and tabs, and blank lines inside the text are kept byte for byte: they
    carry the meaning of code (Python), nested markdown lists and tables. Duplicate detection compares
    `dedup_key`, which ignores spacing, so keeping it here makes no duplicate slip through.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", _CONTROL.sub("", _ZERO_WIDTH.sub("", text)))
    return _TRAILING_SPACE.sub("", text).strip()


def dedup_key(text: str) -> str:
    """Case-, punctuation- and spacing-insensitive form used for duplicate detection and splitting."""
    text = unicodedata.normalize("NFKC", _JOINERS.sub("", text)).casefold()
    return " ".join(_NOT_WORD.sub(" ", text).split())


def same_words(a: str, b: str) -> bool:
    """Equal but for spacing: normalise_text keeps spacing, yet a pair that differs only there teaches
    nothing (and was equal when spacing was collapsed)."""
    return a.split() == b.split()


def prompt_key(prompt: list[dict]) -> str:
    """dedup_key of a whole prompt: two rows with the same key ask the same thing."""
    return dedup_key(" ".join(t["content"] for t in prompt))


def _keys(rec: Mapping[str, Any]) -> dict[str, str]:
    """Lower-cased field names (a BOM some tools leave on the first column's name dropped) -> names."""
    return {k.lower().lstrip("\ufeff"): k for k in rec if isinstance(k, str)}


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


def _label(value: Any) -> bool | None:
    """A KTO-style label as a bool: true/false, 1/0 (also as CSV strings); None when it is not one."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _LABEL_TRUE:
            return True
        if text in _LABEL_FALSE:
            return False
    return None


def _empty(value: Any) -> bool:
    return (
        value is None
        or value == []
        or value == {}
        or (isinstance(value, str) and value.strip() in ("", "[]"))
    )


def _unsupported_role(field: str, index: int, role: Any, what: str = "") -> RowError:
    return RowError(
        "unsupported_role",
        field,
        f"field '{field}': turn {index} has role {role!r}{what}: tool calls are not supported",
    )


def _no_tools(rec: Mapping[str, Any]) -> None:
    """A non-empty `tools` (or `functions`) column means tool-use data, which qatune cannot train on."""
    for name in ("tools", "functions"):
        value = _field(rec, name, required=False)
        if not _empty(value):
            raise RowError(
                "unsupported_role",
                name,
                f"field '{name}' lists tools for the assistant to call: tool calls are not supported",
            )


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
        if isinstance(role, str) and role.lower() in TOOL_ROLES:
            raise _unsupported_role(f"{where}.{role_key}", i, role)
        for key in _TOOL_KEYS:
            if not _empty(_field(turn, key, required=False)):
                raise _unsupported_role(f"{where}.{key}", i, role, f" with {key}")
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


def _chat(rec: Mapping[str, Any], name: str) -> list[dict]:
    """A list of turns in either spelling: {role, content} (OpenAI) or {from, value} (ShareGPT)."""
    value = _field(rec, name)
    first = value[0] if isinstance(value, list) and value else None
    if isinstance(first, Mapping) and "from" in _keys(first) and "role" not in _keys(first):
        return _messages(value, name, "from", "value", SHAREGPT_ROLES)
    return _messages(value, name, "role", "content", CHAT_ROLES)


def _split_conversation(turns: list[dict], field: str) -> tuple[list[dict], str]:
    if turns[-1]["role"] != "assistant":
        raise RowError("bad_conversation", field, f"field '{field}': the last turn must be the assistant's")
    prompt = turns[:-1]
    if not any(t["role"] == "user" for t in prompt):
        raise RowError("bad_conversation", field, f"field '{field}': no user turn before the last answer")
    return prompt, turns[-1]["content"]


def _ends_on_user(prompt: list[dict], field: str, what: str) -> list[dict]:
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError("bad_conversation", field, f"field '{field}': {what} must end with a user turn")
    return prompt


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _with_system(prompt: list[dict], rec: Mapping[str, Any]) -> list[dict]:
    """Prepend the `system` column (LLaMA-Factory, Axolotl) unless the turns already open with one."""
    system = _text(rec, "system", required=False)
    if system is None or not system.strip() or prompt[0]["role"] == "system":
        return prompt
    return [{"role": "system", "content": system}, *prompt]


def _history(rec: Mapping[str, Any]) -> list[dict]:
    """LLaMA-Factory alpaca `history`: [[user, assistant], ...], the turns before the instruction."""
    value = _field(rec, "history", required=False)
    if _empty(value):
        return []
    if not isinstance(value, list):
        raise RowError("wrong_type", "history", "field 'history': expected a list of [user, assistant] pairs")
    turns = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise RowError(
                "wrong_type", f"history[{i}]", f"field 'history[{i}]': expected [user, assistant] strings"
            )
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns


def _prompt_or_question(rec: Mapping[str, Any]) -> list[dict]:
    name = "prompt" if "prompt" in _keys(rec) else "question"
    value = _field(rec, name)
    if isinstance(value, list):
        prompt = _messages(value, name, "role", "content", CHAT_ROLES)
        return _ends_on_user(prompt, name, "the prompt")
    return _user(_text(rec, name))


def _answer(rec: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
    value = _field(rec, name, required=required)
    if value is None and not required:
        return None
    if isinstance(value, list):  # TRL conversational preference data: the answer as a list of turns
        turns = _messages(value, name, "role", "content", CHAT_ROLES)
        if turns[-1]["role"] != "assistant":
            raise RowError("bad_conversation", name, f"field '{name}': the last turn must be the assistant's")
        return turns[-1]["content"]
    return _text(rec, name)


def _reply(rec: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
    """One assistant reply: a string or a single turn, {from: gpt, value} or {role: assistant, content}."""
    value = _field(rec, name, required=required)
    if value is None and not required:
        return None
    if isinstance(value, Mapping):
        role_key, content_key = ("from", "value") if "from" in _keys(value) else ("role", "content")
        turn = _messages([value], name, role_key, content_key, SHAREGPT_ROLES)[0]
        if turn["role"] != "assistant":
            raise RowError(
                "bad_conversation",
                f"{name}.{role_key}",
                f"field '{name}': the answer must be the assistant's",
            )
        return turn["content"]
    return _text(rec, name)


def _prompt_and_completion(rec: Mapping[str, Any]) -> tuple[list[dict], str]:
    """TRL prompt/completion, standard (strings) or conversational (lists of turns). A conversational
    completion of several turns is joined to the prompt and split at its last assistant turn."""
    prompt = _prompt_or_question(rec)
    value = _field(rec, "completion")
    if not isinstance(value, list):
        return prompt, _text(rec, "completion")
    turns = _messages(value, "completion", "role", "content", CHAT_ROLES)
    if turns[-1]["role"] != "assistant":
        raise RowError(
            "bad_conversation", "completion", "field 'completion': the last turn must be the assistant's"
        )
    head = prompt + turns[:-1]
    return _ends_on_user(head, "completion", "the turns before the last answer"), turns[-1]["content"]


def from_qa(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    return _user(_text(rec, "question")), _text(rec, "answer"), None


def _alpaca_prompt(rec: Mapping[str, Any]) -> list[dict]:
    instruction = _text(rec, "instruction")
    extra = _text(rec, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return _with_system(_history(rec) + _user(prompt), rec)


def from_alpaca(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    return _alpaca_prompt(rec), _text(rec, "output"), None


def from_alpaca_preference(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    keys = _keys(rec)
    chosen = "chosen_response" if "chosen_response" in keys and "chosen" not in keys else "chosen"
    rejected = "rejected_response" if "rejected_response" in keys and "rejected" not in keys else "rejected"
    return _alpaca_prompt(rec), _answer(rec, chosen), _answer(rec, rejected, required=False)


def from_sharegpt(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    turns = _messages(_field(rec, "conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    _no_tools(rec)
    prompt, answer = _split_conversation(turns, "conversations")
    return _with_system(prompt, rec), answer, None


def from_sharegpt_preference(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    name = "conversations" if "conversations" in _keys(rec) else "messages"
    turns = _chat(rec, name)
    _no_tools(rec)
    prompt = _with_system(_ends_on_user(turns, name, "the conversation (before chosen/rejected)"), rec)
    return prompt, _reply(rec, "chosen"), _reply(rec, "rejected", required=False)


def from_messages(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    turns = _messages(_field(rec, "messages"), "messages", "role", "content", CHAT_ROLES)
    _no_tools(rec)
    prompt, answer = _split_conversation(turns, "messages")
    return prompt, answer, None


def from_preference(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    prompt = _with_system(_prompt_or_question(rec), rec)
    chosen, rejected = _answer(rec, "chosen"), _answer(rec, "rejected", required=False)
    _no_tools(rec)
    return prompt, chosen, rejected


def _shared_text_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's extract_prompt for strings, cut back to a word boundary: (prompt, chosen, rejected)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n < min(len(chosen), len(rejected)) and not chosen[n - 1 : n].isspace():
        n = max(chosen.rfind(c, 0, n) for c in " \n\t") + 1
    return chosen[:n], chosen[n:], rejected[n:]


def from_implicit_preference(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    chosen, rejected = _field(rec, "chosen"), _field(rec, "rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt, good, bad = _shared_text_prefix(chosen, rejected)
        if not prompt.strip():
            raise RowError(
                "no_shared_prompt", "chosen", "chosen and rejected share no leading text to use as the prompt"
            )
        return _user(prompt), good, bad
    if not isinstance(chosen, list):
        raise RowError("wrong_type", "chosen", "field 'chosen': expected a string or a list of turns")
    if not isinstance(rejected, list):
        raise RowError("wrong_type", "rejected", "field 'rejected': expected a list of turns, like 'chosen'")
    good = _messages(chosen, "chosen", "role", "content", CHAT_ROLES)
    bad = _messages(rejected, "rejected", "role", "content", CHAT_ROLES)
    _no_tools(rec)
    n = 0
    while n < min(len(good), len(bad)) and good[n] == bad[n]:
        n += 1
    if n == len(good) == len(bad):
        raise RowError("chosen_equals_rejected", "rejected", "chosen and rejected are the same conversation")
    for name, turns in (("chosen", good), ("rejected", bad)):
        if len(turns) != n + 1 or turns[-1]["role"] != "assistant":
            raise RowError(
                "bad_conversation",
                name,
                f"field '{name}': chosen and rejected must share every turn but the final assistant answer "
                f"(they first differ at turn {n}; '{name}' has {len(turns)} turns)",
            )
    prompt = good[:n]
    if not any(t["role"] == "user" for t in prompt) or prompt[-1]["role"] != "user":
        raise RowError(
            "no_shared_prompt",
            "chosen",
            "the turns chosen and rejected share must include and end on a user turn",
        )
    return prompt, good[-1]["content"], bad[-1]["content"]


def from_response_jk(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    return _prompt_or_question(rec), _text(rec, "response_j"), _text(rec, "response_k")


def from_prompt_completion(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    prompt, completion = _prompt_and_completion(rec)
    _no_tools(rec)
    return prompt, completion, None


def _unpaired_parts(rec: Mapping[str, Any]) -> tuple[list[dict], str, bool]:
    value = _field(rec, "label")
    label = _label(value)
    if label is None:
        raise RowError("wrong_type", "label", f"field 'label': expected true or false, got {value!r}")
    if "messages" in _keys(rec) and "completion" not in _keys(rec):
        turns = _messages(_field(rec, "messages"), "messages", "role", "content", CHAT_ROLES)
        prompt, completion = _split_conversation(turns, "messages")
        prompt = _ends_on_user(prompt, "messages", "the turns before the last answer")
    else:
        prompt, completion = _prompt_and_completion(rec)
    _no_tools(rec)
    return prompt, completion, label


def from_unpaired(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    """Label true: an ordinary answer. Label false: never an answer. clean.clean_rows pairs a bad
    completion with a good one of the same prompt before it gets here; alone it is rejected."""
    prompt, completion, label = _unpaired_parts(rec)
    if not label:
        raise RowError(
            "unpaired_bad_completion",
            "label",
            f"label is false (a bad completion) and no label-true completion of the same prompt pairs with it: {KTO_HINT}",
        )
    return prompt, completion, None


def from_prompt_only(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    _prompt_or_question(rec)  # a malformed prompt still gets its own reason
    raise RowError(
        "prompt_only",
        "prompt",
        "prompt-only row: there is no answer to learn or compare; prompt-only data is only useful for "
        "on-policy pairs (answers generated by the model itself), which qatune does not build from a prompt alone",
    )


def from_text(rec: Mapping[str, Any]) -> tuple[list[dict], str, str | None]:
    raise RowError(
        "no_answer",
        "text",
        "plain text row (language modelling): there is no answer to learn; use a question/answer or chat format",
    )


Adapter = Callable[[Mapping[str, Any]], tuple[list[dict], str, str | None]]
FORMATS: dict[str, Adapter] = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "response_jk": from_response_jk,
    "preference": from_preference,
    "qa": from_qa,
    "prompt_completion": from_prompt_completion,
    "implicit_preference": from_implicit_preference,
    "sharegpt_preference": from_sharegpt_preference,
    "alpaca_preference": from_alpaca_preference,
    "unpaired": from_unpaired,
    "prompt_only": from_prompt_only,
    "text": from_text,
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
# ...and those only some formats read (a qa row's `system` or `label` column stays in meta, as before).
_CONSUMED_BY_FORMAT = {
    "sharegpt": {"system"},
    "sharegpt_preference": {"system"},
    "alpaca": {"system", "history"},
    "alpaca_preference": {"system", "history", "chosen_response", "rejected_response"},
    "preference": {"system"},
    "prompt_completion": {"completion"},
    "unpaired": {"completion", "label"},
}
# A field that holds an answer: its presence means a row is not prompt-only.
_ANSWER_FIELDS = {
    "completion",
    "chosen",
    "rejected",
    "answer",
    "output",
    "response",
    "response_j",
    "response_k",
    "chosen_response",
    "rejected_response",
}


def detect_format(rec: Mapping[str, Any]) -> str | None:
    """The format a record looks like, judged by its field names (and a label's value), or None.

    Order matters where shapes overlap: a boolean `label` makes prompt/completion or messages rows
    unpaired preference data; `chosen` next to a conversation or an instruction makes them preference
    data; chosen + rejected with no prompt of any kind is TRL's implicit-prompt preference.
    """
    keys = set(_keys(rec))
    if (
        "label" in keys
        and _label(rec[_keys(rec)["label"]]) is not None
        and ({"prompt", "completion"} <= keys or "messages" in keys)
    ):
        return "unpaired"
    if keys & {"messages", "conversations"} and "chosen" in keys:
        return "sharegpt_preference"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and keys & {"chosen", "chosen_response"}:
        return "alpaca_preference"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"response_j", "response_k"} <= keys:
        return "response_jk"
    if "chosen" in keys and keys & {"prompt", "question"}:
        return "preference"
    if {"chosen", "rejected"} <= keys:
        return "implicit_preference"
    if {"question", "answer"} <= keys:
        return "qa"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "prompt" in keys and not keys & _ANSWER_FIELDS:
        return "prompt_only"
    if "text" in keys and not keys & (_CONSUMED | _ANSWER_FIELDS) - {
        "id",
        "source",
        "meta",
        "topic",
        "category",
    }:
        return "text"
    return None


def _meta(rec: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    consumed = _CONSUMED | _CONSUMED_BY_FORMAT.get(fmt, set())
    meta = dict(rec["meta"]) if isinstance(rec.get("meta"), Mapping) else {}
    for key, value in rec.items():
        if (
            key.lower() not in consumed
            and isinstance(value, str | int | float | bool)
            and len(str(value)) <= 200
        ):
            meta[key] = value
    return meta


def _check_object(rec: Any, max_field_chars: int) -> None:
    if not isinstance(rec, Mapping):
        raise RowError("not_an_object", None, f"expected a JSON object, got {type(rec).__name__}")
    for key, value in rec.items():
        if isinstance(value, str) and len(value) > max_field_chars:
            raise RowError(
                "field_too_long",
                str(key),
                f"field '{key}': {len(value)} characters (limit clean.max_field_chars={max_field_chars})",
            )


def _normalise_prompt(prompt: list[dict]) -> list[dict]:
    prompt = [{"role": t["role"], "content": normalise_text(t["content"])} for t in prompt]
    for i, turn in enumerate(prompt):
        if not turn["content"]:
            raise RowError("empty_field", f"prompt[{i}]", f"field 'prompt[{i}]' is empty")
    return prompt


def _refuse_bad_label(rec: Mapping[str, Any], fmt: str) -> None:
    """The rule that never breaks: a row labelled false is not an answer, whatever format was forced."""
    key = _keys(rec).get("label")
    if key is not None and _label(rec[key]) is False:
        raise RowError(
            "unpaired_bad_completion",
            "label",
            f"label is {rec[key]!r}: this answer is marked bad and format '{fmt}' would learn it as the "
            f"chosen one; use format 'unpaired' to pair it with a good answer of the same prompt, else {KTO_HINT}",
        )


def to_canonical(rec: Any, fmt: str, max_field_chars: int) -> Record:
    """Convert one raw record; raises RowError naming the field when it cannot be used."""
    _check_object(rec, max_field_chars)
    prompt, chosen, rejected = FORMATS[fmt](rec)
    if fmt != "unpaired":  # from_unpaired refuses label false itself
        _refuse_bad_label(rec, fmt)
    prompt = _normalise_prompt(prompt)
    chosen = normalise_text(chosen)
    if not chosen:
        raise RowError("empty_field", "chosen", "the answer (chosen) is empty")
    if rejected is not None:
        rejected = normalise_text(rejected)
        if not rejected:
            raise RowError("empty_field", "rejected", "the rejected answer is empty")
        if same_words(rejected, chosen):
            raise RowError("chosen_equals_rejected", "rejected", "chosen and rejected are the same text")
    return _record(rec, fmt, prompt, chosen, rejected)


def _record(
    rec: Mapping[str, Any], fmt: str, prompt: list[dict], chosen: str | None, rejected: str | None
) -> Record:
    """The canonical record: the given texts plus the raw row's topic and kept metadata."""
    topic = _field(rec, "topic", required=False) or _field(rec, "category", required=False)
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "topic": normalise_text(topic) if isinstance(topic, str) and topic.strip() else None,
        "meta": _meta(rec, fmt),
    }


def unpaired_completion(rec: Any, max_field_chars: int) -> tuple[list[dict], str, bool]:
    """(normalised prompt, normalised completion, label) of an `unpaired` row, for clean_rows to pair
    bad completions with good ones. The completion may be a BAD one: never use it as `chosen`
    without checking the label. Raises RowError exactly where to_canonical would."""
    _check_object(rec, max_field_chars)
    prompt, completion, label = _unpaired_parts(rec)
    prompt, completion = _normalise_prompt(prompt), normalise_text(completion)
    if not completion:
        raise RowError("empty_field", "chosen" if label else "rejected", "the completion is empty")
    return prompt, completion, label


def unpaired_bad_record(rec: Any, max_field_chars: int) -> Record:
    """The canonical record of a label-false completion kept alone for KTO: no `chosen` (nothing may
    learn it as an answer), the completion as `rejected`."""
    prompt, completion, label = unpaired_completion(rec, max_field_chars)
    if label:
        raise ValueError("unpaired_bad_record is for label-false rows only")
    return _record(rec, "unpaired", prompt, None, completion)


def question_text(prompt: list[dict]) -> str:
    """The user's side of a prompt, the unit that must never straddle two splits."""
    return "\n".join(t["content"] for t in prompt if t["role"] == "user")
