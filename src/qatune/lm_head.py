"""A fused LM head for CPUs: per-token log-probabilities of the answer tokens only, in cache-sized tiles.

TRL 1.16's SFT and DPO trainers call `model(..., labels=labels, fused_lm_head=True)` and read per-token
log-probabilities (plus entropy, top-1 and mean-logit statistics for logging) instead of logits. On devices
without Triton, TRL's version scores every position, padding and prompt included, in 4,096-token x
32,768-vocabulary tiles (512 MB each in fp32) and recomputes every tile in the backward pass. Profiled on
SmolLM2-135M (2 cores, fp32, batch 4 x 217 tokens) that head took half of each training step.

This head keeps TRL's interface and its output type, and changes how the work is done:
- only positions with a label are projected (answer tokens: prompts and padding cost nothing);
- tiles of `TOKEN_TILE` tokens x the whole vocabulary (25 MB for a 49k vocabulary) instead of 512 MB ones,
  so no pass over the logits ever touches more than a few tiles' worth of memory;
- the head's weight is frozen (LoRA), so the forward pass also works out each token's gradient direction
  d log p / d hidden = (onehot - softmax) @ W and keeps it (tokens x hidden, small); the backward pass is
  one multiply, with no second projection of the vocabulary.

Only `log_probs` carries gradients. The other outputs are statistics that TRL 1.16's SFT and DPO trainers
detach (entropy, mean token accuracy, mean logits, the WPO weights); they are marked non-differentiable.
`install` refuses models it cannot serve exactly (a trainable head, a logit soft-cap) instead of
approximating them; `qatune.hardware.select_lm_head` decides when it is used (unit-tested).
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

from qatune.errors import QatuneError

TOKEN_TILE = 128  # tokens per projection tile: 128 x 49,152 fp32 logits = 25 MB (64: -20% speed, 256: -12%)
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


class AnswerLogProbs(torch.autograd.Function):
    """log p(target) for rows of `hidden` (N x H) under the frozen head `weight` (V x H), in token tiles."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale: float, outputs: tuple[str, ...]):
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        device = hidden.device
        dtype = (
            torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        )
        want_grad = ctx.needs_input_grad[0]
        w = weight.to(dtype)
        log_probs = torch.empty(n_tokens, device=device, dtype=torch.float32)
        stats = {
            name: torch.empty(
                n_tokens, device=device, dtype=torch.bool if name == "is_top1" else torch.float32
            )
            for name in outputs[1:]
        }
        direction = torch.empty(hidden.shape, device=device, dtype=torch.float32) if want_grad else None
        with torch.autocast(device.type, enabled=False):
            for start in range(0, n_tokens, TOKEN_TILE):
                end = min(start + TOKEN_TILE, n_tokens)
                rows = torch.arange(end - start, device=device)
                target = targets[start:end]
                z = (hidden[start:end].to(dtype) @ w.t()).float()
                if scale != 1.0:
                    z.mul_(scale)
                top, argmax = z.max(-1)
                if "mean_logits" in stats:
                    stats["mean_logits"][start:end] = z.sum(-1) / vocab
                if "is_top1" in stats:
                    stats["is_top1"][start:end] = argmax == target  # argmax is the first maximum, as in TRL
                target_z = z[rows, target]
                # z - max <= 0; below -80 exp() would return denormals (slow on x86, and < 1e-34 of the sum)
                z.sub_(top.unsqueeze(-1)).clamp_(min=-80.0)
                e = z.exp()
                sum_e = e.sum(-1)
                log_sum = sum_e.log()
                log_probs[start:end] = target_z - top - log_sum
                if "entropy" in stats:  # H = log sum e - sum(e * z) / sum e, with z shifted by the max
                    stats["entropy"][start:end] = log_sum - torch.linalg.vecdot(e, z) / sum_e
                del z
                e.div_(sum_e.unsqueeze(-1))  # softmax
                if "log_sum_sq_probs" in stats:
                    stats["log_sum_sq_probs"][start:end] = torch.linalg.vecdot(e, e).log()
                if want_grad:  # d log p_target / d hidden = scale * (onehot - p) @ W
                    e.neg_()
                    e[rows, target] += 1.0
                    direction[start:end] = (e.to(dtype) @ w).float().mul_(scale)
                del e
        ctx.save_for_backward(direction)
        ctx.hidden_dtype = hidden.dtype
        extra = [stats.get(name) for name in OUTPUTS[1:]]
        ctx.mark_non_differentiable(*(x for x in extra if x is not None))
        return (log_probs, *extra)

    @staticmethod
    def backward(ctx, grad_log_probs, *_unused):
        (direction,) = ctx.saved_tensors
        if grad_log_probs is None or direction is None:
            return None, None, None, None, None
        grad_hidden = direction * grad_log_probs.float().unsqueeze(-1)
        return grad_hidden.to(ctx.hidden_dtype), None, None, None, None


