"""dpo: preference optimisation of the SFT adapter (TRL DPOTrainer); the reference model is the SFT model.

    python stages/dpo.py --params params.yaml --model models/base --sft models/sft --data data/split \
        --out models/dpo --checkpoints models/dpo-checkpoints --metrics metrics/dpo.json --plots metrics/dpo

Reads `seed`, `beta`, `train` and `dpo`. The SFT adapter is loaded trainable on the base model with no
peft_config, so TRL keeps a frozen copy of it as the reference (step 0: margins 0, loss ln 2) and the
final adapter stays relative to the original base. With `dpo.enabled: false` the SFT adapter is copied
to --out unchanged, so downstream stages always read --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from qatune import lm_head
from qatune import trainer_setup as ts
from qatune.errors import QatuneError, fail_cleanly
from qatune.io import read_jsonl, write_json
from qatune.params import load_params
from qatune.train import (
    chat_template_for_training,
    conversation,
    dpo_example,
    git_commit,
    peak_memory_gb,
    sha256_files,
    warmup,
    write_history,
)

# Seed 000's metrics table, logged by TRL at every logging step.
TABLE = [
    "loss",
    "grad_norm",
    "learning_rate",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "epoch",
]
CURVES = {
    "loss": ["loss", "eval_loss"],
    "rewards": ["rewards/chosen", "rewards/rejected", "rewards/margins"],
    "accuracies": ["rewards/accuracies", "eval_rewards/accuracies"],
    "logps": ["logps/chosen", "logps/rejected"],
    "logits": ["logits/chosen", "logits/rejected"],
    "learning_rate": ["learning_rate"],
    "grad_norm": ["grad_norm"],
}


def on_policy_rejected(
    model, tokenizer, rows: list[dict], system_prompt: str | None, max_new_tokens: int, batch_size: int
) -> list[dict]:
    """Rows without a rejected answer get the SFT model's own greedy answer as rejected."""
    import torch

    need = [r for r in rows if r.get("rejected") is None]
    tokenizer.padding_side = "left"
    model.eval()
    for start in range(0, len(need), batch_size):
        batch = need[start : start + batch_size]
        texts = [
            tokenizer.apply_chat_template(
                conversation(r, system_prompt), tokenize=False, add_generation_prompt=True
            )
            for r in batch
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        for row, ids in zip(batch, out[:, enc["input_ids"].shape[1] :], strict=True):
            row["rejected"] = tokenizer.decode(ids, skip_special_tokens=True).strip() or "(no answer)"
    tokenizer.padding_side = "right"
    model.train()
    return [r for r in rows if r["rejected"] and r["rejected"] != r["chosen"]]


def skip(args, params) -> None:
    """DPO switched off: pass the SFT adapter through, and say so in the metrics."""
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(args.sft, out)
    write_json(args.metrics, {"enabled": False, "adapter": "sft"})
    write_history([], Path(args.plots), CURVES)
    print("dpo: disabled (dpo.enabled: false); the SFT adapter is the final adapter")


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml", help="params file to read")
    parser.add_argument("--model", default="models/base", help="base model folder from fetch")
    parser.add_argument("--sft", default="models/sft", help="SFT adapter folder")
    parser.add_argument("--data", default="data/split", help="folder with train/val/test jsonl")
    parser.add_argument("--out", default="models/dpo", help="final adapter output folder")
    parser.add_argument("--checkpoints", default="models/dpo-checkpoints", help="resumable checkpoints")
    parser.add_argument("--metrics", default="metrics/dpo.json", help="summary metrics file")
    parser.add_argument("--plots", default="metrics/dpo", help="folder for per-step curves")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    train, cfg = params.train, params.dpo
    ts.require(args.sft, "SFT adapter")
    if not cfg.enabled:
        return skip(args, params)
    ts.relaunch_distributed(train.num_processes)

    import torch
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(params.seed)
    hw = ts.resolve_hardware(train)
    model, tokenizer = ts.load_base(str(ts.require(args.model, "base model")), train, hw, cfg.max_length)
    tokenizer.chat_template, _ = chat_template_for_training(tokenizer.chat_template)
    # Trainable SFT adapter, no peft_config: TRL copies it as the frozen reference ("ref" adapter).
    model = PeftModel.from_pretrained(model, args.sft, is_trainable=True)

    data = Path(args.data)
    rows = {s: read_jsonl(ts.require(data / f"{s}.jsonl", f"{s} split")) for s in ("train", "val")}
    rows["val"] = rows["val"][: cfg.eval_rows or None]  # the splits are already shuffled
    if cfg.on_policy_pairs:
        rows = {
            s: on_policy_rejected(
                model, tokenizer, rs, train.system_prompt, cfg.on_policy_max_new_tokens, cfg.batch_size * 4
            )
            for s, rs in rows.items()
        }
    pairs = {s: [r for r in rs if r.get("rejected")] for s, rs in rows.items()}
    if (
        cfg.max_steps > 0
    ):  # only the pairs the run will see: reference log-probs are precomputed for all of them
        world = int(os.environ.get("WORLD_SIZE", "1"))
        pairs["train"] = pairs["train"][: cfg.max_steps * cfg.batch_size * cfg.grad_accum * world]
    if not pairs["train"]:
        raise QatuneError(
            f"{data / 'train.jsonl'}: no rows with a rejected answer; set dpo.on_policy_pairs: true "
            "to make pairs from the SFT model's own answers, or dpo.enabled: false"
        )
    sets = {
        s: Dataset.from_list([dpo_example(r, train.system_prompt) for r in ps]) for s, ps in pairs.items()
    }

    data_hash = sha256_files([data / f"{s}.jsonl" for s in ("train", "val", "test")])
    base_info = json.loads((Path(args.model) / ts.PROVENANCE_BASE).read_text())
    fingerprint = (
        sha256_files([args.params, Path(args.sft) / "adapter_model.safetensors"])
        + data_hash
        + json.dumps(base_info, sort_keys=True)
    )
    resume = ts.prepare_checkpoints(Path(args.checkpoints), fingerprint)

    config = DPOConfig(
        **ts.common_args(train, hw, params.seed, args.checkpoints),
        beta=params.beta,
        loss_type=list(cfg.loss_type),
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=warmup(cfg),
        lr_scheduler_type=cfg.scheduler,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=cfg.load_best_model_at_end,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        max_length=cfg.max_length,
        truncation_mode="keep_start",
    )
    callbacks = []
    with lm_head.in_trl_trainers(hw["lm_head"]):
        trainer = DPOTrainer(
            model=model,
            ref_model=None,
            args=config,
            train_dataset=sets["train"],
            eval_dataset=sets["val"],
            processing_class=tokenizer,
            callbacks=callbacks,
        )

    before = trainer.evaluate()  # step 0: policy == reference, so margins 0 and loss ln 2
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    runtime = time.perf_counter() - start
    after = trainer.evaluate()
    if not trainer.is_world_process_zero():
        return

    out = Path(args.out)
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    logged = [e for e in trainer.state.log_history if "rewards/margins" in e]
    last = logged[-1] if logged else {}
    metrics = {
        "enabled": True,
        "backend": hw["backend"],
        "precision": hw["precision"],
        "lm_head": hw["lm_head"],
        "device": hw["device"],
        "beta": params.beta,
        "steps": trainer.state.global_step,
        "pairs": len(pairs["train"]),
        "train_loss": round(result.training_loss, 4),
        "train_runtime_s": round(runtime, 1),
        "resumed": resume,
        "train": {k: last.get(k) for k in TABLE},
        "eval_before": {
            k.removeprefix("eval_"): v for k, v in before.items() if "/" in k or k == "eval_loss"
        },
        "eval": {k.removeprefix("eval_"): v for k, v in after.items() if "/" in k or k == "eval_loss"},
        **peak_memory_gb(),
    }
    write_json(args.metrics, metrics)
    write_history(trainer.state.log_history, Path(args.plots), CURVES)
    ts.write_provenance(
        out,
        {
            "stage": "dpo",
            "params": params.model_dump(include={"seed", "beta", "train", "dpo"}),
            "base_model": base_info,
            "sft_adapter": args.sft,
            "data_sha256": data_hash,
            "git_commit": git_commit(),
            "metrics": metrics,
        },
    )
    print(
        f"dpo: loss {metrics['train_loss']}, eval margins {metrics['eval_before'].get('rewards/margins')} -> "
        f"{metrics['eval'].get('rewards/margins')}, accuracy {metrics['eval'].get('rewards/accuracies')}"
    )


if __name__ == "__main__":
    main()
