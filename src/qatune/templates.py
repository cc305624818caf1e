"""Conversations as the model sees them: the chat template a model trains with, the template kwargs every
stage renders with (Qwen3's thinking switch), the system prompt, and the SFT and DPO examples built from
canonical rows.

Training templates need `{% generation %}` markers so that every assistant turn is learned and nothing else
(TRL's `assistant_only_loss`). In order: a template that has them is used as it is; one TRL knows (Qwen2.5,
Qwen3, Llama 3, Gemma, ...) gets TRL's training copy; Llama 3.1/3.2/3.3 get their assistant turns marked
here; a ChatML template TRL does not know (SmolLM2) gets qatune's marked ChatML; anything else trains on
prompt/completion pairs (the last answer only). The training copy is never published: stages save the
model's original template with every adapter and merged model.

`train.prompt_format: plain` (seed 001) trains on plain text instead, `User: {question}\nAssistant: {answer}`,
with the loss on the whole text. The format is put on the tokenizer as its chat template when the base loads
(qatune.modeling.load_base) and published with the adapter, so every runtime that renders a conversation
(scoring, `qatune ask`, the chat app, serve, the merge and export checks, the GGUF) renders that text.
"""

from __future__ import annotations

from typing import Any

# ChatML with {% generation %} markers, so TRL's assistant_only_loss can mask everything but the
# assistant's tokens. The end-of-turn token sits inside the marked block: the model must learn to stop.
CHATML_WITH_GENERATION = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama 3.1-3.3 render every plain turn with this one expression; TRL 1.16 marks Llama 3.0's template only.
LLAMA3_TURN = (
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' }}"
)
LLAMA3_MARKED_TURN = (
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}" + LLAMA3_TURN + "{%- endif %}"
)


# The plain format as a chat template: one `Role: text` line per message, the end-of-sequence token after a
# final answer (TRL appends it to every plain-text training row), "Assistant:" as the generation prompt (the
# model writes the space: in training " answer" is one run of tokens after the colon). The Jinja comment
# marks a template as this format wherever it travels.
PLAIN_MARK = "{#- qatune train.prompt_format: plain -#}"
PLAIN_TURNS = (
    "{%- for message in messages %}"
    "{%- if not loop.first %}{{ '\\n' }}{%- endif %}"
    "{{- message['role'] | capitalize + ': ' + message['content'] }}"
    "{%- if loop.last and message['role'] == 'assistant' %}{{ eos_token }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ ('\\n' if messages else '') + 'Assistant:' }}{%- endif %}"
)
# A model trained on whole User:/Assistant: texts may write the next question itself: answers end there too.
PLAIN_STOP = "\nUser:"


def plain_template(tokenizer) -> str:
    """The plain format as `tokenizer`'s chat template, opening with BOS where tokenizing text adds one (Llama,
    Gemma, Mistral): the training text gets it from the tokenizer, a rendered prompt from the template."""
    ids = tokenizer("x")["input_ids"]
    adds_bos = bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    return PLAIN_MARK + ("{{ bos_token }}" if adds_bos else "") + PLAIN_TURNS


def is_plain(template: str | dict | None) -> bool:
    return isinstance(template, str) and PLAIN_MARK in template


def plain_text(messages: list[dict]) -> str:
    """A conversation in the plain format, as PLAIN_TURNS renders it without BOS and EOS (the SFT text)."""
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def stop_strings(template: str | dict | None) -> list[str]:
    """Texts that end an answer besides the stop tokens: the next "User:" line in the plain format."""
    return [PLAIN_STOP] if is_plain(template) else []


def answer_prefix(template: str | dict | None) -> str:
    """What sits between the generation prompt and the answer's first word: the space after "Assistant:"
    in the plain format (the model's to write), nothing in a chat template."""
    return " " if is_plain(template) else ""


def use_prompt_format(tokenizer, prompt_format: str):
    """`tokenizer` rendering `train.prompt_format`: its own chat template, or the plain format."""
    if prompt_format == "plain":
        tokenizer.chat_template = plain_template(tokenizer)
    return tokenizer


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and "generation %}" in template and "endgeneration" in template


