"""sft: LoRA supervised fine-tuning on the chosen answers (TRL SFTTrainer, Unsloth on CUDA).

    python stages/sft.py --params params.yaml --model models/base --data data/split \
        --out models/sft --checkpoints models/sft-checkpoints --metrics metrics/sft.json --plots metrics/sft

Reads `seed`, `train` and `sft`. Loss is on assistant tokens only. Validation loss is measured before and
after training on the same rows. Writes the adapter + tokenizer + qatune_provenance.json to --out,
metrics/sft.json, per-step curves (DVC plots) and history.csv. Killed mid-run, it resumes from the last
checkpoint in --checkpoints when run again with the same params blocks, data, base model and code; run again
after it finished, it trains no further step and writes the finished run's adapter and metrics again.
With `sft.enabled: false` (seed 000: DPO straight from the base) --out holds no adapter, only a note
saying so, and the dpo stage starts from the base with the base as its reference.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qatune import hardware, modeling, plan, training
from qatune.errors import QatuneError, fail_cleanly, require
from qatune.focus import focus_first
from qatune.io import read_jsonl, write_json
from qatune.params import load_params
from qatune.templates import sft_example, use_training_template

CURVES = {"loss": ["loss", "eval_loss"], "learning_rate": ["learning_rate"], "grad_norm": ["grad_norm"]}
DISABLED = "qatune_sft_disabled.json"  # what --out holds when there is no SFT run


def skip(args) -> None:
    """SFT switched off: no adapter, and the metrics and the output folder say so."""
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    write_json(out / DISABLED, {"enabled": False, "adapter": None, "note": "sft.enabled is false"})
    write_json(args.metrics, {"method": "none", "enabled": False, "adapter": None})
    training.write_history([], Path(args.plots), CURVES)
    # every output dvc.yaml lists exists, or `dvc repro` stops here; checkpoints of an earlier SFT run are kept
    Path(args.checkpoints).mkdir(parents=True, exist_ok=True)
    print("sft: disabled (sft.enabled: false); the preference stage starts from the base model")


def training_examples(data: Path, train, cfg, loss_mode: str, kwargs: dict | None) -> dict[str, list[dict]]:
    """The train and val examples, one per row with an answer to learn (KTO's lone bad answers never): val
    capped by eval_rows (the splits are already shuffled); with focus_rows and max_steps the rows the run
    draws, those that teach safety and correctness first, then the rest as the split shuffled them."""
    rows = {s: read_jsonl(require(data / f"{s}.jsonl", f"{s} split")) for s in ("train", "val")}
    rows = {s: [r for r in rs if r["chosen"]] for s, rs in rows.items()}
    rows["val"] = rows["val"][: cfg.eval_rows or None]
    if cfg.focus_rows and cfg.max_steps > 0:
        rows["train"] = focus_first(rows["train"], cfg.focus_rows)[: training.rows_per_run(cfg)]
    return {
        s: [sft_example(r, train.system_prompt, loss_mode, cfg.train_turns, kwargs) for r in rs]
        for s, rs in rows.items()
    }


def build_trainer(params, hw: hardware.Hardware, model, tokenizer, peft_config, sets: dict, checkpoints: str):
    """TRL's SFTTrainer with the run's config (the loss on assistant tokens where the rows are conversations,
    length-grouped batches), training with the LM head chosen for this machine, LoRA weights in float32."""
    from trl import SFTConfig, SFTTrainer

    cfg = params.sft
    config = SFTConfig(
        **training.trainer_args(params.train, cfg, hw, params.seed, checkpoints),
        packing=cfg.packing,
        padding_free=cfg.padding_free,
        assistant_only_loss="messages" in sets["train"].column_names,
        train_sampling_strategy="group_by_length" if cfg.group_by_length and not cfg.packing else "random",
    )
    return training.build_trainer(
        SFTTrainer, config, model, tokenizer, peft_config, sets, "sft", params.train, cfg, hw
    )


def stage_metrics(
    trainer, run: training.Run, cfg, hw: hardware.Hardware, memory, examples: dict, loss_mode: str
):
    """metrics/sft.json: the run and its memory plan, the rows and real tokens trained, the throughput, and the
    validation rows scored before and after (with seed 002's perplexity)."""
    real_tokens = training.count_real_tokens(trainer.train_dataset)
    epochs = trainer.state.epoch or cfg.epochs
    return {
        "method": "sft",
        **training.run_metrics(trainer, run, hw),
        "memory_plan": memory.record(),
        "loss_mode": loss_mode,
        "train_rows": len(examples["train"]),
        "val_rows": len(examples["val"]),
        "train_tokens_per_epoch": real_tokens,
        "tokens_per_s": round(real_tokens * epochs / run.runtime, 1) if run.runtime > 0 else None,
        "eval_before": training.eval_summary(run.before, perplexity=True),
        "eval": training.eval_summary(run.after, perplexity=True),
    }


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    args = training.stage_parser(__doc__, "sft").parse_args(argv)
    params = load_params(args.params)
    train, cfg = params.train, params.sft
    if not cfg.enabled:
        return skip(args)
    training.relaunch_distributed(train)

    import torch

    # ---- model: the backend first (Unsloth must be imported before TRL), then the training template
    torch.manual_seed(params.seed)
    hw = hardware.resolve(train)
    arch = plan.load_arch(args.model)  # its peak memory on this machine, or a one-line stop before loading
    memory = plan.training("sft", arch, train, cfg, plan.machine(hw)).require()
    modeling.import_backend(hw.backend)
    from datasets import Dataset

    model, tokenizer = modeling.load_base(str(require(args.model, "base model")), train, hw, cfg.max_length)
    # the tokenizer gets the training template; `published`, the model's own, goes out with the adapter
    published, kwargs, loss_mode = use_training_template(tokenizer, train.enable_thinking)

    # ---- data
    data = Path(args.data)
    examples = training_examples(data, train, cfg, loss_mode, kwargs)
    sets = {s: Dataset.from_list(es) for s, es in examples.items()}

    # ---- checkpoints: resumed only when they belong to these params blocks, data, base and code
    blocks = params.model_dump(include={"seed", "train", "sft"})
    inputs = training.RunInputs.read(blocks, Path(args.model), data)
    resume = training.prepare_checkpoints(Path(args.checkpoints), inputs.fingerprint())

    # ---- trainer
    if hw.backend == "unsloth":
        model, peft_config = modeling.unsloth_peft(model, train, params.seed), None
    else:
        peft_config = modeling.lora_config(train)
    trainer = build_trainer(params, hw, model, tokenizer, peft_config, sets, args.checkpoints)
    if len(trainer.train_dataset) == 0:
        raise QatuneError(
            f"{data / 'train.jsonl'}: no training rows left after tokenising (every answer was cut off "
            f"by sft.max_length={cfg.max_length}); raise sft.max_length"
        )

    # ---- train, with the same validation rows scored before and after (a finished run: taken over as it is)
    run = training.evaluate_train_evaluate(trainer, Path(args.checkpoints), resume)
    if not trainer.is_world_process_zero():
        return training.save_on_every_rank(trainer, Path(args.out))  # FSDP gathers the adapter

    # ---- outputs
    metrics = stage_metrics(trainer, run, cfg, hw, memory, examples, loss_mode)
    record = {"stage": "sft", **inputs.record()}
    record["quantization"] = modeling.quantization_record(model, train, hw.backend)
    training.save_run(trainer, tokenizer, args, metrics, curves=CURVES, template=published, record=record)
    print(
        f"sft: train loss {metrics['train_loss']}, val loss {metrics['eval_before']['loss']:.4f} -> "
        f"{metrics['eval']['loss']:.4f}, {metrics['tokens_per_s']} tok/s"
    )


if __name__ == "__main__":
    main()
