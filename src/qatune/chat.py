"""Conversations as the model sees them: the training chat template, the system prompt, and the SFT and
DPO examples built from canonical rows."""

from __future__ import annotations

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


def chat_template_for_training(template: str | None) -> tuple[str | None, str]:
    """(template, loss mode): a template with generation markers enables assistant-only loss.

    ChatML templates without markers (SmolLM2, Qwen) get qatune's marked ChatML; any other template
    trains on prompt/completion pairs, where TRL masks the prompt itself.
    """
    if template and "{% generation %}" in template:
        return template, "assistant_only"
    if template and "<|im_start|>" in template:
        return CHATML_WITH_GENERATION, "assistant_only"
    return template, "completion_only"


def conversation(row: dict, system_prompt: str | None) -> list[dict]:
    """A row's prompt messages, with the system prompt first unless the row brings its own."""
    prompt = list(row["prompt"])
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return prompt


def sft_example(row: dict, system_prompt: str | None, loss_mode: str) -> dict:
    prompt = conversation(row, system_prompt)
    answer = {"role": "assistant", "content": row["chosen"]}
    if loss_mode == "assistant_only":
        return {"messages": [*prompt, answer]}
    return {"prompt": prompt, "completion": [answer]}


def dpo_example(row: dict, system_prompt: str | None) -> dict:
    return {
        "prompt": conversation(row, system_prompt),
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }
