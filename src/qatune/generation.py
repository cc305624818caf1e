"""Batched greedy answers from a model in memory: evaluate's answers to the test questions and the dpo
stage's on-policy rejected answers both come from `greedy_answers`. Interactive, sampled and streamed
answers for people are qatune.inference's. Every generation path stops where `stop_tokens` says.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from qatune.templates import conversation, stop_strings

ANSWER_MARK = "\x00ANSWER\x00"  # a stand-in answer no template rewrites, to find the text after it


@dataclass(frozen=True)
class StopTokens:
    """The tokens that end an answer: `ids` for transformers' generate, `texts` for llama.cpp and Ollama.
    The chat template's end-of-turn token comes first, then the tokenizer's and generation config's eos.
    `strings` are texts that end it too, cut from the answer (the plain format's next "User:" line)."""

    ids: list[int]
    texts: list[str]
    strings: tuple[str, ...] = ()

    @property
    def eos_token_id(self) -> int | list[int]:
        """For generation_config.json: one id stays an int, as transformers writes it; several, a list."""
        return self.ids[0] if len(self.ids) == 1 else list(self.ids)


def after_answer(render) -> str:
    """The text a chat template writes right after an assistant message, from `render(messages)` of one
    user turn and one answer; "" when the template cannot render that or rewrites the answer."""
    messages = [
        {"role": "user", "content": "\x00PROMPT\x00"},
        {"role": "assistant", "content": ANSWER_MARK},
    ]
    try:
        text = render(messages)
    except Exception:  # no chat template, or one that refuses this conversation: eos alone then
        return ""
    return text.split(ANSWER_MARK, 1)[1] if ANSWER_MARK in text else ""


def stop_tokens(tokenizer, generation_config=None, template_kwargs: dict | None = None) -> StopTokens:
    """Every token that ends an answer. The end-of-turn token is the first special token the chat template
    writes after an answer: Gemma's <end_of_turn>, Llama 3's <|eot_id|>, Qwen's <|im_end|>, Mistral's </s>.
    It often differs from the eos token (Gemma's <eos>, Llama 3 base's <|end_of_text|>), and a model trained
    on the template ends its turn with it; the tokenizer's and generation config's eos ids stop it too."""

    def render(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, **(template_kwargs or {}))

    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    after = tokenizer(after_answer(render), add_special_tokens=False)["input_ids"]
    end_of_turn = next((i for i in after if i in special), None)
    config_eos = getattr(generation_config, "eos_token_id", None)
    config_eos = config_eos if isinstance(config_eos, list) else [config_eos]
    ids = [i for i in dict.fromkeys([end_of_turn, tokenizer.eos_token_id, *config_eos]) if i is not None]
    texts = [tokenizer.convert_ids_to_tokens(i) for i in ids]
    return StopTokens(ids, [t for t in texts if t], tuple(stop_strings(tokenizer.chat_template)))


def cut_at_stop(text: str, strings: Iterable[str]) -> tuple[str, bool]:
    """`text` up to the first of the stop strings, and whether one was there."""
    found = [text.index(s) for s in strings if s in text]
    return (text[: min(found)], True) if found else (text, False)


def until_stop(pieces: Iterable[str], strings: tuple[str, ...]) -> Iterator[str]:
    """A streamed answer as a reader should see it: without its leading whitespace (the space a plain-format
    model writes after "Assistant:"), and ended before the first stop string, none of which is ever shown:
    a tail that may be the start of one waits for the next piece."""
    held, started = "", False
    for piece in pieces:
        held += piece
        text, stopped = cut_at_stop(held, strings)
        wait = max((k for s in strings for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
        out, held = (text, "") if stopped else (held[: len(held) - wait], held[len(held) - wait :])
        out = out if started else out.lstrip()
        if out:
            started = True
            yield out
        if stopped:
            return
    tail = held if started else held.lstrip()
    if tail:
        yield tail


def gguf_chat_formatter(llm, add_generation_prompt: bool = True, stop_token_ids: list[int] | None = None):
    """llama-cpp-python's renderer of the chat template stored in a GGUF (`llama_cpp.Llama`), with the file's
    bos and eos texts, as `Llama.create_chat_completion` renders it; None when the file has no template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    eos, bos = llm.token_eos(), llm.token_bos()
    return Jinja2ChatFormatter(
        template,
        eos_token=gguf_token_text(llm, eos) if eos >= 0 else "",
        bos_token=gguf_token_text(llm, bos) if bos >= 0 else "",
        add_generation_prompt=add_generation_prompt,
        stop_token_ids=stop_token_ids,
    )


def gguf_token_text(llm, token: int, special: bool = True) -> str:
    return llm.detokenize([token], special=special).decode("utf-8", errors="replace")


def gguf_stop_tokens(llm) -> StopTokens:
    """`stop_tokens` for a GGUF loaded in llama.cpp: the same rule on the chat template stored in the file,
    then the file's eos and end-of-turn (eot) tokens. A special token there is a control token: one that
    llama.cpp writes as text only when asked for special tokens."""
    formatter = gguf_chat_formatter(llm, add_generation_prompt=False)
    after = after_answer(lambda messages: formatter(messages=messages).prompt) if formatter else ""
    after_ids = llm.tokenize(after.encode(), add_bos=False, special=True) if after else []
    end_of_turn = next(
        (t for t in after_ids if gguf_token_text(llm, t) and not gguf_token_text(llm, t, special=False)), None
    )
    candidates = [end_of_turn, llm.token_eos(), llm._model.token_eot()]
    ids = [i for i in dict.fromkeys(candidates) if i is not None and i >= 0]
    return StopTokens(ids, [t for t in (gguf_token_text(llm, i) for i in ids) if t])


def greedy_answers(
    model,
    tokenizer,
    questions: list[list[dict]],
    batch_size: int,
    max_new_tokens: int,
    repetition_penalty: float = 1.0,
    desc: str = "answers",
    template_kwargs: dict | None = None,
) -> tuple[list[str], list[bool]]:
    """Greedy answers to chat prompts, batched with left padding and the KV cache; (answers, finished
    with a token of `stop_tokens`). Prompts are sorted by length so a batch carries little padding.
    `template_kwargs` are the chat template's variables (qatune.templates.template_kwargs)."""
    import torch
    from tqdm.auto import tqdm

    prompts = [
        tokenizer.apply_chat_template(
            q, add_generation_prompt=True, tokenize=False, **(template_kwargs or {})
        )
        for q in questions
    ]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    finished: list[bool] = [False] * len(prompts)
    stops = stop_tokens(tokenizer, model.generation_config, template_kwargs)
    eos_ids = stops.ids
    # stop strings need the tokenizer in generate (transformers' StopStringCriteria); none in chat templates
    strings = {"stop_strings": list(stops.strings), "tokenizer": tokenizer} if stops.strings else {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with tqdm(total=len(prompts), desc=desc, unit="answer") as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = tokenizer(
                    [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(model.device)
                with torch.inference_mode():
                    out = model.generate(
                        **enc,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        repetition_penalty=repetition_penalty,
                        pad_token_id=pad_id,
                        eos_token_id=eos_ids,
                        use_cache=True,
                        temperature=None,
                        top_p=None,
                        top_k=None,
                        **strings,
                    )
                new = out[:, enc["input_ids"].shape[1] :]
                for row, i in enumerate(idx):
                    ids = new[row].tolist()
                    text, cut = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stops.strings)
                    finished[i] = cut or any(t in eos_ids for t in ids)
                    answers[i] = text.strip()
                bar.update(len(idx))
    finally:
        tokenizer.padding_side = side
    return answers, finished


def on_policy_rejected(
    model,
    tokenizer,
    rows: list[dict],
    system_prompt: str | None,
    max_new_tokens: int,
    batch_size: int,
    template_kwargs: dict | None = None,
) -> list[dict]:
    """Rows without a rejected answer get the model's own greedy answer as rejected; rows whose answer is
    empty or equals the chosen one are left out (they would teach nothing)."""
    need = [r for r in rows if r.get("rejected") is None]
    was_training = model.training
    model.eval()
    answers, _ = greedy_answers(
        model,
        tokenizer,
        [conversation(r, system_prompt) for r in need],
        batch_size,
        max_new_tokens,
        desc="on-policy answers",
        template_kwargs=template_kwargs,
    )
    if was_training:
        model.train()
    for row, answer in zip(need, answers, strict=True):
        row["rejected"] = answer or "(no answer)"
    return [r for r in rows if r["rejected"] and r["rejected"] != r["chosen"]]
