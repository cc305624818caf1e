"""Model FLOPs utilisation of LoRA training steps against this machine's matmul peak, both measured here.

    python bench/mfu.py                      # peak: 3 repeats x ~3 s per size and dtype; 4 timed steps per mode
    python bench/mfu.py --steps 8 --batch-size 4 --seconds 5

1. Peak: torch.matmul at each of --sizes (square n x n, plus the model's own widest projection,
   batch tokens x 576 x 1536), fp32 and bf16, all torch threads, --seconds per repeat, --repeats repeats
   (median per shape); the peak is the best shape's rate. 2·m·k·n FLOPs per product.
2. Training: SmolLM2-135M (models/base) as the sft stage trains it: params.yaml's LoRA, train.lm_head
   (qatune's answer-only head on CPU), train.activation_checkpointing, loss on the answer tokens only; one
   fixed batch of --batch-size rows from data/split/train.jsonl (similar lengths, chat-templated as the sft
   stage does), forward + backward + AdamW step; fp32, then bf16 autocast where the CPU has bf16 (what
   precision: auto picks; emulated bf16 on other CPUs is not worth timing: --bf16 forces it). One untimed
   warm-up step, then --steps timed steps (median). Also a DPO-shaped step: a no-grad reference forward
   with the adapter disabled, plus the policy forward/backward on the same batch.
Achieved model FLOPs per step, N = all parameters, N_head = the tied 49k-vocabulary head (28 M of 135 M):
- "4N": k·N·real tokens, the issue's convention: k = 4 for LoRA SFT (forward 2N + activation gradients 2N;
  frozen weights need no weight gradients), 6 for LoRA DPO (policy 4N + reference forward 2N);
- "needed": the same with the head counted only on the answer tokens, which are the only positions that
  need it (qatune's head skips the rest). MFU is reported on this count: work skipped is not work done.
Activation checkpointing's recomputed forward is not counted (the usual MFU convention), nor are attention's
sequence-dependent FLOPs (~2-4% at 260 tokens), so MFU is slightly understated.
MFU = achieved / fp32 matmul peak (the issue's goal: >= 70%), also shown against the bf16 peak.
Writes bench/results/mfu.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import _common as common


def matmul_rate(dtype_name: str, shape: tuple[int, int, int], seconds: float, repeats: int) -> dict:
    import torch

    m, k, n = shape
    dtype = getattr(torch, dtype_name)
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    torch.matmul(a, b)  # warm-up: oneDNN/BLAS kernel selection
    rates, cpu_rates = [], []
    threads = torch.get_num_threads()
    for _ in range(repeats):
        count, start, cpu0 = 0, time.perf_counter(), time.process_time()
        while (elapsed := time.perf_counter() - start) < seconds:
            torch.matmul(a, b)
            count += 1
        rates.append(2 * m * k * n * count / elapsed / 1e9)
        # per CPU-second x threads: the rate with the threads to itself (robust to a shared machine)
        cpu_rates.append(2 * m * k * n * count / ((time.process_time() - cpu0) / threads) / 1e9)
    return {
        "gflops": round(common.median(rates), 1),
        "repeats_gflops": [round(r, 1) for r in rates],
        "gflops_cpu_normalised": round(common.median(cpu_rates), 1),
    }


def matmul_peak(dtype_name: str, shapes: list[tuple[int, int, int]], seconds: float, repeats: int) -> dict:
    """The best median rate over `shapes`: the most this machine's BLAS gets out of a matmul."""
    by_shape = {"x".join(map(str, s)): matmul_rate(dtype_name, s, seconds, repeats) for s in shapes}
    best = max(by_shape, key=lambda s: by_shape[s]["gflops"])
    return {**by_shape[best], "shape": best, "by_shape": {s: r["gflops"] for s, r in by_shape.items()}}


