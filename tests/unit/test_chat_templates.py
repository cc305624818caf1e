"""Training chat templates per model family, with the real template strings TRL ships (Qwen2.5, Qwen3,
Llama 3, Gemma) and Llama 3.2's, on tiny tokenizers that have those families' special tokens: every
assistant turn is learned, everything else is masked, and the template published is the original."""

from __future__ import annotations

import pytest
from trl import chat_template_utils as trl_templates

from qatune.chat import CHATML_WITH_GENERATION, chat_template_for_training, sft_example, template_kwargs
from qatune.tiny import CHATML, build_tokenizer

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


@pytest.mark.parametrize("turns", ["all", "last"])
def test_multi_turn_rows_train_every_answer_or_the_last_one(tiny_model_dir, turns):
    """Through TRL's own tokenisation and collator: the labels that are not -100 are exactly the answers."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template, mode = chat_template_for_training(tok)
    row = {"prompt": CONVERSATION[:3], "chosen": CONVERSATION[3]["content"]}
    example = sft_example(row, "Be safe.", mode, turns)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        processing_class=tok,
        train_dataset=Dataset.from_list([example]),
        peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        args=SFTConfig(
            output_dir="/tmp/qatune-mask-turns",
            assistant_only_loss="messages" in example,
            use_cpu=True,
            report_to="none",
            per_device_train_batch_size=1,
            max_length=256,
        ),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    learned = tok.decode([t for t in batch["labels"][0].tolist() if t != -100])
    assert "3 to 5 g a day." in learned
    assert ("About 1.6 g per kg." in learned) == (turns == "all")
    assert "protein" not in learned and "creatine" not in learned and "Be safe." not in learned