def chat_template_for_training(tokenizer) -> tuple[str | None, str]:
    """(the template to train with, loss mode: "assistant_only", "completion_only", or "whole_text" for
    the plain format) for a tokenizer."""
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named variants: the default one is what apply_chat_template uses
        template = template.get("default")
    if is_plain(template):
        return template, "whole_text"
    try:
        from trl.chat_template_utils import get_training_chat_template

        patched = get_training_chat_template(tokenizer)
    except Exception:  # TRL has no training copy of it (ValueError), or cannot render its probes
        patched = template if has_generation_markers(template) else None
    else:
        patched = template if patched is None else patched  # None: already fit for training
    if has_generation_markers(patched):
        return patched, "assistant_only"
    if template and LLAMA3_TURN in template:
        return template.replace(LLAMA3_TURN, LLAMA3_MARKED_TURN), "assistant_only"
    if template and "<|im_start|>" in template:
        return CHATML_WITH_GENERATION, "assistant_only"
    return template, "completion_only"


def use_training_template(tokenizer, enable_thinking: bool) -> tuple[str | None, dict[str, Any], str]:
    """Put the training template on `tokenizer`; (the original template to publish, the template
    kwargs every stage renders with, the loss mode). What sft and dpo both do before building examples."""
    published = tokenizer.chat_template
    tokenizer.chat_template, loss_mode = chat_template_for_training(tokenizer)
    return published, template_kwargs(published, enable_thinking), loss_mode


def template_kwargs(template: str | None, enable_thinking: bool) -> dict[str, Any]:
    """Extra variables every stage renders the model's chat template with: Qwen3's thinking switch
    (`train.enable_thinking`), for templates that read it; {} for every other template. Training, scoring,
    merge checks and chat all pass the same."""
    return {"enable_thinking": enable_thinking} if template and "enable_thinking" in template else {}


def conversation(row: dict, system_prompt: str | None) -> list[dict]:
    """A row's prompt messages, with the system prompt first unless the row brings its own."""
    prompt = list(row["prompt"])
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return prompt


def sft_example(
    row: dict, system_prompt: str | None, loss_mode: str, turns: str = "all", kwargs: dict | None = None
) -> dict:
    """One SFT example. With a marked template and `turns: all`, a conversation whose every assistant turn
    is learned (earlier answers of a multi-turn row included); in the plain format (loss mode whole_text) its
    text, learned whole (TRL appends EOS); otherwise prompt/completion, where TRL learns the last answer only.
    `kwargs` are the template variables (template_kwargs)."""
    prompt = conversation(row, system_prompt)
    answer = {"role": "assistant", "content": row["chosen"]}
    if loss_mode == "whole_text":
        return {"text": plain_text([*prompt, answer])}
    example = (
        {"messages": [*prompt, answer]}
        if loss_mode == "assistant_only" and turns == "all"
        else {"prompt": prompt, "completion": [answer]}
    )
    return {**example, "chat_template_kwargs": kwargs} if kwargs else example


def dpo_example(row: dict, system_prompt: str | None, kwargs: dict | None = None) -> dict:
    example = {
        "prompt": conversation(row, system_prompt),
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }
    return {**example, "chat_template_kwargs": kwargs} if kwargs else example


def kto_examples(row: dict, system_prompt: str | None, kwargs: dict | None = None) -> list[dict]:
    """TRL's unpaired preference rows from one canonical row: its chosen answer labelled good, its
    rejected one labelled bad (a lone bad answer kept for KTO has only the second)."""
    prompt = conversation(row, system_prompt)
    out = [
        {"prompt": prompt, "completion": [{"role": "assistant", "content": row[key]}], "label": good}
        for key, good in (("chosen", True), ("rejected", False))
        if row.get(key)
    ]
    return [{**e, "chat_template_kwargs": kwargs} for e in out] if kwargs else out
