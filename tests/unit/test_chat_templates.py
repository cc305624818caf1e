"""Training chat templates per model family, with the real template strings TRL ships (Qwen2.5, Qwen3,
Llama 3, Gemma) and Llama 3.2's, on tiny tokenizers that have those families' special tokens: every
assistant turn is learned, everything else is masked, and the template published is the original."""

from __future__ import annotations

import tempfile

import pytest
from trl import chat_template_utils as trl_templates

from qatune.templates import (
    CHATML_WITH_GENERATION,
    answer_prefix,
    chat_template_for_training,
    is_plain,
    plain_template,
    sft_example,
    stop_strings,
    template_kwargs,
    use_prompt_format,
    use_training_template,
)
from tests.tiny import CHATML, build_tokenizer

FAMILIES = {
    "qwen2.5": ("qwen2", trl_templates.qwen2_5_chat_template),
    "qwen3": ("qwen3", trl_templates.qwen3_chat_template),
    "llama3": ("llama", trl_templates.llama3_chat_template),
    "llama3.2": ("llama", trl_templates.llama3_2_chat_template),
    "gemma": ("gemma", trl_templates.gemma_chat_template),
}
CONVERSATION = [
    {"role": "user", "content": "How much protein per day?"},
    {"role": "assistant", "content": "About 1.6 g per kg."},
    {"role": "user", "content": "And creatine?"},
    {"role": "assistant", "content": "3 to 5 g a day."},
]


def tokenizer_with(family: str, template: str):
    tok = build_tokenizer(family=family)
    if "<|start_header_id|>" in template:  # Llama 3 opens with its own bos token
        tok.bos_token = "<|begin_of_text|>"
    tok.chat_template = template
    return tok


def learned_text(tok, template: str, messages: list[dict]) -> tuple[str, str]:
    """(the text under the assistant mask, the text outside it) for one rendered conversation."""
    enc = tok.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    inside = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    outside = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    return inside, outside


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_assistant_turn_is_learned_and_nothing_else(name):
    family, original = FAMILIES[name]
    tok = tokenizer_with(family, original)
    template, mode = chat_template_for_training(tok)
    assert mode == "assistant_only" and template != original
    inside, outside = learned_text(tok, template, CONVERSATION)
    for turn in CONVERSATION:
        assert (turn["content"] in inside) == (turn["role"] == "assistant"), (name, turn, inside)
        assert (turn["content"] in outside) == (turn["role"] == "user"), (name, turn, outside)
    # The markers change nothing in what the model sees.
    kwargs = {"tokenize": False, "date_string": "03 Dec 2026"}
    assert tok.apply_chat_template(CONVERSATION, chat_template=template, **kwargs).replace(
        "<think>\n\n</think>\n\n", ""
    ) == tok.apply_chat_template(CONVERSATION, chat_template=original, **kwargs).replace(
        "<think>\n\n</think>\n\n", ""
    )


def test_chatml_trl_does_not_know_gets_qatunes_marked_chatml_and_others_fall_back():
    tok = tokenizer_with("llama", CHATML)  # SmolLM2-style ChatML
    assert chat_template_for_training(tok) == (CHATML_WITH_GENERATION, "assistant_only")
    marked = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    assert chat_template_for_training(tokenizer_with("llama", marked)) == (marked, "assistant_only")
    plain = "{% for m in messages %}<turn>{{ m['content'] }}{% endfor %}"
    assert chat_template_for_training(tokenizer_with("llama", plain)) == (plain, "completion_only")


def test_thinking_switch_reaches_only_templates_that_read_it():
    qwen3 = FAMILIES["qwen3"][1]
    assert template_kwargs(qwen3, False) == {"enable_thinking": False}
    assert template_kwargs(CHATML, False) == {}
    tok = tokenizer_with("qwen3", qwen3)
    off = tok.apply_chat_template(
        CONVERSATION[:1], tokenize=False, add_generation_prompt=True, **template_kwargs(qwen3, False)
    )
    on = tok.apply_chat_template(
        CONVERSATION[:1], tokenize=False, add_generation_prompt=True, **template_kwargs(qwen3, True)
    )
    assert off.endswith("<think>\n\n</think>\n\n") and not on.endswith("</think>\n\n")


