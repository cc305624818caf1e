"""Batched greedy answers from a model in memory: evaluate's answers to the test questions and the dpo
stage's on-policy rejected answers both come from `greedy_answers`. Interactive, sampled and streamed
answers for people are qatune.inference's.
"""

from __future__ import annotations

from qatune.chat import conversation


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
    with an end-of-turn token). Prompts are sorted by length so a batch carries little padding.
    `template_kwargs` are the chat template's variables (qatune.chat.template_kwargs)."""
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
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    eos_ids.discard(None)
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
                        eos_token_id=sorted(eos_ids),
                        use_cache=True,
                        temperature=None,
                        top_p=None,
                        top_k=None,
                    )
                new = out[:, enc["input_ids"].shape[1] :]
                for row, i in enumerate(idx):
                    ids = new[row].tolist()
                    finished[i] = any(t in eos_ids for t in ids)
                    answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
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
