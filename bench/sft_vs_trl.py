"""SFT throughput: qatune's sft stage configuration vs a plain TRL SFTTrainer with its defaults.

    python bench/sft_vs_trl.py                    # 12 steps per arm, all three arms (~6 min on 2 cores)
    python bench/sft_vs_trl.py --steps 30 --arms qatune,trl

Arms, each in its own process, same base model (models/base), same rows (data/split/train.jsonl), same
LoRA r/alpha/targets, same steps, batch size and learning rate:
- qatune:   what stages/sft.py builds from params.yaml (qatune.training.trainer_args + qatune.modeling):
            precision auto (bf16 autocast on AVX512-BF16/AMX CPUs, fp32 elsewhere), activation
            checkpointing as train.activation_checkpointing says, group_by_length batches,
            assistant-only loss through qatune's marked ChatML template, and train.lm_head (auto: on CPU
            qatune's tiled answer-only LM head, src/qatune/lm_head.py, instead of TRL's).
- trl:      SFTConfig() as TRL 1.16 documents it: bf16=True (TRL's own default), activation checkpointing
            on (TRL's default), random batches padded to the longest, no packing; prompt/completion rows,
            so TRL's default completion-only loss trains on the same answer tokens as qatune's.
- trl-fp32: the same with bf16=False: the plain fp32 trainer most tutorials start from.
- qatune-flip-ckpt: qatune with train.activation_checkpointing flipped (not in the default set): the other
            side of the speed / memory trade-off, measured in the same run.
- qatune-ckpt-S: qatune with activation checkpointing on a share S of the decoder layers
            (train.checkpoint_layers; qatune-ckpt-1 = every layer, qatune-ckpt-0 = off), e.g.
            --arms qatune-ckpt-1,qatune-ckpt-0.5,qatune-ckpt-0 --name sft_checkpointing
Measured: real (non-padding) tokens/s over the training steps (model loading, tokenising and the
first step excluded: see `steady`), the same including step 1, peak RSS of the arm's process, the
mean training loss over the run (different batches per arm: informational) and the eval loss on the same
val rows after the same number of steps (the agreement check: |delta| < --tolerance nats). Writes bench/results/sft_vs_trl.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

import _common as common

ARMS = ("qatune", "qatune-flip-ckpt", "qatune-ckpt-S", "trl", "trl-fp32")


def checkpoint_share(arm: str) -> float | None:
    """The share of checkpointed layers a `qatune-ckpt-S` arm asks for (0 = off); None for other arms."""
    if not arm.startswith("qatune-ckpt-"):
        return None
    share = float(arm.removeprefix("qatune-ckpt-"))
    if not 0 <= share <= 1:
        raise SystemExit(f"{arm}: the share of checkpointed layers is between 0 and 1")
    return share


class Counter:
    """Wraps a data collator: real (attention-mask) tokens, padded tokens and loss tokens per batch."""

    def __init__(self, collate):
        self.collate, self.real, self.padded, self.loss = collate, [], [], []

    def __call__(self, features):
        batch = self.collate(features)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        self.real.append(int(mask.sum()) if mask is not None else int(ids.numel()))
        self.padded.append(int(ids.numel()))
        labels = batch.get("labels")
        self.loss.append(int((labels != -100).sum()) if labels is not None else 0)
        return batch


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.ends, self.cpu = None, [], []

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()
            self.cpu.append(time.process_time())

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

    return StepTimer()


def run(arm: str, steps: int, params_path: str, eval_rows: int) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from qatune import compat, hardware, lm_head, modeling, training
    from qatune.io import read_jsonl
    from qatune.params import load_params
    from qatune.templates import chat_template_for_training, sft_example

    params = load_params(params_path)
    train, cfg = params.train, params.sft
    torch.manual_seed(params.seed)
    rows = read_jsonl("data/split/train.jsonl")
    val = read_jsonl("data/split/val.jsonl")[:eval_rows]
    out = tempfile.mkdtemp(prefix=f"qatune-bench-sft-{arm}-")
    # Same as stages/sft.py minus evaluation and checkpoints (neither arm evaluates or saves while timed).
    common_run = dict(
        max_steps=steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=["none"],
        seed=params.seed,
        disable_tqdm=True,
    )
    t_load = time.perf_counter()
    if arm.startswith("qatune"):
        if arm == "qatune-flip-ckpt":  # the other side of the speed / memory trade-off
            train = train.model_copy(update={"activation_checkpointing": not train.activation_checkpointing})
        if (share := checkpoint_share(arm)) is not None:
            train = train.model_copy(
                update={"activation_checkpointing": share > 0, "checkpoint_layers": share or 1.0}
            )
        hw = hardware.resolve(train)
        model, tok = modeling.load_base("models/base", train, hw, cfg.max_length)
        tok.chat_template, loss_mode = chat_template_for_training(tok)
        args = {**training.trainer_args(train, cfg, hw, params.seed, out), **common_run}
        args["load_best_model_at_end"] = False  # nothing is evaluated or saved while timed
        config = SFTConfig(
            **args,
            packing=cfg.packing,
            padding_free=cfg.padding_free,
            assistant_only_loss=loss_mode == "assistant_only",
            train_sampling_strategy="group_by_length"
            if cfg.group_by_length and not cfg.packing
            else "random",
        )
        peft_config = modeling.lora_config(train)
        precision = hw.precision
        head = hw.lm_head
    else:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer

        loss_mode = "completion_only"  # TRL's default for prompt/completion rows
        tok = AutoTokenizer.from_pretrained("models/base")
        model = AutoModelForCausalLM.from_pretrained("models/base", dtype=torch.float32)
        extra = {"bf16": False} if arm == "trl-fp32" else {}
        config = SFTConfig(output_dir=out, use_cpu=True, **common_run, **extra)
        peft_config = LoraConfig(
            r=train.lora.r,
            lora_alpha=train.lora.alpha,
            target_modules=list(train.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        precision = "bf16" if config.bf16 else "fp32"
        head = "trl"
    to_set = lambda rs: Dataset.from_list([sft_example(r, train.system_prompt, loss_mode) for r in rs])  # noqa: E731
    timer = step_timer()
    with lm_head.in_trl_trainers(head):
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=to_set(rows),
            eval_dataset=to_set(val),
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[timer, *training.callbacks(train, cfg, "sft", hw)]
            if arm.startswith("qatune")
            else [timer],
        )
    setup_s = time.perf_counter() - t_load
    counter = Counter(trainer.data_collator)
    trainer.data_collator = counter
    result = trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]  # the counter sees eval batches after the train ones
    shutil.rmtree(out, ignore_errors=True)  # nothing is saved: only the trainer scratch folder
    accum = cfg.grad_accum
    real = [sum(counter.real[i * accum : (i + 1) * accum]) for i in range(steps)]
    padded = [sum(counter.padded[i * accum : (i + 1) * accum]) for i in range(steps)]
    ends = timer.ends
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "arm": arm,
        "precision": precision,
        "activation_checkpointing": bool(getattr(config, compat.checkpointing_key(compat.training_fields()))),
        "checkpoint_layers": hw.checkpoint_layers if arm.startswith("qatune") else 1.0,
        "lm_head": head,
        "sampling": getattr(config, "train_sampling_strategy", "random"),
        "loss_mode": loss_mode,
        "steps": len(ends),
        "batch_size": cfg.batch_size,
        "grad_accum": accum,
        "learning_rate": cfg.learning_rate,
        "setup_s": round(setup_s, 1),
        "train_s": round(ends[-1] - timer.begin, 2),
        "step_s": [round(b - a, 2) for a, b in zip([timer.begin, *ends[:-1]], ends, strict=True)],
        "real_tokens": sum(real),
        "padded_tokens": sum(padded),
        "padding_fraction": round(1 - sum(real) / sum(padded), 4),
        "tokens_per_s": round(sum(real) / (ends[-1] - timer.begin), 1),
        # steady state: steps 2..N (step 1 carries one-off costs: optimizer state, autocast caches)
        "tokens_per_s_steady": round(sum(real[1:]) / (ends[-1] - ends[0]), 1) if len(ends) > 1 else None,
        # CPU seconds of this process (all threads) over the steps: less sensitive than wall time to other
        # processes on a shared machine; tokens per CPU-second x threads ~ tokens/s on an idle machine.
        "train_cpu_s": round(timer.cpu[-1] - timer.cpu[0], 2),
        "tokens_per_cpu_s": round(sum(real) / (timer.cpu[-1] - timer.cpu[0]), 1),
        "train_loss_mean": round(result.training_loss, 4),
        "loss_last": round(losses[-1], 4) if losses else None,
        "loss_per_step": [round(x, 4) for x in losses],
        "eval_loss": round(eval_loss, 4),
        "eval_rows": len(val),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per arm (same for every arm)")
    parser.add_argument("--arms", default=None, help=f"comma-separated subset of {ARMS}")
    parser.add_argument("--params", default="params.yaml", help="params file (its sft and train blocks)")
    parser.add_argument("--eval-rows", type=int, default=16, help="val rows scored after training, per arm")
    parser.add_argument("--tolerance", type=float, default=0.1, help="max |loss difference| in nats")
    parser.add_argument("--name", default="sft_vs_trl", help="results file: bench/results/<name>.json")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm and print its JSON
    args = parser.parse_args(argv)
    if args.arm:
        common.emit(run(args.arm, args.steps, args.params, args.eval_rows))
        return
    if args.arms is None:  # TRL's bf16 default is emulated on CPUs without bf16: > 18 min for 4 steps there
        from qatune.hardware import cpu_has_bf16

        args.arms = "qatune,trl,trl-fp32" if cpu_has_bf16() else "qatune,trl-fp32"
    arms = [a for a in args.arms.split(",") if a]
    flags = ["--steps", str(args.steps), "--params", args.params, "--eval-rows", str(args.eval_rows)]
    before = common.machine()
    results = {a: common.run_arm(__file__, a, flags) for a in arms}
    after = common.machine()["loadavg_1_5_15"]
    ref = "trl" if "trl" in results else arms[-1]
    q = results.get("qatune")
    ratios = {}
    if q:
        for a, r in results.items():
            if a.startswith("qatune"):
                continue
            ratios[a] = {
                "tokens_per_s": round(q["tokens_per_s"] / r["tokens_per_s"], 2),
                "tokens_per_s_steady": round(q["tokens_per_s_steady"] / r["tokens_per_s_steady"], 2)
                if q["tokens_per_s_steady"] and r["tokens_per_s_steady"]
                else None,
                "tokens_per_cpu_s": round(q["tokens_per_cpu_s"] / r["tokens_per_cpu_s"], 2),
                "peak_rss": round(q["peak_rss_gb"] / r["peak_rss_gb"], 2),
                "train_loss_delta": round(q["train_loss_mean"] - r["train_loss_mean"], 4),
                "eval_loss_delta": round(q["eval_loss"] - r["eval_loss"], 4),
                # The check is on the same val rows after the same number of steps; the mean training
                # loss is over different batches (length-grouped vs random), so it is reported, not gated.
                "losses_agree": abs(q["eval_loss"] - r["eval_loss"]) < args.tolerance,
            }
    out = {
        "machine": before,
        "loadavg_after": after,
        "steps": args.steps,
        "tolerance_nats": args.tolerance,
        "arms": results,
        "ratios_qatune_over": ratios,
        "goal": "qatune >= 2x the tokens/s of plain TRL at no more peak RSS",
    }
    if q and ref in ratios:
        r = ratios[ref]
        summary = (
            f"sft_vs_trl: qatune {q['tokens_per_s']} vs {ref} {results[ref]['tokens_per_s']} real tok/s = "
            f"{r['tokens_per_s']}x (steady {r['tokens_per_s_steady']}x, per CPU-second {r['tokens_per_cpu_s']}x); peak RSS {q['peak_rss_gb']} vs "
            f"{results[ref]['peak_rss_gb']} GB; eval loss delta {r['eval_loss_delta']:+} "
            f"({'agree' if r['losses_agree'] else 'DISAGREE'} within {args.tolerance}); {args.steps} steps; "
            f"load {before['loadavg_1_5_15'][0]}"
        )
        if "trl-fp32" in ratios and ref != "trl-fp32":
            summary += f"; vs trl-fp32 {ratios['trl-fp32']['tokens_per_s']}x"
        if flip := results.get("qatune-flip-ckpt"):
            ckpt = "on" if flip["activation_checkpointing"] else "off"
            summary += (
                f"; qatune with activation checkpointing {ckpt}: {flip['tokens_per_s']} tok/s "
                f"({flip['tokens_per_s'] / results[ref]['tokens_per_s']:.2f}x), {flip['peak_rss_gb']} GB"
            )
    else:
        summary = f"{args.name}: " + json.dumps(
            {
                a: {"tok/s": r["tokens_per_s"], "steady": r["tokens_per_s_steady"], "GB": r["peak_rss_gb"]}
                for a, r in results.items()
            }
        )
    common.save(args.name, out, summary)


if __name__ == "__main__":
    sys.exit(main())
