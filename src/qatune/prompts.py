"""One chat template, everywhere: the prompt token ids each runtime feeds the model, and the check that
they are the same.

A conversation reaches the model through four renderers: the training tokenizer (the template sft/dpo train
with, qatune.templates.use_training_template), the merged model's tokenizer (merge's output, what `qatune ask`,
the chat app and `qatune serve` in transformers use), the GGUF file's own template as llama-cpp-python
applies it (Jinja2ChatFormatter from the file's metadata: llama.cpp, `qatune serve --mode gguf`), and the
Ollama Modelfile's Go TEMPLATE. `check_template` renders one multi-turn conversation through each, asserts
identical prompt token ids and that every end-of-turn token the template writes is a stop token of each;
the export stage runs it and fails in one line on a mismatch.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from qatune.generation import ANSWER_MARK, gguf_chat_formatter, gguf_stop_tokens, gguf_token_text, stop_tokens

# A conversation with a system prompt, two finished exchanges and a follow-up: multi-turn history is where
# templates differ most (Llama 3's headers, Gemma's folded system prompt, Mistral's [INST] pairs).
CONVERSATION = [
    {"role": "system", "content": "You answer questions briefly."},
    {"role": "user", "content": "How much water should I drink a day?"},
    {"role": "assistant", "content": "About two litres, more when you sweat."},
    {"role": "user", "content": "And during a long run?"},
    {"role": "assistant", "content": "Small sips every 15 to 20 minutes."},
    {"role": "user", "content": "Is coffee fine before a run?"},
]


def template_ids(tokenizer, messages: list[dict], template_kwargs: dict | None = None) -> list[int]:
    """Prompt ids from a transformers tokenizer's chat template, generation prompt added: the text is
    rendered, then tokenized without adding special tokens again (the template writes BOS where it wants)."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def gguf_ids(llm, messages: list[dict]) -> list[int] | None:
    """Prompt ids as llama-cpp-python builds them from the file's template (its chat handler renders with
    Jinja2ChatFormatter and tokenizes with special tokens, BOS only where the template wrote none);
    None when the file has no template."""
    formatter = gguf_chat_formatter(llm)
    if formatter is None:
        return None
    result = formatter(messages=messages)
    return llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)


def ends_of_turn(
    render: Callable[[list[dict]], str], to_ids, special: set[int], messages: list[dict]
) -> set[int]:
    """The first special token the template writes after each assistant message of the conversation."""
    found = set()
    marked = [{**m, "content": ANSWER_MARK} if m["role"] == "assistant" else m for m in messages]
    for piece in render(marked).split(ANSWER_MARK)[1:]:
        token = next((t for t in to_ids(piece) if t in special), None)
        if token is not None:
            found.add(token)
    return found


