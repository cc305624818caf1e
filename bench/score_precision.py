"""Scoring precision: the score stage's likelihoods in float32 vs bf16 (`evaluate.score_precision`).

    python bench/score_precision.py               # 64 test rows; base, SFT and final model; both arms
    python bench/score_precision.py --rows 112

Arms, each in its own process, scoring the same test rows of data/split/test.jsonl through the score
stage's own path (qatune.modeling.load_with_adapters, the adapter merged in float32, then
qatune.scoring.score_rows at evaluate.batch_size):
- fp32: the weights and forward passes in float32 (score_precision: fp32, and `auto` on hardware
        without fast bf16).
- bf16: the merged weights cast to bfloat16 (score_precision: auto on AVX512-BF16/AMX CPUs and bf16
        GPUs); the LM head's log-softmax stays in float32.
Measured per model (base, SFT, final): scoring seconds (model loading excluded), answer NLL per token,
per-token preference accuracy (chosen vs rejected, length-normalised), how many rows change their
preference between the arms, and the largest per-row NLL difference; and the report's DPO implicit reward
(beta x (log p_final - log p_sft), chosen vs rejected): its accuracy, mean margin and sign flips, the
measure most sensitive to rounding because it subtracts two models' sums. The question the numbers
answer: does bf16 change any conclusion the report draws? Writes bench/results/score_precision.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import _common as common

ARMS = ("fp32", "bf16")


def run(arm: str, rows_cap: int, params_path: str, sft: str, final: str) -> dict:
    import torch

    from qatune import modeling, scoring
    from qatune.io import read_jsonl
    from qatune.params import load_params
    from qatune.templates import template_kwargs

    params = load_params(params_path)
    rows = [r for r in read_jsonl("data/split/test.jsonl") if r["chosen"] and r.get("rejected")][:rows_cap]
    out: dict = {"arm": arm, "rows": len(rows), "models": {}}
    for name, path in (("base", None), ("sft", sft), ("final", final)):
        adapters = [(name, path)] if path else []
        model, tok = modeling.load_with_adapters("models/base", adapters, "float32", "cpu", False)
        if adapters:
            model = model.merge_and_unload().eval()
        model.to(torch.bfloat16 if arm == "bf16" else torch.float32)
        kwargs = template_kwargs(tok.chat_template, params.train.enable_thinking)
        start = time.perf_counter()
        scores = scoring.score_rows(
            model, tok, rows, params.train.system_prompt, params.evaluate.batch_size, kwargs
        )
        out["models"][name] = {"score_s": round(time.perf_counter() - start, 2), "scores": scores}
    return out


def compare(fp32: dict, bf16: dict, beta: float) -> dict:
    """Per model: the two arms' NLL and preference accuracy (qatune.measures, as the report computes them),
    the rows whose preference flips and the largest per-row NLL difference; and the DPO implicit reward."""
    from qatune import measures

    out: dict = {}
    for name in fp32["models"]:
        a, b = fp32["models"][name], bf16["models"][name]
        corpus = {arm: measures.likelihood_metrics(m["scores"]) for arm, m in (("fp32", a), ("bf16", b))}
        rows = {arm: measures.per_question_likelihood(m["scores"]) for arm, m in (("fp32", a), ("bf16", b))}
        per_row = [
            abs(x - y)
            for x, y in zip(rows["fp32"]["question_nll"], rows["bf16"]["question_nll"], strict=True)
        ]
        prefers = {arm: r["preference_accuracy"] for arm, r in rows.items()}
        out[name] = {
            "score_s": {"fp32": a["score_s"], "bf16": b["score_s"]},
            "speedup": round(a["score_s"] / b["score_s"], 2),
            "answer_nll": {arm: round(c["nll"], 4) for arm, c in corpus.items()},
            "nll_delta": round(corpus["bf16"]["nll"] - corpus["fp32"]["nll"], 4),
            "preference_accuracy": {arm: round(c["preference_accuracy"], 4) for arm, c in corpus.items()},
            "preference_flips": sum(x != y for x, y in zip(prefers["fp32"], prefers["bf16"], strict=True)),
            "max_row_nll_delta": round(max(per_row), 4),
            "mean_row_nll_delta": round(sum(per_row) / len(per_row), 4),
        }
    reward = {
        arm: measures.implicit_reward(r["models"]["final"]["scores"], r["models"]["sft"]["scores"], beta)
        for arm, r in (("fp32", fp32), ("bf16", bf16))
    }
    signs = {
        arm: [m > 0 for m in reward_margins(r["models"]["final"]["scores"], r["models"]["sft"]["scores"])]
        for arm, r in (("fp32", fp32), ("bf16", bf16))
    }
    out["implicit_reward"] = {
        "beta": beta,
        "accuracy": {arm: round(r["accuracy"], 4) for arm, r in reward.items()},
        "margin_mean": {arm: round(r["margin_mean"], 4) for arm, r in reward.items()},
        "sign_flips": sum(x != y for x, y in zip(signs["fp32"], signs["bf16"], strict=True)),
    }
    return out


def reward_margins(policy: list[dict], reference: list[dict]) -> list[float]:
    """Per pair, the sign-bearing part of measures.implicit_reward's margin (beta > 0 leaves the sign):
    (log p_policy - log p_ref)(chosen) - (log p_policy - log p_ref)(rejected)."""
    return [
        (p["chosen_logp"] - r["chosen_logp"]) - (p["rejected_logp"] - r["rejected_logp"])
        for p, r in zip(policy, reference, strict=True)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows", type=int, default=64, help="test rows scored (the pipeline's evaluate.rows)"
    )
    parser.add_argument("--params", default="params.yaml", help="params file (train and evaluate blocks)")
    parser.add_argument(
        "--sft", default="models/sft", help="the SFT adapter (the implicit reward's reference)"
    )
    parser.add_argument("--final", default="models/dpo", help="the final adapter")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm and print its JSON
    args = parser.parse_args(argv)
    if args.arm:
        common.emit(run(args.arm, args.rows, args.params, args.sft, args.final))
        return
    flags = ["--rows", str(args.rows), "--params", args.params, "--sft", args.sft, "--final", args.final]
    before = common.machine()
    results = {a: common.run_arm(__file__, a, flags) for a in ARMS}
    after = common.machine()["loadavg_1_5_15"]
    from qatune.params import load_params

    models = compare(results["fp32"], results["bf16"], load_params(args.params).beta)
    reward = models.pop("implicit_reward")
    parts = [
        f"{name} {m['speedup']}x, NLL {m['answer_nll']['fp32']} -> {m['answer_nll']['bf16']}, "
        f"{m['preference_flips']} of {results['fp32']['rows']} preferences flipped"
        for name, m in models.items()
    ]
    summary = (
        "score_precision: bf16 vs fp32 scoring: "
        + "; ".join(parts)
        + f"; implicit reward accuracy {reward['accuracy']['fp32']} -> {reward['accuracy']['bf16']}, "
        f"{reward['sign_flips']} signs flipped"
    )
    common.save(
        "score_precision",
        {
            "machine": {**before, "loadavg_after": after},
            "rows": results["fp32"]["rows"],
            "adapters": {"sft": args.sft, "final": args.final},
            "models": models,
            "implicit_reward": reward,
            "arms": {
                a: {"peak_rss_gb": r["peak_rss_gb"], "process_wall_s": r["process_wall_s"]}
                for a, r in results.items()
            },
        },
        summary,
    )


if __name__ == "__main__":
    sys.exit(main())
