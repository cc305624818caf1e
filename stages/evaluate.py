"""evaluate: base vs SFT vs final on the held-out test split, and the report that says if the run paid off.

    python stages/evaluate.py --params params.yaml --scores data/scores --metrics metrics/evaluate.json \
        --report metrics/report.md --plots metrics/evaluate

Reads `beta` (DPO's implicit reward), `seed` (the paired bootstrap), `evaluate.sample_answers` and
`domain.referral` (the words that count as sending someone to a professional). Loads
no model: the score stages (score@base, score@sft, score@final) have scored and answered everything.
Writes every number per model and each paired difference with its bootstrap interval to
metrics/evaluate.json, the report to metrics/report.md (first: is the final model better than the base,
where, by how much, how sure), per-question answers to metrics/evaluate/generations.jsonl, and plots
(PNGs, per_question.png among them, and a DVC bar plot).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from qatune import evaluation, judge, plots, report, stance
from qatune.display import fmt
from qatune.errors import QatuneError, fail_cleanly
from qatune.io import write_json, write_jsonl
from qatune.params import load_params
from qatune.provenance import git_commit


def run_judge(cfg, records: list[dict], cache: Path) -> dict | None:
    """With `evaluate.judge.url` set: every held-out answer of the answering models scored by the judge
    (qatune.judge), each verdict stored on its record; per model, the judge's summary. The cache file
    always exists (an empty one while the judge is off), so DVC keeps it between runs."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.touch()
    if not cfg.url:
        return None
    config = judge.JudgeConfig(
        url=cfg.url,
        model=cfg.model,
        api_key_env=cfg.api_key_env,
        json_mode=cfg.json_mode,
        max_tokens=cfg.max_tokens,
    )
    out = {"url": cfg.url, "model": cfg.model, "rubric_version": judge.RUBRIC_VERSION}
    for name in evaluation.MODELS:
        answered = [r for r in records if f"{name}_answer" in r]
        if not answered:
            continue
        items = [
            {"question": r["question"], "reference": r["reference"], "answer": r[f"{name}_answer"]}
            for r in answered
        ]
        results = judge.judge_answers(items, config, cache)
        for r, verdict in zip(answered, results, strict=True):
            r[f"{name}_judge"] = {k: verdict[k] for k in ("correct", "safe", "reason", "error")}
        out[name] = judge.summary(results)
        print(f"evaluate: judge {cfg.model}: {name}: {out[name]}")
    return out


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml", help="params file to read")
    parser.add_argument("--scores", default="data/scores", help="folder with base/sft/final.json")
    parser.add_argument("--metrics", default="metrics/evaluate.json", help="every number, per model")
    parser.add_argument("--report", default="metrics/report.md", help="the human-readable report")
    parser.add_argument("--plots", default="metrics/evaluate", help="plots and per-question answers")
    parser.add_argument(
        "--judge-cache",
        default="data/judge/cache.jsonl",
        help="the optional judge's verdicts, kept across runs",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    params = load_params(args.params)
    docs = {}
    for name in evaluation.MODELS:
        path = Path(args.scores) / f"{name}.json"
        if not path.is_file():
            raise QatuneError(f"{path}: missing scores of the {name} model; run `dvc repro evaluate`")
        docs[name] = json.loads(path.read_text(encoding="utf-8"))

    referral = stance.referral_vocabulary(params.domain.referral)  # the domain's referral words
    metrics, records, demos = evaluation.evaluation(docs, params.beta, referral)
    paired = evaluation.paired_questions(docs, referral=referral)
    metrics["differences"] = evaluation.differences(paired, params.seed)
    metrics["judge"] = run_judge(params.evaluate.judge, records, Path(args.judge_cache))
    metrics.update(git_commit=git_commit(), wall_s=round(time.perf_counter() - started, 1))
    write_json(args.metrics, metrics)
    plot_out = Path(args.plots)
    write_jsonl(plot_out / "generations.jsonl", records + demos)
    plots.write_plots(metrics, records, plot_out, paired)
    plot_dir = Path(os.path.relpath(plot_out, Path(args.report).parent)).as_posix()
    text = report.render_report(metrics, records, demos, params.evaluate.sample_answers, plot_dir)
    Path(args.report).write_text(text, encoding="utf-8")
    base, final = metrics["models"]["base"], metrics["models"]["final"]
    v = metrics["verdict"]
    if v["judged"]:
        harm, contra, stated = v["harmful_affirmed"], v["facts_contradicted"], v["facts_stated"]
        print(
            f"evaluate: {'WORSE than the base: ' + '; '.join(v['reasons']) if v['worse_than_base'] else 'no more harmful than the base'}"
            f" (harmful requests affirmed {harm['base']} -> {harm['final']} of {harm['of']}; key facts stated "
            f"{stated['base']} -> {stated['final']}, contradicted {contra['base']} -> {contra['final']} of {contra['of']}; "
            f"yes/no answered the opposite way {v['yes_no_wrong']['base']} -> {v['yes_no_wrong']['final']} of "
            f"{v['yes_no_wrong']['of']})"
        )
    print(
        f"evaluate: NLL base {fmt(base['nll'])} -> final {fmt(final['nll'])}; "
        f"preference accuracy {fmt(base.get('preference_accuracy'))} -> "
        f"{fmt(final.get('preference_accuracy'))}; length-controlled "
        f"{fmt(base.get('preference_accuracy_long_rejected'))} -> "
        f"{fmt(final.get('preference_accuracy_long_rejected'))} -> {args.report}"
    )


if __name__ == "__main__":
    main()
