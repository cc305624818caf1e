"""qatune's fused LM head: selection, exact values and gradients against full logits, and on a real model."""

import pytest
import torch

from qatune import hardware, lm_head
from qatune.errors import QatuneError


@pytest.mark.parametrize(
    ("requested", "cuda", "backend", "expected"),
    [
        ("auto", False, "transformers", "qatune"),
        ("auto", True, "transformers", "trl"),  # TRL's Triton kernel already skips unlabelled positions
        ("auto", True, "unsloth", "trl"),
        ("trl", False, "transformers", "trl"),
        ("qatune", True, "transformers", "qatune"),
    ],
)
def test_select(requested, cuda, backend, expected):
    assert hardware.select_lm_head(requested, cuda, backend) == expected


def test_select_refuses_unknown_and_unsloth():
    with pytest.raises(QatuneError, match="train.lm_head: unknown value 'fast'"):
        hardware.select_lm_head("fast", False, "transformers")
    with pytest.raises(QatuneError, match="unsloth"):
        hardware.select_lm_head("qatune", True, "unsloth")


@pytest.mark.parametrize("tile", [7, 128])  # several tiles with a ragged last one, and one tile
def test_values_and_gradients_match_full_logits(monkeypatch, tile):
    monkeypatch.setattr(lm_head, "TOKEN_TILE", tile)
    gen = torch.Generator().manual_seed(0)
    n, h, v = 45, 16, 300
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen) * 2  # wide logits: some far below the max
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[0] = int((hidden[0].detach() @ weight.t()).argmax())  # at least one top-1 hit
    upstream = torch.randn(n, generator=gen)  # per-token weights, as DPO's loss gives them

    log_probs, entropy, log_sum_sq, mean_logits, top1 = lm_head.answer_log_probs(hidden, weight, targets, 0.5)
    (log_probs * upstream).sum().backward()
    ours = hidden.grad.clone()

    hidden.grad = None
    logits = (hidden @ weight.t()) * 0.5
    log_p = torch.log_softmax(logits, -1)
    expected = log_p[torch.arange(n), targets]
    (expected * upstream).sum().backward()
    p = log_p.exp()
    torch.testing.assert_close(log_probs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, hidden.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(entropy, -(p * log_p).sum(-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(log_sum_sq, (p * p).sum(-1).log(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mean_logits, logits.mean(-1), atol=1e-5, rtol=1e-5)
    assert torch.equal(top1, logits.argmax(-1) == targets) and top1[0]
    assert not entropy.requires_grad  # statistics for logging, never trained through


def test_no_direction_kept_without_grad():
    hidden, weight = torch.randn(5, 8), torch.randn(20, 8)
    with torch.inference_mode():
        out = lm_head.answer_log_probs(hidden, weight, torch.arange(5), outputs=())
    assert out[0].shape == (5,) and all(x is None for x in out[1:])


@pytest.fixture(scope="module")
def tiny_lora():
    from peft import LoraConfig, get_peft_model

    from tests.tiny import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, seed=1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def test_installed_head_gives_the_models_own_loss_and_lora_gradients(tiny_lora):
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # prompt tokens: not scored

    reference = tiny_lora(input_ids=ids, attention_mask=mask, labels=labels)
    reference.loss.backward()
    expected = {
        n: p.grad.clone() for n, p in tiny_lora.named_parameters() if p.requires_grad and p.grad is not None
    }
    tiny_lora.zero_grad()

    lm_head.install(tiny_lora.get_base_model())
    fused = tiny_lora(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    fused.loss.backward()
    torch.testing.assert_close(fused.loss, reference.loss, atol=1e-5, rtol=1e-5)
    assert expected and all(
        torch.allclose(p.grad, expected[n], atol=1e-5, rtol=1e-3)
        for n, p in tiny_lora.named_parameters()
        if n in expected
    )
    assert fused.log_probs.shape == (3, 11) and not fused.log_probs[:, :3].any()  # zero where unlabelled
    # without fused_lm_head the model's own forward runs: logits, as generation needs
    assert tiny_lora(input_ids=ids[:1]).logits.shape == (1, 12, tiny_lora.config.vocab_size)
    # a micro-batch with no labelled token is a differentiable zero, not 0/0
    empty = tiny_lora(
        input_ids=ids, attention_mask=mask, labels=torch.full_like(ids, -100), fused_lm_head=True
    )
    empty.loss.backward()
    assert empty.loss.item() == 0.0


def test_install_refuses_what_it_cannot_compute_exactly():
    from tests.tiny import build_model, build_tokenizer

    model = build_model(build_tokenizer(), seed=2)  # not wrapped in LoRA: the tied head is trainable
    with pytest.raises(QatuneError, match="frozen, bias-free LM head"):
        lm_head.install(model)
    model.requires_grad_(False)
    model.config.logits_scaling = 8.0
    with pytest.raises(QatuneError, match="'logits_scaling' logit scaling"):
        lm_head.install(model)
    model.config.logits_scaling = None
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(QatuneError, match="soft-capping"):
        lm_head.install(model)


def test_trl_trainers_built_inside_the_context_use_qatunes_head(tmp_path, monkeypatch):
    """TRL adds its head (and DPO precomputes reference log-probs) in __init__: the swap must cover it."""
    import trl.trainer.dpo_trainer as dpo_module
    import trl.trainer.sft_trainer as sft_module
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tests.tiny import build_model, build_tokenizer

    calls = []
    real_apply = lm_head.AnswerLogProbs.apply
    monkeypatch.setattr(
        lm_head.AnswerLogProbs, "apply", lambda *a: calls.append(a[0].shape) or real_apply(*a)
    )
    originals = (sft_module.add_fused_lm_head, dpo_module.add_fused_lm_head)
    tok = build_tokenizer()
    rows = [
        {
            "prompt": [{"role": "user", "content": "how much protein"}],
            "completion": [{"role": "assistant", "content": "about 1.6 g per kg"}],
        }
    ] * 4
    config = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=1,
        per_device_train_batch_size=2,
        report_to=["none"],
        bf16=False,
    )
    with lm_head.in_trl_trainers("qatune"):
        assert sft_module.add_fused_lm_head is not originals[0]
        trainer = SFTTrainer(
            model=build_model(tok, seed=3),
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            peft_config=LoraConfig(r=2, target_modules=["q_proj"]),
        )
    assert (sft_module.add_fused_lm_head, dpo_module.add_fused_lm_head) == originals  # restored
    trainer.train()
    assert calls and trainer.state.log_history[-1]["train_loss"] > 0
    with lm_head.in_trl_trainers("trl"):  # the other choice leaves TRL alone
        assert sft_module.add_fused_lm_head is originals[0]


@pytest.mark.parametrize(
    ("method", "head"),
    [("dpo", "qatune"), ("kto", "trl")],  # installed trl 1.16: KTOTrainer adds TRL's head by its own name
)
def test_the_run_records_the_head_that_really_trained(method, head, tmp_path, monkeypatch, capsys):
    """metrics/<stage>.json's lm_head (training.run_metrics) is what computed the training step's
    log-probabilities, not what train.lm_head asked for: a trainer the swap does not reach says "trl"."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from qatune import training
    from tests.tiny import build_model, build_tokenizer

    calls = []
    real_apply = lm_head.AnswerLogProbs.apply
    monkeypatch.setattr(lm_head.AnswerLogProbs, "apply", lambda *a: calls.append(1) or real_apply(*a))
    tok = build_tokenizer()
    prompt = [{"role": "user", "content": "how much protein"}]
    good = [{"role": "assistant", "content": "about 1.6 g per kg"}]
    bad = [{"role": "assistant", "content": "as much as you can eat"}]
    common = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "report_to": ["none"],
        "bf16": False,
        "save_strategy": "no",
        "precompute_ref_log_probs": False,
    }
    if method == "kto":
        rows = [{"prompt": prompt, "completion": c, "label": c is good} for c in (good, bad)] * 2
        Trainer, config = KTOTrainer, KTOConfig(**common)
    else:
        rows = [{"prompt": prompt, "chosen": good, "rejected": bad}] * 2
        Trainer, config = DPOTrainer, DPOConfig(**common)
    with lm_head.in_trl_trainers("qatune"):  # what train.lm_head auto resolves to on CPU
        trainer = Trainer(
            model=build_model(tok, seed=3),
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            peft_config=LoraConfig(r=2, target_modules=["q_proj"]),
        )
    said = capsys.readouterr().out
    from transformers.trainer_utils import TrainOutput
    from trl.trainer import utils as trl_utils

    if head == "trl" and getattr(trl_utils, "_ChunkedLogProbFunction", True) is None:
        # TRL 1.15 (the CUDA-stack tier) builds its fused head on triton, which that CPU venv lacks: TRL's
        # head cannot run a step there, so the record is checked without one (qatune's head never ran)
        result = TrainOutput(global_step=0, training_loss=0.0, metrics={})
    else:
        result = trainer.train()
    assert bool(calls) == (head == "qatune")  # qatune's head computed the step, or it never ran
    hw = hardware.Hardware(
        cuda=False,
        cuda_bf16=False,
        cpu_bf16=False,
        backend="transformers",
        precision="fp32",
        lm_head="qatune",
        device="cpu",
    )
    assert training.run_metrics(trainer, training.Run({}, {}, result, 1.0, 0), hw)["lm_head"] == head
    assert ("records lm_head: trl" in said) == (head == "trl")
