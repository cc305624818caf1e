"""Serving speed: the merged model in transformers vs each exported GGUF in llama.cpp, one question at a time
(as `qatune ask` answers: --mode merged vs --mode gguf), same questions, greedy, same max_new_tokens.

    python bench/gguf.py                          # 8 test questions, 64 new tokens, 2 repeats
    python bench/gguf.py --questions 16 --repeats 3

Arms, each in its own process (its own peak RSS): `merged` (models/merged, float32 on CPU, through
qatune.inference.stream_answer) and one per models/gguf/model-*.gguf (llama.cpp through the same
stream_answer, generate.mode gguf). New tokens are counted the same way for every arm (the answers
re-tokenised with the merged model's tokenizer). One untimed warm-up question per arm, then --repeats timed
passes (median). Also records each file's size and load time. Writes bench/results/gguf.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common as common


def run(arm: str, questions: int, max_new_tokens: int, repeats: int, params_path: str) -> dict:
    from transformers import AutoTokenizer

    from qatune import inference
    from qatune.io import read_jsonl
    from qatune.llama_cpp import gguf_name
    from qatune.params import load_params
    from qatune.templates import conversation

    params = load_params(params_path)
    rows = read_jsonl("data/split/test.jsonl")[:questions]
    counter = AutoTokenizer.from_pretrained("models/merged")
    began = time.perf_counter()
    if arm == "merged":
        loaded = inference.load_model("merged", "models/merged")
        size = sum(p.stat().st_size for p in Path("models/merged").glob("*.safetensors"))
    else:
        path = Path("models/gguf") / gguf_name(arm)
        loaded = inference.load_model("gguf", path)
        size = path.stat().st_size
    load_s = time.perf_counter() - began
    settings = inference.generation_settings(params.generate, temperature=0.0, max_new_tokens=max_new_tokens)
    qs = [conversation(r, params.train.system_prompt) for r in rows]

    def answer_all(batch):
        return ["".join(inference.stream_answer(loaded, q, settings)).strip() for q in batch]

    timed = common.timed_answers(
        answer_all, qs, repeats, lambda t: len(counter(t, add_special_tokens=False)["input_ids"])
    )
    return {
        "arm": arm,
        "model": loaded.source,
        "dtype": loaded.dtype,
        "bytes": size,
        "load_s": round(load_s, 2),
        "questions": len(qs),
        "max_new_tokens": max_new_tokens,
        **timed,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=8, help="test questions (first N of test.jsonl)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per answer, at most")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per arm (median reported)")
    parser.add_argument("--params", default="params.yaml", help="params file (generate, train)")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    flags = [
        "--questions", str(args.questions), "--max-new-tokens", str(args.max_new_tokens),
        "--repeats", str(args.repeats), "--params", args.params,
    ]  # fmt: skip
    if args.arm:
        common.emit(run(args.arm, args.questions, args.max_new_tokens, args.repeats, args.params))
        return
    from qatune.llama_cpp import gguf_name, gguf_quant

    quants = sorted(gguf_quant(p) for p in (common.ROOT / "models/gguf").glob(gguf_name("*")))
    if not quants:
        raise SystemExit("bench/gguf.py: no models/gguf/model-*.gguf; run `dvc repro export` first")
    info = common.machine()
    results = {a: common.run_arm(__file__, a, flags) for a in ["merged", *quants]}
    merged = results["merged"]
    for arm in quants:
        results[arm]["speedup_vs_merged"] = round(results[arm]["tokens_per_s"] / merged["tokens_per_s"], 2)
        results[arm]["size_vs_merged"] = round(results[arm]["bytes"] / merged["bytes"], 3)
    out = {"machine": info, "loadavg_after": common.machine()["loadavg_1_5_15"], "arms": results}
    parts = [f"merged {merged['dtype']} {merged['tokens_per_s']} tok/s {merged['bytes'] / 1e6:.0f} MB"]
    parts += [
        f"{a} {results[a]['tokens_per_s']} tok/s ({results[a]['speedup_vs_merged']}x) {results[a]['bytes'] / 1e6:.0f} MB"
        for a in quants
    ]
    summary = (
        f"gguf: {' · '.join(parts)}; {args.questions} questions one at a time, {args.max_new_tokens} new tokens, "
        f"median of {args.repeats}; load {info['loadavg_1_5_15'][0]}"
    )
    common.save("gguf", out, summary)


if __name__ == "__main__":
    sys.exit(main())