def answer_log_probs(hidden, weight, targets, scale: float = 1.0, outputs: tuple[str, ...] = OUTPUTS):
    """(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1) per row; those not in `outputs` are None."""
    wanted = ("log_probs", *(name for name in OUTPUTS[1:] if name in outputs))
    return AnswerLogProbs.apply(hidden, weight, targets, scale, wanted)


# Set on a model that `install` gave qatune's head: what a run records is read from the model it trained.
MARK = "_qatune_lm_head"


def install(model, outputs: tuple[str, ...] = OUTPUTS) -> None:
    """Give `model` (the transformers model under any PEFT wrapper) qatune's fused head.

    Replaces the `fused_lm_head=True` branch that TRL's trainers add (and adds it when absent); calls without
    `fused_lm_head` run the model's own forward, so generation and plain evaluation are unchanged.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    config = model.config.get_text_config()
    if getattr(config, "final_logit_softcapping", None) is not None:
        raise QatuneError("train.lm_head: qatune's head has no logit soft-capping; set train.lm_head: trl")
    # Other families rescale their logits under other names (Granite, Falcon-H1, ...): refuse, never ignore
    for name in ("logits_scaling", "lm_head_multiplier", "output_multiplier"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise QatuneError(
                f"train.lm_head: qatune's head has no '{name}' logit scaling; set train.lm_head: trl"
            )
    head = model.get_output_embeddings()
    if head.weight.requires_grad or getattr(head, "bias", None) is not None:
        raise QatuneError(
            "train.lm_head: qatune's head needs a frozen, bias-free LM head; set train.lm_head: trl"
        )
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    original = type(model).forward

    @functools.wraps(original)
    def forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs
    ):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return original(self, *args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        per_token = answer_log_probs(
            hidden[mask], self.get_output_embeddings().weight, labels[mask], scale, outputs
        )
        # masked_scatter keeps an all-masked micro-batch connected to the graph (a differentiable zero)
        full = [None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token]
        log_probs = full[0]
        loss = -log_probs.sum() / (
            mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        )
        return FusedCausalLMOutput(
            loss=loss,
            log_probs=log_probs,
            entropy=full[1],
            log_sum_sq_probs=full[2],
            mean_logits=full[3],
            is_top1=full[4],
            label_mask=mask,
        )

    model.forward = types.MethodType(forward, model)
    setattr(model, MARK, tuple(outputs))


def trained_with(model) -> str:
    """Which head `model` (a trainer's model, under any PEFT or wrapper module) computes its answer
    log-probabilities with: "qatune" where `install` put qatune's head, else "trl" (TRL's own, or Unsloth's
    fused loss). Read after the trainer is built, so a trainer that never called the swapped-in function
    (see in_trl_trainers) is recorded as what it really ran."""
    return "qatune" if any(getattr(m, MARK, None) for m in model.modules()) else "trl"


@contextlib.contextmanager
def in_trl_trainers(choice: str):
    """While TRL's SFT and DPO trainers are built, have them add qatune's head instead of their own.

    The trainers add their fused head in __init__, and the DPO trainer precomputes the reference
    log-probs there too, so the head has to be in place during construction, not put on afterwards.
    TRL 1.16's KTOTrainer adds TRL's head through its own module's name, which this leaves alone: a KTO
    run trains with TRL's head, says so here, and records it (trained_with).
    """
    if choice != "qatune":
        yield
        return
    import trl.trainer.dpo_trainer as dpo_module
    import trl.trainer.sft_trainer as sft_module

    calls = []  # the models that got qatune's head while the trainer was built

    def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        if temperature != 1.0:
            raise QatuneError(
                "train.lm_head: qatune's head has no sampling temperature; set train.lm_head: trl"
            )
        install(model, tuple(outputs))  # fp32 throughout already: cast_lm_head_to_fp32 changes nothing
        calls.append(type(model).__name__)

    modules = (sft_module, dpo_module)
    saved = [m.add_fused_lm_head for m in modules]
    for m in modules:
        m.add_fused_lm_head = add_fused_lm_head
    try:
        yield
    finally:
        for m, original in zip(modules, saved, strict=True):
            m.add_fused_lm_head = original
    if not calls:
        print(
            "train.lm_head: qatune: this trainer did not take qatune's head (TRL's SFT and DPO trainers do, "
            "its KTO trainer adds its own); it trains with TRL's own head, and the run records lm_head: trl",
            flush=True,
        )