def go_render(template: str, system: str | None, prompt: str) -> str:
    """A Modelfile TEMPLATE rendered for one turn, as Ollama would with an empty response: only the
    constructs qatune.export.ollama_template writes ({{ if .System }}...{{ else }}...{{ end }}, .System,
    .Prompt, .Response)."""
    pattern = re.compile(r"\{\{ if \.System \}\}(.*?)\{\{ else \}\}(.*?)\{\{ end \}\}", re.DOTALL)
    text = pattern.sub(lambda m: m.group(1) if system else m.group(2), template)
    text = text.replace("{{ .System }}", system or "").replace("{{ .Prompt }}", prompt)
    return text.split("{{ .Response }}", 1)[0]


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def check_template(
    training,
    merged,
    llm=None,
    template_kwargs: dict | None = None,
    generation_config=None,
    modelfile_template: str | None = None,
    system_prompt: str | None = None,
    messages: list[dict] | None = None,
) -> dict:
    """Render `messages` (CONVERSATION) through the training tokenizer, the merged tokenizer and, given a
    loaded GGUF (`llm`, llama_cpp.Llama), its own template; compare prompt ids and stop tokens, and the
    Modelfile TEMPLATE with the merged tokenizer's single-turn prompt it was derived from. Returns the
    record for metrics/export.json: {"ok", "problems", "warnings", ...}; `problems` says each mismatch in
    words. The training template may differ in earlier turns only (a warning): what the runtimes render must
    be one."""
    messages = messages or CONVERSATION
    kwargs = template_kwargs or {}
    problems: list[str] = []
    system_role = _keeps_system(merged, kwargs)
    if not system_role:  # Gemma folds it, Mistral v0.1 refuses it: the conversation without one
        messages = [m for m in messages if m["role"] != "system"]
    ids = {
        "training": template_ids(training, messages, kwargs),
        "merged": template_ids(merged, messages, kwargs),
    }
    if llm is not None:
        got = gguf_ids(llm, messages)
        if got is None:
            problems.append("the GGUF file has no chat template")
        else:
            ids["gguf"] = got
    reference = ids["merged"]
    warnings: list[str] = []
    for name, got in ids.items():
        if got != reference:
            at = first_difference(got, reference)
            said = f"{name} prompt ids differ from the merged tokenizer's at token {at} ({len(got)} vs {len(reference)} tokens)"
            single = [m for m in messages if m["role"] == "system"] + [messages[-1]]
            if name == "gguf" and kwargs and got == template_ids(merged, messages):
                # llama-cpp-python's chat handler renders without template variables (Qwen3's enable_thinking)
                warnings.append(
                    f"{said}: llama-cpp-python renders the file's template without {sorted(kwargs)}, "
                    f"so llama.cpp runtimes get the template's default for {kwargs}"
                )
            elif name == "training" and template_ids(training, single, kwargs) == template_ids(
                merged, single, kwargs
            ):
                # TRL's training copy of some templates (Qwen3) keeps earlier answers' empty <think> blocks so
                # each turn's prefix is stable; the published one drops them. Single-turn prompts agree.
                warnings.append(f"{said}, in earlier turns only; single-turn prompts agree")
            else:
                problems.append(said)

    stops = {"merged": stop_tokens(merged, generation_config, kwargs).ids}
    stops["training"] = stop_tokens(training, generation_config, kwargs).ids
    special = set(merged.all_special_ids) | set(merged.added_tokens_decoder)

    def hf_render(tok):
        return lambda ms: tok.apply_chat_template(ms, tokenize=False, **kwargs)

    def hf_ids(tok):
        return lambda text: tok(text, add_special_tokens=False)["input_ids"]

    turn_ends = {
        "merged": ends_of_turn(hf_render(merged), hf_ids(merged), special, messages),
        "training": ends_of_turn(hf_render(training), hf_ids(training), special, messages),
    }
    if "gguf" in ids:
        formatter = gguf_chat_formatter(llm, add_generation_prompt=False)
        stops["gguf"] = gguf_stop_tokens(llm).ids
        control = {
            t
            for t in range(llm.n_vocab())
            if t in special or (gguf_token_text(llm, t) and not gguf_token_text(llm, t, special=False))
        }
        turn_ends["gguf"] = ends_of_turn(
            lambda ms: formatter(messages=ms).prompt,
            lambda text: llm.tokenize(text.encode(), add_bos=False, special=True),
            control,
            messages,
        )
    for name, ends in turn_ends.items():
        missing = sorted(ends - set(stops[name]))
        if missing:
            problems.append(f"{name}: end-of-turn token ids {missing} are not stop tokens {stops[name]}")

    record = {
        "ok": False,
        "conversation_turns": len(messages),
        "prompt_tokens": {name: len(got) for name, got in ids.items()},
        "stop_token_ids": stops,
        "end_of_turn_ids": {name: sorted(ends) for name, ends in turn_ends.items()},
        "serve": "qatune serve renders with these: prompts.template_ids (transformers), llama-cpp-python's "
        "handler of the GGUF's own template (llama.cpp)",
    }
    if modelfile_template is not None:
        record["modelfile_template"] = _check_modelfile(
            merged, kwargs, modelfile_template, system_prompt if system_role else None, problems
        )
    record["ok"] = not problems
    record["problems"] = problems
    record["warnings"] = warnings
    return record


def _keeps_system(tokenizer, kwargs: dict) -> bool:
    mark = "\x00SYSTEM\x00"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": mark}, {"role": "user", "content": "x"}],
            tokenize=False,
            add_generation_prompt=True,
            **kwargs,
        )
    except Exception:  # a template that refuses a system message
        return False
    return mark in text


def _check_modelfile(merged, kwargs: dict, template: str, system: str | None, problems: list[str]) -> str:
    """The Modelfile TEMPLATE against the merged tokenizer's single-turn prompt, the text it was derived
    from (qatune.export.ollama_template): a check that the derivation holds, not an independent source."""
    from qatune.export import adds_bos

    question = "Is coffee fine before a run?"
    turn = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}
    ]
    want = merged.apply_chat_template(turn, tokenize=False, add_generation_prompt=True, **kwargs)
    if merged.bos_token and adds_bos(merged):
        want = want.replace(merged.bos_token, "", 1)  # llama.cpp and Ollama add BOS themselves
    got = go_render(template, system, question)
    if got != want:
        problems.append(
            "the Modelfile TEMPLATE renders a different prompt than the merged tokenizer's template it was "
            f"written from (at character {first_difference(list(got), list(want))})"
        )
        return "differs from the merged tokenizer's rendering it was written from"
    return "same text as the merged tokenizer's single-turn rendering it was written from"
