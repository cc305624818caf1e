"""Generation: batched on the merged model (as the evaluate stage runs it) vs one question at a time on the
adapter model (as `qatune ask --mode adapter` runs it), same questions, greedy, same max_new_tokens.

    python bench/generation.py                       # 16 test questions, 64 new tokens, 3 repeats
    python bench/generation.py --questions 32 --max-new-tokens 128 --repeats 5

Arms, each in its own process (its own peak RSS):
- batched:    models/merged in bfloat16 where the CPU runs it fast (stages/evaluate.py's generation_dtype),
              qatune.generation.greedy_answers with evaluate.batch_size (left padding, KV cache).
- sequential: models/base + the final adapter (models/dpo) via qatune.inference.load_model("adapter")
              (float32 on CPU), each question through qatune.inference.stream_answer with temperature 0
              (greedy), as `qatune ask --mode adapter` answers one question.
New tokens are counted the same way for both arms (the decoded answers re-tokenised, as evaluate does).
One untimed warm-up question per arm, then --repeats timed passes over all questions (median).
Writes bench/results/generation.json.
"""

from __future__ import annotations

import argparse
import sys

import _common as common


def run(arm: str, questions: int, max_new_tokens: int, repeats: int, params_path: str) -> dict:
    import torch

    from qatune import hardware, inference
    from qatune.generation import greedy_answers
    from qatune.io import read_jsonl
    from qatune.params import load_params
    from qatune.templates import conversation

    params = load_params(params_path)
    torch.manual_seed(params.seed)
    rows = read_jsonl("data/split/test.jsonl")[:questions]
    system = params.train.system_prompt
    penalty = params.evaluate.repetition_penalty
    if arm == "batched":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = getattr(torch, hardware.placement("generate", hardware.probe())[1])  # as the score stage
        tok = AutoTokenizer.from_pretrained("models/merged")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            "models/merged", dtype=dtype, use_safetensors=True
        ).eval()
        batch_size = params.evaluate.batch_size

        def answer_all(qs):
            texts, _ = greedy_answers(model, tok, qs, batch_size, max_new_tokens, penalty, "batched")
            return texts

        info = {
            "model": "models/merged",
            "dtype": str(dtype).removeprefix("torch."),
            "batch_size": batch_size,
        }
    else:
        loaded = inference.load_model("adapter", "models/base", "models/dpo")
        tok = loaded.tokenizer
        settings = inference.generation_settings(
            params.generate, temperature=0.0, max_new_tokens=max_new_tokens, repetition_penalty=penalty
        )

        def answer_all(qs):
            return ["".join(inference.stream_answer(loaded, q, settings)).strip() for q in qs]

        info = {"model": loaded.source, "dtype": loaded.dtype, "batch_size": 1}
    qs = [conversation(r, system) for r in rows]
    timed = common.timed_answers(
        answer_all, qs, repeats, lambda t: len(tok(t, add_special_tokens=False)["input_ids"])
    )
    return {
        "arm": arm,
        **info,
        "questions": len(qs),
        "max_new_tokens": max_new_tokens,
        "repetition_penalty": penalty,
        **timed,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=16, help="test questions (first N of test.jsonl)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per answer, at most")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per arm (median reported)")
    parser.add_argument("--params", default="params.yaml", help="params file (evaluate, generate, train)")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm and print its JSON
    args = parser.parse_args(argv)
    flags = [
        "--questions", str(args.questions), "--max-new-tokens", str(args.max_new_tokens),
        "--repeats", str(args.repeats), "--params", args.params,
    ]  # fmt: skip
    if args.arm:
        common.emit(run(args.arm, args.questions, args.max_new_tokens, args.repeats, args.params))
        return
    info = common.machine()
    results = {a: common.run_arm(__file__, a, flags) for a in ("batched", "sequential")}
    b, s = results["batched"], results["sequential"]
    ratio = round(b["tokens_per_s"] / s["tokens_per_s"], 2)
    ratio_cpu = round(b["tokens_per_cpu_s"] / s["tokens_per_cpu_s"], 2)
    out = {
        "machine": info,
        "loadavg_after": common.machine()["loadavg_1_5_15"],
        "arms": results,
        "speedup_batched": ratio,
        "speedup_batched_per_cpu_s": ratio_cpu,
        "goal": "batched merged >= 4x the new tokens/s of one-at-a-time adapter",
    }
    summary = (
        f"generation: batched merged {b['dtype']} x{b['batch_size']} {b['tokens_per_s']} tok/s vs sequential "
        f"adapter {s['dtype']} {s['tokens_per_s']} tok/s = {ratio}x (per CPU-second {ratio_cpu}x; {args.questions} questions, "
        f"{args.max_new_tokens} new tokens, median of {args.repeats}); load {info['loadavg_1_5_15'][0]}"
    )
    common.save("generation", out, summary)


if __name__ == "__main__":
    sys.exit(main())