def fixed_batch(tokenizer, batch_size: int, system_prompt: str | None):
    """`batch_size` rows of similar length (the middle of the length distribution), as the sft stage sees them."""
    import torch

    from qatune.io import read_jsonl
    from qatune.templates import conversation

    rows = read_jsonl("data/split/train.jsonl")
    encoded, prompt_lengths = [], {}
    for r in rows:
        prompt = conversation(r, system_prompt)
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": r["chosen"]}], tokenize=False
        )
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        encoded.append(ids)
        prompt_lengths[tuple(ids)] = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    encoded.sort(key=len)
    mid = len(encoded) // 2
    picked = encoded[mid - batch_size // 2 : mid - batch_size // 2 + batch_size]
    width = max(len(x) for x in picked)
    ids = torch.full((len(picked), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(picked):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    for i, x in enumerate(picked):  # loss on the answer only, as the sft stage trains
        labels[i, : prompt_lengths[tuple(x)]] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_steps(
    model, batch, optimizer, bf16: bool, steps: int, dpo: bool
) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds) per step: forward, backward, optimizer step (plus a no-grad reference forward for DPO)."""
    import contextlib

    import torch

    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    times, cpu = [], []
    for _ in range(steps + 1):  # the first step is a warm-up (optimizer state, kernel selection)
        start, cpu0 = time.perf_counter(), time.process_time()
        with autocast():
            if dpo:
                with torch.no_grad(), model.disable_adapter():
                    model(**batch, fused_lm_head=True)
            loss = model(**batch, fused_lm_head=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu0)
    return times[1:], cpu[1:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1024,2048", help="square matmul sizes tried for the peak")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per peak repeat")
    parser.add_argument("--repeats", type=int, default=3, help="peak repeats per dtype (median reported)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per mode (median)")
    parser.add_argument("--batch-size", type=int, default=4, help="rows in the fixed batch (params sft: 4)")
    parser.add_argument(
        "--bf16", action="store_true", help="time bf16 autocast even without CPU bf16 support"
    )
    parser.add_argument("--no-dpo", action="store_true", help="skip the DPO-shaped steps")
    parser.add_argument("--params", default="params.yaml", help="params file (train.lora, seed)")
    args = parser.parse_args(argv)

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qatune import hardware, lm_head, modeling
    from qatune.params import load_params

    params = load_params(args.params)
    torch.manual_seed(params.seed)
    info = common.machine()
    hw = hardware.resolve(params.train)
    tok = AutoTokenizer.from_pretrained("models/base")
    batch = fixed_batch(tok, args.batch_size, params.train.system_prompt)
    real = int(batch["attention_mask"].sum())
    answer = int((batch["labels"][:, 1:] != -100).sum())
    padded = int(batch["input_ids"].numel())
    shapes = [(n, n, n) for n in map(int, args.sizes.split(","))] + [(padded, 576, 1536)]
    peak = {d: matmul_peak(d, shapes, args.seconds, args.repeats) for d in ("float32", "bfloat16")}
    print(
        f"[bench] matmul peak fp32 {peak['float32']['gflops']} bf16 {peak['bfloat16']['gflops']} GFLOP/s",
        file=sys.stderr,
    )

    base = AutoModelForCausalLM.from_pretrained("models/base", dtype=torch.float32)
    n_params = sum(p.numel() for p in base.parameters())
    n_head = base.get_output_embeddings().weight.numel()
    model = get_peft_model(base, modeling.lora_config(params.train))
    if params.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if hw.lm_head == "qatune":
        lm_head.install(model.get_base_model())
    else:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=params.sft.learning_rate, fused=True
    )
    precisions = ["fp32"] + (["bf16"] if info["cpu_bf16"] or args.bf16 else [])
    methods = ["sft"] + ([] if args.no_dpo else ["dpo"])
    runs = {}
    for method in methods:
        for precision in precisions:
            k = 6 if method == "dpo" else 4
            times, cpu = train_steps(
                model, batch, optimizer, precision == "bf16", args.steps, method == "dpo"
            )
            step = common.median(times)
            flops = k * ((n_params - n_head) * real + n_head * answer)  # the head on answer tokens only
            achieved = flops / step / 1e9
            runs[f"{method}_{precision}"] = {
                "flops_per_token": f"{k}N",
                "step_s_median": round(step, 3),
                "step_s": [round(t, 3) for t in times],
                "tokens_per_s": round(real / step, 1),
                "achieved_gflops": round(achieved, 1),
                "achieved_gflops_4n_convention": round(k * n_params * real / step / 1e9, 1),
                "mfu_vs_fp32_peak": round(achieved / peak["float32"]["gflops"], 3),
                "mfu_vs_bf16_peak": round(achieved / peak["bfloat16"]["gflops"], 3),
                # counting pad positions too: what the hardware actually multiplied
                # CPU seconds / threads: the wall time this step would take with the threads to itself
                "step_cpu_s_per_thread": round(common.median(cpu) / torch.get_num_threads(), 3),
                "mfu_vs_fp32_peak_cpu_normalised": round(
                    k
                    * n_params
                    * real
                    / (common.median(cpu) / torch.get_num_threads())
                    / 1e9
                    / peak["float32"]["gflops_cpu_normalised"],
                    3,
                ),
                "hardware_gflops": round(k * n_params * padded / step / 1e9, 1),
            }
            print(
                f"[bench] {method} {precision}: {runs[f'{method}_{precision}']}", file=sys.stderr, flush=True
            )

    out = {
        "machine": info,
        "loadavg_after": common.machine()["loadavg_1_5_15"],
        "matmul_shapes": [list(s) for s in shapes],
        "peak_gflops": peak,
        "model_params": n_params,
        "head_params": n_head,
        "lm_head": hw.lm_head,
        "activation_checkpointing": params.train.activation_checkpointing,
        "batch": {
            "rows": args.batch_size,
            "real_tokens": real,
            "answer_tokens": answer,
            "padded_tokens": padded,
        },
        "runs": runs,
        "peak_rss_gb": common.peak_rss_gb(),
        "goal": "MFU >= 70% of the fp32 matmul peak",
    }
    s32 = runs["sft_fp32"]
    summary = (
        f"mfu: SFT fp32 {s32['achieved_gflops']} GFLOP/s = {s32['mfu_vs_fp32_peak']:.0%} of the fp32 peak "
        f"({peak['float32']['gflops']}, {peak['float32']['shape']}); 4N convention {s32['achieved_gflops_4n_convention']}"
    )
    if s16 := runs.get("sft_bf16"):
        summary += (
            f"; SFT bf16 {s16['achieved_gflops']} = {s16['mfu_vs_fp32_peak']:.0%} of fp32 peak, "
            f"{s16['mfu_vs_bf16_peak']:.0%} of bf16 peak ({peak['bfloat16']['gflops']})"
        )
    if "dpo_fp32" in runs:
        summary += f"; DPO fp32 {runs['dpo_fp32']['mfu_vs_fp32_peak']:.0%}"
    summary += f"; activation checkpointing {'on' if params.train.activation_checkpointing else 'off'}"
    summary += f"; load {info['loadavg_1_5_15'][0]}"
    common.save("mfu", out, summary)


if __name__ == "__main__":
    sys.exit(main())
