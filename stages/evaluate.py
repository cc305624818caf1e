"""evaluate: base vs SFT vs final on the held-out test split, and the report that says if the run paid off.

    python stages/evaluate.py --params params.yaml --model models/base --sft models/sft --final models/dpo \
        --data data/split --metrics metrics/evaluate.json --report metrics/report.md --plots metrics/evaluate

Reads `seed`, `beta`, `train.system_prompt`, `train.trust_remote_code` and `evaluate`. One base model is
loaded once with both adapters on top: the base is scored with the adapters switched off, SFT and final
by switching the active adapter. Writes every number per model to metrics/evaluate.json, tables and
answers side by side to metrics/report.md, per-question answers to metrics/evaluate/generations.jsonl,
and plots (PNG, and a DVC bar plot).

Scores and answers are also kept in `evaluate.reuse_dir` (default .cache/evaluate, outside git and DVC),
keyed by a digest of everything they depend on: a rerun where only the final adapter changed, such as
`dvc exp run -S beta=0.2`, recomputes the final model's numbers only. metrics/evaluate.json lists what
was reused.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path
from typing import Any

from qatune import evaluate as ev
from qatune import trainer_setup as ts
from qatune.errors import QatuneError, fail_cleanly
from qatune.io import read_jsonl, write_json, write_jsonl
from qatune.params import load_params
from qatune.train import git_commit, peak_memory_gb, sha256_files

MODELS = ("base", "sft", "final")


def demo_rows() -> list[dict[str, Any]]:
    text = (resources.files("qatune") / "data" / "demo_questions.txt").read_text(encoding="utf-8")
    questions = [q.strip() for q in text.splitlines() if q.strip() and not q.startswith("#")]
    return [{"id": f"demo-{i}", "prompt": [{"role": "user", "content": q}]} for i, q in enumerate(questions)]


def load_models(args, params):
    """Base in float32 with the SFT and final adapters attached; `adapter=None` means the base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    remote = params.train.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(args.final, trust_remote_code=remote)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, use_safetensors=True, trust_remote_code=remote
    )
    model = PeftModel.from_pretrained(base, args.sft, adapter_name="sft")
    model.load_adapter(args.final, adapter_name="final")
    return model.eval(), tokenizer


class Switch:
    """Run a block with one model active: `base` (adapters off), or `sft` / `final` merged into the
    weights for the block (a LoRA forward costs ~30% more than the plain model's) and unmerged after."""

    def __init__(self, model, name: str):
        self.model, self.name, self.ctx = model, name, None

    def __enter__(self):
        if self.name == "base":
            self.ctx = self.model.disable_adapter()
            self.ctx.__enter__()
        else:
            self.model.set_adapter(self.name)
            self.model.merge_adapter([self.name])
        return self.model

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
        else:
            self.model.unmerge_adapter()


def generation_dtype():
    """bfloat16 where the hardware runs it fast (AMX/AVX512-BF16 CPUs, Ampere+ GPUs): ~2x new tokens/s
    on CPU for greedy answers; scoring always runs in float32 before this cast."""
    import torch

    from qatune.train import hardware

    hw = hardware()
    fast = hw["cuda_bf16"] if hw["cuda"] else hw["cpu_bf16"]
    return torch.bfloat16 if fast else torch.float32


def reuse_keys(args, params) -> dict[str, Any]:
    """What every memoised result depends on: each model's weights (base, base + adapter), the tokenizer
    and chat template used, the code that scores and generates, library versions and the hardware."""
    import peft
    import torch
    import transformers

    from qatune import lm_head, train

    def files(folder: str) -> list[Path]:
        return sorted(p for p in Path(folder).rglob("*") if p.is_file())

    base = sha256_files(files(args.model))
    tokenizer_files = [
        p for p in files(args.final) if p.name.startswith(("tokenizer", "special_tokens", "chat_"))
    ]
    env = {
        "code": sha256_files([__file__, ev.__file__, train.__file__, lm_head.__file__]),
        "versions": [torch.__version__, transformers.__version__, peft.__version__],
        "hardware": train.hardware(),
        "tokenizer": sha256_files(tokenizer_files),
        "system_prompt": params.train.system_prompt,
    }
    return {
        "env": env,
        "base": base,
        "sft": sha256_files(files(args.sft)) + base,
        "final": sha256_files(files(args.final)) + base,
    }