def first_sft_batch(model_dir, tok, example: dict) -> dict:
    """The first batch TRL's SFTTrainer makes of one example, through its own tokenisation and collator,
    with `assistant_only_loss` set as stages/sft.py sets it."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        processing_class=tok,
        train_dataset=Dataset.from_list([example]),
        peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        args=SFTConfig(
            output_dir=tempfile.mkdtemp(prefix="qatune-sft-batch-"),
            assistant_only_loss="messages" in example,
            use_cpu=True,
            report_to="none",
            per_device_train_batch_size=1,
            max_length=256,
        ),
    )
    return next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("turns", ["all", "last"])
def test_multi_turn_rows_train_every_answer_or_the_last_one(tiny_model_dir, turns):
    """Through TRL's own tokenisation and collator: the labels that are not -100 are exactly the answers."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template, mode = chat_template_for_training(tok)
    row = {"prompt": CONVERSATION[:3], "chosen": CONVERSATION[3]["content"]}
    example = sft_example(row, "Be safe.", mode, turns)
    batch = first_sft_batch(tiny_model_dir, tok, example)
    learned = tok.decode([t for t in batch["labels"][0].tolist() if t != -100])
    assert "3 to 5 g a day." in learned
    assert ("About 1.6 g per kg." in learned) == (turns == "all")
    assert "protein" not in learned and "creatine" not in learned and "Be safe." not in learned


# --------------------------------------------------------------------------- seed 001's plain prompt format

QA = {"prompt": [{"role": "user", "content": "How often should I train?"}], "chosen": "Three times a week."}


def test_plain_format_is_seed_001s_text_with_no_system_line():
    """train.prompt_format: plain renders "User: {question}\\nAssistant: {answer}", where Qwen2.5's own template
    puts its default system line ("You are Qwen, ...") before a conversation without one."""
    tok = tokenizer_with("qwen2", trl_templates.qwen2_5_chat_template)
    assert "You are Qwen" in tok.apply_chat_template(QA["prompt"], tokenize=False)  # what chat would train
    use_prompt_format(tok, "plain")
    answer = {"role": "assistant", "content": QA["chosen"]}
    assert tok.apply_chat_template([*QA["prompt"], answer], tokenize=False) == (
        "User: How often should I train?\nAssistant: Three times a week." + tok.eos_token
    )
    prompt = tok.apply_chat_template(QA["prompt"], tokenize=False, add_generation_prompt=True)
    assert prompt == "User: How often should I train?\nAssistant:"
    # a system prompt, when one is set, and earlier turns are lines of the same text
    messages = [{"role": "system", "content": "Be safe."}, *CONVERSATION[:3]]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "System: Be safe.\nUser: How much protein per day?\nAssistant: About 1.6 g per kg.\n"
        "User: And creatine?\nAssistant:"
    )
    assert stop_strings(tok.chat_template) == ["\nUser:"] and answer_prefix(tok.chat_template) == " "


def test_the_chat_format_leaves_the_template_alone():
    family, original = FAMILIES["qwen2.5"]
    tok = use_prompt_format(tokenizer_with(family, original), "chat")
    assert tok.chat_template == original and not is_plain(original)
    assert stop_strings(original) == [] and answer_prefix(original) == ""


def test_plain_format_opens_with_bos_where_the_tokenizer_adds_it():
    """Llama, Gemma and Mistral tokenizers put BOS before plain text, so the SFT rows have it: so must the
    prompts the template renders (apply_chat_template adds no special tokens itself)."""
    from tokenizers import processors

    tok = build_tokenizer(family="mistral")
    assert not plain_template(tok).count("bos_token")  # the tiny one adds none
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    assert tok("x")["input_ids"][0] == bos
    use_prompt_format(tok, "plain")
    ids = tok.apply_chat_template(QA["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids == tok("User: How often should I train?\nAssistant:")["input_ids"] and ids[0] == bos


def test_plain_rows_are_learned_whole_and_are_the_text_the_model_is_served(tiny_model_dir):
    """Through TRL's own tokenisation and collator: every token of "User: ...\\nAssistant: ..." is learned,
    EOS included, and the row is exactly what the published template renders for that conversation."""
    from transformers import AutoTokenizer

    tok = use_prompt_format(AutoTokenizer.from_pretrained(tiny_model_dir), "plain")
    published, kwargs, mode = use_training_template(tok, False)
    assert mode == "whole_text" and is_plain(published) and tok.chat_template == published and kwargs == {}
    example = sft_example(QA, None, mode)
    assert example == {"text": "User: How often should I train?\nAssistant: Three times a week."}
    batch = first_sft_batch(tiny_model_dir, tok, example)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert labels == ids  # the loss on the whole text (the model shifts the labels itself)
    served = tok.apply_chat_template(
        [*QA["prompt"], {"role": "assistant", "content": QA["chosen"]}], tokenize=False
    )
    assert tok.decode(ids) == served and ids[-1] == tok.eos_token_id
