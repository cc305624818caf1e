"""DPO: reference log-probs computed once and reused (precompute_ref_log_probs) vs recomputed every step.

    python bench/dpo_ref.py                       # 16 pairs x 2 epochs, batch 2 x accum 4 = 4 steps per arm
    python bench/dpo_ref.py --pairs 64 --epochs 4 # seed 000's 4 epochs

Both arms build the trainer exactly as stages/dpo.py does (qatune.training.trainer_args + qatune.modeling,
params.yaml dpo block: batch, accumulation, beta, loss, precision auto) with the trainable SFT adapter
(models/sft) on models/base, and differ only in dpo.precompute_ref_log_probs. No evaluation, no saving.

Why the design: precomputing costs one no-grad reference forward per pair before training starts; it
saves that forward in every later step. Each pair is seen `--epochs` times, so with recompute the
reference forwards run epochs x pairs times instead of pairs times. With 1 epoch the two arms do the same
reference work (only the order differs) and the ratio is ~1.0 by construction; the default (2 epochs)
is the smallest case where reuse can pay, and seed 000 trains 4 epochs. The time measured is the
trainer's construction (where TRL 1.16 precomputes) plus train(), model loading excluded; both arms
in their own process. Writes bench/results/dpo_ref.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time

import _common as common


def run(arm: str, pairs: int, epochs: int, params_path: str, sft: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    from qatune import hardware, lm_head, modeling, training
    from qatune.io import read_jsonl
    from qatune.params import load_params
    from qatune.templates import chat_template_for_training, dpo_example

    params = load_params(params_path)
    train, cfg = params.train, params.dpo
    torch.manual_seed(params.seed)
    hw = hardware.resolve(train)
    model, tok = modeling.load_base("models/base", train, hw, cfg.max_length)
    tok.chat_template, _ = chat_template_for_training(tok)
    model = PeftModel.from_pretrained(model, sft, is_trainable=True)
    rows = [r for r in read_jsonl("data/split/train.jsonl") if r.get("rejected")][:pairs]
    dataset = Dataset.from_list([dpo_example(r, train.system_prompt) for r in rows])
    out = tempfile.mkdtemp(prefix=f"qatune-bench-dpo-{arm}-")
    config = DPOConfig(
        **{
            **training.trainer_args(train, cfg, hw, params.seed, out),
            "num_train_epochs": epochs,
            "max_steps": -1,
            "logging_steps": 1,
            "eval_strategy": "no",
            "save_strategy": "no",
            "load_best_model_at_end": False,
        },
        beta=params.beta,
        loss_type=list(cfg.loss_type),
        precompute_ref_log_probs=arm == "precompute",
        truncation_mode="keep_start",
    )
    config.disable_tqdm = True
    start, cpu0 = time.perf_counter(), time.process_time()
    with lm_head.in_trl_trainers(hw.lm_head):  # as stages/dpo.py: the precompute pass uses it too
        trainer = DPOTrainer(
            model=model, ref_model=None, args=config, train_dataset=dataset, processing_class=tok
        )
    built = time.perf_counter()
    result = trainer.train()
    end, cpu1 = time.perf_counter(), time.process_time()
    shutil.rmtree(out, ignore_errors=True)  # nothing is saved: only the trainer scratch folder
    logged = [e for e in trainer.state.log_history if "loss" in e]
    return {
        "arm": arm,
        "precision": hw.precision,
        "lm_head": hw.lm_head,
        "activation_checkpointing": train.activation_checkpointing,
        "pairs": len(rows),
        "epochs": epochs,
        "steps": trainer.state.global_step,
        "pair_passes": len(rows) * epochs,
        "reference_forwards": len(rows) * (1 if arm == "precompute" else epochs),
        "construct_s": round(built - start, 1),  # includes the precompute pass for that arm
        "train_s": round(end - built, 1),
        "total_s": round(end - start, 1),
        "total_cpu_s": round(cpu1 - cpu0, 1),  # all threads; robust to other load on a shared machine
        "pairs_per_s": round(len(rows) * epochs / (end - start), 3),
        "train_loss": round(result.training_loss, 5),
        "final_margin": logged[-1].get("rewards/margins") if logged else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=16, help="training pairs (first rows with a rejected)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs over those pairs (reuse needs >= 2)")
    parser.add_argument("--params", default="params.yaml", help="params file (dpo, train, beta, seed)")
    parser.add_argument("--sft", default="models/sft", help="SFT adapter the policy and reference start from")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm and print its JSON
    args = parser.parse_args(argv)
    flags = [
        "--pairs",
        str(args.pairs),
        "--epochs",
        str(args.epochs),
        "--params",
        args.params,
        "--sft",
        args.sft,
    ]
    if args.arm:
        common.emit(run(args.arm, args.pairs, args.epochs, args.params, args.sft))
        return
    info = common.machine()
    results = {a: common.run_arm(__file__, a, flags) for a in ("recompute", "precompute")}
    pre, rec = results["precompute"], results["recompute"]
    speedup = round(rec["total_s"] / pre["total_s"], 2)
    speedup_cpu = round(rec["total_cpu_s"] / pre["total_cpu_s"], 2)
    # Expected from the work alone: a policy step is ~4N/token (6N with activation checkpointing's second
    # forward) and a reference forward ~2N, so per pair-pass recompute costs policy + 2 units and precompute
    # policy + 2/epochs.
    policy = 6 if pre["activation_checkpointing"] else 4
    expected = round((policy + 2) / (policy + 2 / args.epochs), 2)
    out = {
        "machine": info,
        "loadavg_after": common.machine()["loadavg_1_5_15"],
        "arms": results,
        "speedup_precompute": speedup,
        "speedup_precompute_cpu_s": speedup_cpu,
        "expected_from_flops": expected,
        "loss_delta": round(pre["train_loss"] - rec["train_loss"], 5),
        "rss_ratio": round(pre["peak_rss_gb"] / rec["peak_rss_gb"], 2),
        "goal": "precompute >= 1.3x faster",
    }
    summary = (
        f"dpo_ref: precompute {pre['total_s']} s vs recompute {rec['total_s']} s = {speedup}x (CPU-s {speedup_cpu}x) "
        f"(FLOPs model {expected}x) over {pre['pairs']} pairs x {args.epochs} epochs ({pre['steps']} steps); "
        f"peak RSS {pre['peak_rss_gb']} vs {rec['peak_rss_gb']} GB; loss delta {out['loss_delta']:+}; "
        f"load {info['loadavg_1_5_15'][0]}"
    )
    common.save("dpo_ref", out, summary)


if __name__ == "__main__":
    sys.exit(main())