def score(model, tokenizer, rows, system_prompt, label, cfg, keys, memo) -> dict[str, list[dict]]:
    """Per model, per row: log-prob sums and token counts of the chosen and rejected answers (float32)."""
    import torch

    model.to(torch.float32)
    chosen = ev.encode_pairs(tokenizer, rows, system_prompt, "chosen")
    with_rejected = [i for i, r in enumerate(rows) if r.get("rejected")]
    rejected = ev.encode_pairs(tokenizer, [rows[i] for i in with_rejected], system_prompt, "rejected")
    out = {}
    for name in MODELS:
        key = memo.key(kind="score", model=keys[name], env=keys["env"], rows=rows, batch_size=cfg.batch_size)
        per_row = memo.get(key, f"{label} {name} scores")
        if per_row is None:
            with Switch(model, name):
                c = ev.answer_logprobs(model, chosen, cfg.batch_size, tokenizer.pad_token_id)
                r = ev.answer_logprobs(model, rejected, cfg.batch_size, tokenizer.pad_token_id)
            per_row = [{"chosen_logp": lp, "chosen_tokens": n} for lp, n in c]
            for i, (lp, n) in zip(with_rejected, r, strict=True):
                per_row[i].update(rejected_logp=lp, rejected_tokens=n)
            memo.put(key, per_row)
        out[name] = per_row
    return out


def generate(model, tokenizer, rows, system_prompt, cfg, keys, memo) -> tuple[dict, list[str]]:
    """Greedy answers from the base and the final model, and the models answered afresh (not reused)."""
    questions = ev.questions_of(rows, system_prompt)
    settings = cfg.model_dump(include={"batch_size", "max_new_tokens", "repetition_penalty"})
    dtype = str(next(model.parameters()).dtype)
    out, fresh = {}, []
    for name in ("base", "final"):
        key = memo.key(
            kind="generate", model=keys[name], env=keys["env"], questions=questions, dtype=dtype, **settings
        )
        cached = memo.get(key, f"{name} answers")
        if cached is None:
            with Switch(model, name):
                cached = ev.generate_answers(
                    model,
                    tokenizer,
                    questions,
                    cfg.batch_size,
                    cfg.max_new_tokens,
                    cfg.repetition_penalty,
                    name,
                )
            memo.put(key, cached)
            fresh.append(name)
        out[name] = (list(cached[0]), list(cached[1]))
    return out, fresh


