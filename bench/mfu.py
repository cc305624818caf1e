"""Model FLOPs utilisation of LoRA training steps against this machine's matmul peak, both measured here.

    python bench/mfu.py                      # peak: 3 repeats x ~3 s per dtype; 4 timed steps per mode
    python bench/mfu.py --steps 8 --batch-size 8 --seconds 5

1. Peak: torch.matmul of two square matrices (--size), fp32 and bf16, all torch threads, --seconds per
   repeat, --repeats repeats (median). 2·n³ FLOPs per product.
2. Training: SmolLM2-135M (models/base) with qatune's LoRA config (params.yaml train.lora), one fixed batch of
   --batch-size real rows from data/split/train.jsonl (similar lengths, chat-templated as the sft stage does),
   forward + backward + AdamW step; fp32, then bf16 autocast (what precision: auto picks on AVX512-BF16 CPUs).
   One untimed warm-up step, then --steps timed steps (median). Also a DPO-shaped step: a no-grad reference
   forward with the adapter disabled, plus the policy forward/backward on the same batch.
Achieved FLOPs = k·N·real tokens per step, N = all model parameters (the tied 49k-vocabulary head is
a real matmul per token), k = 4 for LoRA SFT (forward 2N + activation gradients 2N; the frozen weights
need no weight gradients) and 6 for LoRA DPO (policy 4N + reference forward 2N). Attention's
sequence-dependent FLOPs (~2-4% at 260 tokens) are left out, so MFU is slightly understated.
MFU = achieved / fp32 matmul peak (the issue's goal: >= 70%), also shown against the bf16 peak.
Writes bench/results/mfu.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import _common as common


def matmul_peak(dtype_name: str, size: int, seconds: float, repeats: int) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)  # warm-up: oneDNN/BLAS kernel selection
    rates, cpu_rates = [], []
    threads = torch.get_num_threads()
    for _ in range(repeats):
        n, start, cpu0 = 0, time.perf_counter(), time.process_time()
        while (elapsed := time.perf_counter() - start) < seconds:
            torch.matmul(a, b)
            n += 1
        rates.append(2 * size**3 * n / elapsed / 1e9)
        # per CPU-second x threads: the rate with the threads to itself (robust to a shared machine)
        cpu_rates.append(2 * size**3 * n / ((time.process_time() - cpu0) / threads) / 1e9)
    return {
        "gflops": round(common.median(rates), 1),
        "repeats_gflops": [round(r, 1) for r in rates],
        "gflops_cpu_normalised": round(common.median(cpu_rates), 1),
    }


def fixed_batch(tokenizer, batch_size: int, system_prompt: str | None):
    """`batch_size` rows of similar length (the middle of the length distribution), as the sft stage sees them."""
    import torch

    from qatune.io import read_jsonl
    from qatune.train import conversation

    rows = read_jsonl("data/split/train.jsonl")
    texts = [
        tokenizer.apply_chat_template(
            [*conversation(r, system_prompt), {"role": "assistant", "content": r["chosen"]}], tokenize=False
        )
        for r in rows
    ]
    encoded = sorted((tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts), key=len)
    mid = len(encoded) // 2
    picked = encoded[mid - batch_size // 2 : mid - batch_size // 2 + batch_size]
    width = max(len(x) for x in picked)
    ids = torch.full((len(picked), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(picked):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    labels = ids.masked_fill(mask == 0, -100)
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
                    model(**batch)
            loss = model(**batch).loss
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
    parser.add_argument("--size", type=int, default=2048, help="square matmul size for the peak")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per peak repeat")
    parser.add_argument("--repeats", type=int, default=3, help="peak repeats per dtype (median reported)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per mode (median)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows in the fixed batch (params sft: 8)")
    parser.add_argument("--no-dpo", action="store_true", help="skip the DPO-shaped steps")
    parser.add_argument("--params", default="params.yaml", help="params file (train.lora, seed)")
    args = parser.parse_args(argv)

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qatune import trainer_setup as ts
    from qatune.params import load_params

    params = load_params(args.params)
    torch.manual_seed(params.seed)
    info = common.machine()
    peak = {d: matmul_peak(d, args.size, args.seconds, args.repeats) for d in ("float32", "bfloat16")}
    print(
        f"[bench] matmul peak fp32 {peak['float32']['gflops']} bf16 {peak['bfloat16']['gflops']} GFLOP/s",
        file=sys.stderr,
    )

    tok = AutoTokenizer.from_pretrained("models/base")
    base = AutoModelForCausalLM.from_pretrained("models/base", dtype=torch.float32)
    n_params = sum(p.numel() for p in base.parameters())
    model = get_peft_model(base, ts.lora_config(params.train))
    model.train()
    batch = fixed_batch(tok, args.batch_size, params.train.system_prompt)
    real = int(batch["attention_mask"].sum())
    padded = int(batch["input_ids"].numel())
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=params.sft.learning_rate, fused=True
    )
    modes = [("sft", "fp32"), ("sft", "bf16")] + ([] if args.no_dpo else [("dpo", "fp32"), ("dpo", "bf16")])
    runs = {}
    for method, precision in modes:
        k = 6 if method == "dpo" else 4
        times, cpu = train_steps(model, batch, optimizer, precision == "bf16", args.steps, method == "dpo")
        step = common.median(times)
        achieved = k * n_params * real / step / 1e9
        runs[f"{method}_{precision}"] = {
            "flops_per_token": f"{k}N",
            "step_s_median": round(step, 3),
            "step_s": [round(t, 3) for t in times],
            "tokens_per_s": round(real / step, 1),
            "achieved_gflops": round(achieved, 1),
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
        print(f"[bench] {method} {precision}: {runs[f'{method}_{precision}']}", file=sys.stderr, flush=True)

    out = {
        "machine": info,
        "loadavg_after": common.machine()["loadavg_1_5_15"],
        "matmul_size": args.size,
        "peak_gflops": peak,
        "model_params": n_params,
        "batch": {"rows": args.batch_size, "real_tokens": real, "padded_tokens": padded},
        "runs": runs,
        "peak_rss_gb": common.peak_rss_gb(),
        "goal": "MFU >= 70% of the fp32 matmul peak",
    }
    s32, s16 = runs["sft_fp32"], runs["sft_bf16"]
    summary = (
        f"mfu: SFT fp32 {s32['achieved_gflops']} GFLOP/s = {s32['mfu_vs_fp32_peak']:.0%} of the fp32 peak "
        f"({peak['float32']['gflops']}); SFT bf16 {s16['achieved_gflops']} = {s16['mfu_vs_fp32_peak']:.0%} of fp32 "
        f"peak, {s16['mfu_vs_bf16_peak']:.0%} of bf16 peak ({peak['bfloat16']['gflops']})"
    )
    if "dpo_fp32" in runs:
        summary += f"; DPO fp32 {runs['dpo_fp32']['mfu_vs_fp32_peak']:.0%}, bf16 {runs['dpo_bf16']['mfu_vs_fp32_peak']:.0%}"
    summary += f"; load {info['loadavg_1_5_15'][0]}"
    common.save("mfu", out, summary)


if __name__ == "__main__":
    sys.exit(main())
