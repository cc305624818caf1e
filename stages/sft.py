"""sft: LoRA supervised fine-tuning on the chosen answers (TRL SFTTrainer, Unsloth on CUDA).

    python stages/sft.py --params params.yaml --model models/base --data data/split \
        --out models/sft --checkpoints models/sft-checkpoints --metrics metrics/sft.json --plots metrics/sft

Reads `seed`, `train` and `sft`. Loss is on assistant tokens only. Writes the adapter + tokenizer +
qatune_provenance.json to --out, metrics/sft.json, per-step curves (DVC plots) and history.csv.
Killed mid-run, it resumes from the last checkpoint in --checkpoints when run again with the same inputs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qatune import lm_head
from qatune import trainer_setup as ts
from qatune.errors import QatuneError, fail_cleanly
from qatune.io import read_jsonl, write_json
from qatune.params import load_params
from qatune.train import (
    chat_template_for_training,
    git_commit,
    peak_memory_gb,
    perplexity,
    sft_example,
    sha256_files,
    warmup,
    write_history,
)

CURVES = {"loss": ["loss", "eval_loss"], "learning_rate": ["learning_rate"], "grad_norm": ["grad_norm"]}


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml", help="params file to read")
    parser.add_argument("--model", default="models/base", help="base model folder from fetch")
    parser.add_argument("--data", default="data/split", help="folder with train/val/test jsonl")
    parser.add_argument("--out", default="models/sft", help="adapter output folder")
    parser.add_argument("--checkpoints", default="models/sft-checkpoints", help="resumable checkpoints")
    parser.add_argument("--metrics", default="metrics/sft.json", help="summary metrics file")
    parser.add_argument("--plots", default="metrics/sft", help="folder for per-step curves")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    train, cfg = params.train, params.sft
    ts.relaunch_distributed(train.num_processes)

    import torch
    from datasets import Dataset
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(params.seed)
    hw = ts.resolve_hardware(train)
    model, tokenizer = ts.load_base(str(ts.require(args.model, "base model")), train, hw, cfg.max_length)
    template, loss_mode = chat_template_for_training(tokenizer.chat_template)
    tokenizer.chat_template = template
    data = Path(args.data)
    rows = {s: read_jsonl(ts.require(data / f"{s}.jsonl", f"{s} split")) for s in ("train", "val", "test")}
    # Scoring costs a forward pass per row over a 49k vocabulary: cap val/test here (the splits are shuffled);
    # the evaluate stage scores the whole test split.
    for s in ("val", "test"):
        rows[s] = rows[s][: cfg.eval_rows or None]
    sets = {
        s: Dataset.from_list([sft_example(r, train.system_prompt, loss_mode) for r in rs])
        for s, rs in rows.items()
    }

    data_hash = sha256_files([data / f"{s}.jsonl" for s in ("train", "val", "test")])
    base_info = json.loads((Path(args.model) / ts.PROVENANCE_BASE).read_text())
    fingerprint = sha256_files([args.params]) + data_hash + json.dumps(base_info, sort_keys=True)
    resume = ts.prepare_checkpoints(Path(args.checkpoints), fingerprint)

    config = SFTConfig(
        **ts.common_args(train, hw, params.seed, args.checkpoints),
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
        packing=cfg.packing,
        padding_free=cfg.padding_free,
        assistant_only_loss=loss_mode == "assistant_only",
        train_sampling_strategy="group_by_length" if cfg.group_by_length and not cfg.packing else "random",
    )
    if hw["backend"] == "unsloth":
        model = ts.unsloth_peft(model, train, params.seed)
        peft_config = None
    else:
        peft_config = ts.lora_config(train)
    callbacks = [EarlyStoppingCallback(cfg.early_stopping_patience)] if cfg.early_stopping_patience else []
    with lm_head.in_trl_trainers(hw["lm_head"]):
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=sets["train"],
            eval_dataset=sets["val"],
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )

    if len(trainer.train_dataset) == 0:
        raise QatuneError(
            f"{data / 'train.jsonl'}: no training rows left after tokenising (every answer was cut off "
            f"by sft.max_length={cfg.max_length}); raise sft.max_length"
        )
    real_tokens = ts.count_real_tokens(trainer.train_dataset)
    test_before = trainer.evaluate(sets["test"], metric_key_prefix="test")["test_loss"]
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    runtime = time.perf_counter() - start
    final_eval = trainer.evaluate()
    test_after = trainer.evaluate(sets["test"], metric_key_prefix="test")["test_loss"]
    if not trainer.is_world_process_zero():
        return

    out = Path(args.out)
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    epochs_done = trainer.state.epoch or cfg.epochs
    metrics = {
        "backend": hw["backend"],
        "precision": hw["precision"],
        "lm_head": hw["lm_head"],
        "device": hw["device"],
        "loss_mode": loss_mode,
        "steps": trainer.state.global_step,
        "epochs": round(epochs_done, 3),
        "train_loss": round(result.training_loss, 4),
        "eval_loss": round(final_eval["eval_loss"], 4),
        "eval_perplexity": perplexity(final_eval["eval_loss"]),
        "best_eval_loss": trainer.state.best_metric,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "test_loss_base": round(test_before, 4),
        "test_loss": round(test_after, 4),
        "test_perplexity_base": perplexity(test_before),
        "test_perplexity": perplexity(test_after),
        "train_rows": len(rows["train"]),
        "train_tokens_per_epoch": real_tokens,
        "train_runtime_s": round(runtime, 1),
        "resumed": resume,
        "tokens_per_s": round(real_tokens * epochs_done / runtime, 1) if runtime > 0 else None,
        **peak_memory_gb(),
    }
    write_json(args.metrics, metrics)
    write_history(trainer.state.log_history, Path(args.plots), CURVES)
    ts.write_provenance(
        out,
        {
            "stage": "sft",
            "params": params.model_dump(include={"seed", "train", "sft"}),
            "base_model": base_info,
            "data_sha256": data_hash,
            "git_commit": git_commit(),
            "metrics": metrics,
        },
    )
    print(
        f"sft: train loss {metrics['train_loss']}, eval loss {metrics['eval_loss']}, test loss "
        f"{metrics['test_loss_base']} -> {metrics['test_loss']}, {metrics['tokens_per_s']} tok/s"
    )


if __name__ == "__main__":
    main()