def summarise(label, rows, scores, answers, encoder, params) -> tuple[dict, list[dict]]:
    """Every metric for one evaluation set from its scores and answers; (metrics, per-row records)."""
    metrics: dict[str, Any] = {"models": {m: ev.likelihood_metrics(scores[m]) for m in MODELS}}
    metrics["dpo_implicit_reward"] = {
        "reference": "sft",
        **ev.implicit_reward(scores["final"], scores["sft"], params.beta),
    }
    gen_rows = rows[: len(answers["final"][0])]
    references = [r["chosen"] for r in gen_rows]
    per_row: dict[str, dict[str, list]] = {}
    for name, (texts, finished) in answers.items():
        similarity = closer = None
        if encoder is not None:
            similarity = ev.embed_similarity(encoder, texts, references)
            paired = [(i, r) for i, r in enumerate(gen_rows) if r.get("rejected")]
            if paired:
                to_rejected = ev.embed_similarity(
                    encoder, [texts[i] for i, _ in paired], [r["rejected"] for _, r in paired]
                )
                closer = [similarity[i] > s for (i, _), s in zip(paired, to_rejected, strict=True)]
        metrics["models"][name].update(ev.generation_metrics(gen_rows, texts, finished, similarity, closer))
        per_row[name] = {"rouge_l": ev.rouge_l(texts, references), "similarity": similarity}
    records = []
    for i, row in enumerate(gen_rows):
        rec = {
            "set": label,
            "id": row.get("id"),
            "topic": row.get("topic"),
            "safety": ev.is_safety(row),
            "question": ev.question_of(row),
            "reference": row["chosen"],
        }
        for name, (texts, finished) in answers.items():
            rec[f"{name}_answer"] = texts[i]
            rec[f"{name}_finished"] = finished[i]
            rec[f"{name}_rouge_l"] = round(per_row[name]["rouge_l"][i], 4)
            if per_row[name]["similarity"] is not None:
                rec[f"{name}_similarity"] = round(per_row[name]["similarity"][i], 4)
        for name in MODELS:
            s = scores[name][i]
            rec[f"{name}_nll"] = round(-s["chosen_logp"] / s["chosen_tokens"], 4)
        records.append(rec)
    return metrics, records


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml", help="params file to read")
    parser.add_argument("--model", default="models/base", help="base model folder from fetch")
    parser.add_argument("--sft", default="models/sft", help="SFT adapter")
    parser.add_argument("--final", default="models/dpo", help="final adapter (DPO, or SFT when DPO is off)")
    parser.add_argument("--data", default="data/split", help="folder with test.jsonl")
    parser.add_argument("--metrics", default="metrics/evaluate.json", help="every number, per model")
    parser.add_argument("--report", default="metrics/report.md", help="the human-readable report")
    parser.add_argument("--plots", default="metrics/evaluate", help="plots and per-question answers")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    params = load_params(args.params)
    cfg = params.evaluate
    for path, what in ((args.model, "base model"), (args.sft, "SFT adapter"), (args.final, "final adapter")):
        ts.require(path, what)
    test_file = Path(args.data) / "test.jsonl"
    ts.require(str(test_file), "test split")

    import torch

    torch.manual_seed(params.seed)
    sets = {"test": read_jsonl(test_file)}
    if cfg.rows:
        sets["test"] = sets["test"][: cfg.rows]
    for extra in cfg.extra_files:
        sets[extra.name] = ev.read_eval_file(extra.path, extra.format)
    if not sets["test"]:
        raise QatuneError(f"{test_file}: the test split is empty (split.test is 0?)")

    model, tokenizer = load_models(args, params)
    keys = reuse_keys(args, params)
    memo = ev.Memo(cfg.reuse_dir)
    timings: dict[str, float] = {}
    # Phase 1, float32: likelihoods of every set under base, SFT and final.
    t0 = time.perf_counter()
    scores = {}
    for label, rows in sets.items():
        print(f"evaluate: scoring {label}: {len(rows)} rows x 3 models", flush=True)
        scores[label] = score(model, tokenizer, rows, params.train.system_prompt, label, cfg, keys, memo)
    timings["score_s"] = round(time.perf_counter() - t0, 1)

    # Phase 2, bfloat16 where fast: every question of every set and the demo list in one batched pass.
    model.to(generation_dtype())
    gen_sets = {
        label: rows[: cfg.generate_rows] if cfg.generate_rows else rows for label, rows in sets.items()
    }
    demos = demo_rows()
    everything = [row for rows in gen_sets.values() for row in rows] + demos
    t0 = time.perf_counter()
    answers, fresh = generate(model, tokenizer, everything, params.train.system_prompt, cfg, keys, memo)
    timings["generate_s"] = round(time.perf_counter() - t0, 1)
    new_tokens = sum(  # reused answers cost no time: tokens/s counts the fresh ones only
        len(tokenizer(a, add_special_tokens=False)["input_ids"]) for m in fresh for a in answers[m][0]
    )
    timings["generated_tokens_per_s"] = round(new_tokens / max(timings["generate_s"], 1e-9), 1)

    encoder = ev.load_encoder(cfg.semantic_model)
    results, records, start = {}, [], 0
    for label, rows in gen_sets.items():
        part = {
            m: (texts[start : start + len(rows)], done[start : start + len(rows)])
            for m, (texts, done) in answers.items()
        }
        start += len(rows)
        results[label], recs = summarise(label, sets[label], scores[label], part, encoder, params)
        records.extend(recs)
    demo_records = [
        {
            "set": "demo",
            "id": d["id"],
            "question": ev.question_of(d),
            **{f"{m}_answer": answers[m][0][start + i] for m in answers},
        }
        for i, d in enumerate(demos)
    ]

    metrics = {
        **results["test"],
        "test_rows": len(sets["test"]),
        "generated_rows": results["test"]["models"]["final"]["generated"],
        "extra": {k: v for k, v in results.items() if k != "test"},
        "timings": timings,
        "reused": memo.hits,
        "settings": {"decoding": "greedy", **cfg.model_dump(exclude={"extra_files"}), "beta": params.beta},
        "git_commit": git_commit(),
        "wall_s": round(time.perf_counter() - started, 1),
        **peak_memory_gb(),
    }
    write_json(args.metrics, metrics)
    plots = Path(args.plots)
    write_jsonl(plots / "generations.jsonl", records + demo_records)
    ev.write_plots(metrics, records, plots)
    Path(args.report).write_text(
        ev.render_report(metrics, records, demo_records, cfg.sample_answers), encoding="utf-8"
    )
    base, final = metrics["models"]["base"], metrics["models"]["final"]
    print(
        f"evaluate: NLL base {base['nll']:.3f} -> final {final['nll']:.3f}; "
        f"preference accuracy {base.get('preference_accuracy', float('nan')):.2f} -> "
        f"{final.get('preference_accuracy', float('nan')):.2f}; "
        f"safety {ev.fmt(base['safety_score'])} -> {ev.fmt(final['safety_score'])} ({metrics['wall_s']} s) "
        f"-> {args.report}"
    )


if __name__ == "__main__":
    main()
