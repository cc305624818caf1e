"""score: one model (base, SFT or final) on the held-out split (`evaluate.split`) and any extra eval files.

    python stages/score.py --params params.yaml --model models/base --adapter models/dpo --name final \
        --data data/split --generate --out data/scores/final.json

Reads `seed`, `train.system_prompt`, `train.enable_thinking`, `train.trust_remote_code` and the scoring
keys of `evaluate`. The model is models/base with the adapter merged in (`--adapter models/base` scores the
base itself), on the GPU in the dtype it scores in where qatune.plan finds that it fits the card, else on
the CPU (qatune.hardware.placement). Scores the chosen and rejected
answers of every row in float32 (bf16 with `evaluate.score_precision: auto` on hardware fast at it); with --generate it also answers every question and the demo questions
greedily (bf16/fp16 on GPUs, bf16 on CPUs that are fast at it) and measures each answer's
similarity to the chosen and rejected ones. Writes everything, rows included, to one JSON file that the
evaluate stage reports on. dvc.yaml runs it once per model, so an experiment that changes only the final
adapter (`dvc exp run -S beta=0.2`) rescores only the final model.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from qatune import hardware, modeling, plan, scoring
from qatune.demo import demo_rows
from qatune.errors import QatuneError, fail_cleanly, require
from qatune.generation import greedy_answers
from qatune.io import read_jsonl, write_json
from qatune.params import load_params
from qatune.templates import conversation, template_kwargs


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml", help="params file to read")
    parser.add_argument("--model", default="models/base", help="base model folder from fetch")
    parser.add_argument(
        "--adapter", default="models/dpo", help="LoRA adapter to score; the base folder = none"
    )
    parser.add_argument("--name", default="final", help="the model's name in the report (base, sft, final)")
    parser.add_argument("--data", default="data/split", help="folder with test.jsonl")
    parser.add_argument("--generate", action="store_true", help="also answer every question greedily")
    parser.add_argument("--out", default="data/scores/final.json", help="scores, answers and rows")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    params = load_params(args.params)
    system_prompt = params.train.system_prompt
    rows_cap, batch_size = params.evaluate.rows, params.evaluate.batch_size
    require(args.model, "base model")
    adapter = require(args.adapter, "adapter")
    held_out = params.evaluate.split  # `val` only where there is no test split (seed 004's 95/5)
    test_file = require(Path(args.data) / f"{held_out}.jsonl", f"{held_out} split")

    # the held-out rows with an answer to score (a lone bad answer, kept for KTO, has none)
    # every held-out row is kept (answered up to evaluate.generate_rows); likelihoods cover the first evaluate.rows
    sets = {"test": [r for r in read_jsonl(test_file) if r["chosen"]]}
    if not sets["test"]:
        raise QatuneError(
            f"{test_file}: no rows with an answer in the {held_out} split (split.{held_out} is 0?)"
        )
    for extra in params.evaluate.extra_files:
        sets[extra.name] = scoring.read_eval_file(extra.path, extra.format)

    import torch

    torch.manual_seed(params.seed)
    hw = plan.machine(hardware.probe())
    adapters = [(args.name, adapter)] if modeling.is_adapter(adapter) else []
    # on the GPU in the dtype it scores in where that fits, else on the CPU (qatune.plan); stops if neither
    arch = plan.load_arch(args.model)
    answers = (params.clean.max_prompt_length, params.evaluate.max_new_tokens) if args.generate else None
    lora = plan.adapter_parameters(arch, adapter)
    memory = plan.score(
        arch, hw, params.evaluate.score_precision, batch_size, params.clean.max_length, lora, answers
    ).require()
    device, dtype, batch_size = memory.device, memory.dtype, memory.batch  # a smaller batch only on a GPU
    hw = replace(hw, cuda=device == "cuda")  # a CPU fallback scores and answers by the CPU's rules
    model, tokenizer = modeling.load_with_adapters(
        args.model, adapters, dtype, device, params.train.trust_remote_code
    )
    kwargs = template_kwargs(tokenizer.chat_template, params.train.enable_thinking)
    if adapters:  # merged into the weights: a LoRA forward costs ~30% more than the plain model's
        model = model.merge_and_unload().eval()
    score_dtype = hardware.score_dtype(params.evaluate.score_precision, hw)
    model.to(getattr(torch, score_dtype))  # merged in float32 first: only the forward passes round

    # Phase 1, float32 (or bf16 where evaluate.score_precision: auto finds it fast): likelihoods of the
    # chosen and rejected answers of every set.
    t0 = time.perf_counter()
    out: dict = {"model": args.name, "adapter": str(adapter) if adapters else None, "sets": {}}
    for label, rows in sets.items():
        scored = rows[: rows_cap or None]
        print(f"score {args.name}: {label}: {len(scored)} of {len(rows)} rows", flush=True)
        scores = scoring.score_rows(model, tokenizer, scored, system_prompt, batch_size, kwargs)
        out["sets"][label] = {"rows": rows, "scores": scores}
    timings = {"score_s": round(time.perf_counter() - t0, 1)}

    # Phase 2, where asked: greedy answers to every set's questions and the demo questions in one pass.
    if args.generate:
        generate_rows, max_new = params.evaluate.generate_rows, params.evaluate.max_new_tokens
        model.to(getattr(torch, hardware.placement("generate", hw)[1]))
        asked = {label: rows[: generate_rows or None] for label, rows in sets.items()}
        asked["demo"] = demo_rows(questions=params.domain.demo_questions)
        questions = [conversation(r, system_prompt) for rows in asked.values() for r in rows]
        t0 = time.perf_counter()
        penalty = params.evaluate.repetition_penalty
        answers, finished = greedy_answers(
            model, tokenizer, questions, batch_size, max_new, penalty, args.name, kwargs
        )
        timings["generate_s"] = round(time.perf_counter() - t0, 1)
        new_tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        timings["generated_tokens_per_s"] = round(new_tokens / max(timings["generate_s"], 1e-9), 1)
        encoder = scoring.load_encoder(params.evaluate.semantic_model)
        start = 0
        for label, rows in asked.items():
            part = {
                "answers": answers[start : start + len(rows)],
                "finished": finished[start : start + len(rows)],
            }
            start += len(rows)
            if label == "demo":
                out["demo"] = {"rows": rows, **part}
                continue
            if encoder is not None:
                part.update(scoring.answer_similarity(encoder, part["answers"], rows))
            out["sets"][label].update(part)

    out["settings"] = {
        **({"split": held_out} if held_out != "test" else {}),
        "decoding": "greedy",
        "rows": rows_cap,
        "generate_rows": params.evaluate.generate_rows,
        "batch_size": batch_size,
        "score_dtype": score_dtype,
        "max_new_tokens": params.evaluate.max_new_tokens,
        "repetition_penalty": params.evaluate.repetition_penalty,
        "semantic_model": params.evaluate.semantic_model,
    }
    out["timings"] = {**timings, "wall_s": round(time.perf_counter() - started, 1)}
    out["device"] = device
    out["memory_plan"] = memory.record()
    out.update(hardware.peak_memory_gb())
    write_json(args.out, out)
    print(f"score {args.name}: {timings} -> {args.out}")


if __name__ == "__main__":
    main()
