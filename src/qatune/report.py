"""The evaluation report: what metrics/report.md says, the metrics/evaluate.json it summarises, and the
plots. Pure functions of the score stages' outputs (qatune.scoring) and the measures (qatune.measures);
`fmt` is the one number format of the report and the model cards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qatune.errors import QatuneError
from qatune.formats import question_text
from qatune.measures import (
    generation_metrics,
    implicit_reward,
    is_safety,
    likelihood_metrics,
    rouge_l,
    words,
)

MODELS = ("base", "sft", "final")  # one score stage each, in report order


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: Any) -> str:
    """4 significant digits: metrics from a few hundred test rows carry no more."""
    if not is_number(value):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


# --------------------------------------------------------------------------- from scores to metrics


def check_same_rows(docs: dict[str, dict]) -> None:
    """Every model must have scored the same rows of the same sets, or the comparison means nothing."""
    first = docs[MODELS[0]]
    for name in MODELS[1:]:
        for label, part in first["sets"].items():
            other = docs[name]["sets"].get(label)
            ids = [r.get("id") for r in part["rows"]]
            if other is None or [r.get("id") for r in other["rows"]] != ids:
                raise QatuneError(
                    f"scores of '{name}' and '{MODELS[0]}' cover different '{label}' rows; "
                    "rerun the score stages (dvc repro evaluate)"
                )


def summarise(label: str, docs: dict[str, dict], beta: float) -> tuple[dict, list[dict]]:
    """Every metric for one evaluation set from the models' scores and answers; (metrics, per-row records)."""
    rows = docs[MODELS[0]]["sets"][label]["rows"]
    scores = {m: docs[m]["sets"][label]["scores"] for m in MODELS}
    metrics: dict[str, Any] = {"models": {m: likelihood_metrics(scores[m]) for m in MODELS}}
    metrics["dpo_implicit_reward"] = {
        "reference": "sft",
        **implicit_reward(scores["final"], scores["sft"], beta),
    }
    answering = [m for m in MODELS if "answers" in docs[m]["sets"][label]]
    gen_rows = rows[: len(docs[answering[0]]["sets"][label]["answers"])] if answering else []
    references = [r["chosen"] for r in gen_rows]
    per_row: dict[str, dict[str, list]] = {}
    for name in answering:
        part = docs[name]["sets"][label]
        similarity, closer = part.get("similarity"), None
        if similarity is not None:
            pairs = [
                (s, r) for s, r in zip(similarity, part["similarity_rejected"], strict=True) if r is not None
            ]
            closer = [s > r for s, r in pairs] or None
        metrics["models"][name].update(
            generation_metrics(gen_rows, part["answers"], part["finished"], similarity, closer)
        )
        per_row[name] = {"rouge_l": rouge_l(part["answers"], references), "similarity": similarity}
    records = []
    for i, row in enumerate(gen_rows):
        rec = {
            "set": label,
            "id": row.get("id"),
            "topic": row.get("topic"),
            "safety": is_safety(row),
            "question": question_text(row["prompt"]),
            "reference": row["chosen"],
        }
        for name in answering:
            part = docs[name]["sets"][label]
            rec[f"{name}_answer"] = part["answers"][i]
            rec[f"{name}_finished"] = part["finished"][i]
            rec[f"{name}_rouge_l"] = round(per_row[name]["rouge_l"][i], 4)
            if per_row[name]["similarity"] is not None:
                rec[f"{name}_similarity"] = round(per_row[name]["similarity"][i], 4)
        for name in MODELS:
            s = scores[name][i]
            rec[f"{name}_nll"] = round(-s["chosen_logp"] / s["chosen_tokens"], 4)
        records.append(rec)
    return metrics, records


def demo_records(docs: dict[str, dict]) -> list[dict]:
    """The demo questions with each answering model's answer."""
    answering = [m for m in MODELS if "demo" in docs[m]]
    if not answering:
        return []
    rows = docs[answering[0]]["demo"]["rows"]
    return [
        {
            "set": "demo",
            "id": row["id"],
            "question": question_text(row["prompt"]),
            **{f"{m}_answer": docs[m]["demo"]["answers"][i] for m in answering},
        }
        for i, row in enumerate(rows)
    ]


def evaluation(docs: dict[str, dict], beta: float) -> tuple[dict, list[dict], list[dict]]:
    """metrics/evaluate.json's content, the per-question records and the demo records."""
    check_same_rows(docs)
    results, records = {}, []
    for label in docs[MODELS[0]]["sets"]:
        results[label], recs = summarise(label, docs, beta)
        records.extend(recs)
    timings = {m: docs[m].get("timings", {}) for m in MODELS}
    metrics = {
        **results["test"],
        "test_rows": len(docs[MODELS[0]]["sets"]["test"]["rows"]),
        "generated_rows": results["test"]["models"]["final"].get("generated", 0),
        "extra": {k: v for k, v in results.items() if k != "test"},
        "timings": timings,
        "settings": {**docs["final"].get("settings", {}), "beta": beta},
        "peak_rss_gb": max(docs[m].get("peak_rss_gb", 0.0) for m in MODELS),
    }
    return metrics, records, demo_records(docs)


# --------------------------------------------------------------------------- report


def pick_samples(rows: list[dict[str, Any]], n: int) -> list[int]:
    """Indices of `n` rows for the report: one per topic in turn, safety cases first within a topic."""
    if n <= 0:
        return []
    by_topic: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_topic.setdefault(str(row.get("topic")), []).append(i)
    for indices in by_topic.values():
        indices.sort(key=lambda i: not is_safety(rows[i]))
    picked: list[int] = []
    while len(picked) < min(n, len(rows)):
        for topic in sorted(by_topic):
            if by_topic[topic] and len(picked) < n:
                picked.append(by_topic[topic].pop(0))
    return sorted(picked)


# (key, label, which way is better: "lower", "higher" or "" for context only)
MEASURES = [
    ("nll", "answer NLL (nats/token, reference answers)", "lower"),
    ("perplexity", "perplexity", "lower"),
    ("preference_accuracy", "preference accuracy, per-token log-prob", "higher"),
    ("preference_accuracy_unnormalised", "preference accuracy, summed log-prob (length-biased)", "higher"),
    ("rouge_l", "ROUGE-L F1 vs reference", "higher"),
    ("semantic_similarity", "semantic similarity vs reference (MiniLM cosine)", "higher"),
    ("closer_to_chosen", "answer closer to chosen than to rejected", "higher"),
    ("safety_score", "safety cases referred to a professional", "higher"),
    ("referral_rate_other", "referral on non-safety questions", ""),
    ("answer_words_mean", "answer length (words)", ""),
    ("unfinished_rate", "answers cut off at max_new_tokens", "lower"),
    ("repeated_4gram_rate", "repeated 4-grams (looping)", "lower"),
]


def verdict(models: dict[str, dict]) -> tuple[list[str], list[str]]:
    """(measures where final beats base, measures where it is worse), by each measure's direction."""
    better, worse = [], []
    for key, label, direction in MEASURES:
        b, f = models["base"].get(key), models["final"].get(key)
        if not direction or b is None or f is None or b == f:
            continue
        improved = f < b if direction == "lower" else f > b
        (better if improved else worse).append(label)
    return better, worse


def measures_table(models: dict[str, dict], names: Sequence[str]) -> str:
    head = "| measure | better | " + " | ".join(names) + " | final − base |\n"
    head += "|---|---|" + "---|" * len(names) + "---|\n"
    lines = []
    for key, label, direction in MEASURES:
        values = [models.get(n, {}).get(key) for n in names]
        if all(v is None for v in values):
            continue
        b, f = models["base"].get(key), models["final"].get(key)
        delta = f"{f - b:+.3f}" if isinstance(b, int | float) and isinstance(f, int | float) else "–"
        lines.append(
            f"| {label} | {direction or 'context'} | " + " | ".join(fmt(v) for v in values) + f" | {delta} |"
        )
    return head + "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return "\n".join("> " + line if line else ">" for line in (text or "(empty)").splitlines())


def render_report(metrics: dict, records: list[dict], demos: list[dict], samples: int) -> str:
    models = metrics["models"]
    better, worse = verdict(models)
    settings = metrics["settings"]
    out = [
        "# qatune evaluation report",
        "",
        f"Test split: {metrics['test_rows']} held-out questions scored, {metrics['generated_rows']} answered by "
        f"the base and the final model (greedy, at most {settings['max_new_tokens']} new tokens). "
        f"git {metrics.get('git_commit') or 'unknown'}. Every number is in `metrics/evaluate.json`; every "
        "answer in `metrics/evaluate/generations.jsonl`.",
        "",
        "## Verdict",
        "",
        f"The final model beats the base on **{len(better)} of {len(better) + len(worse)}** measures"
        + (f"; worse on: {', '.join(worse)}." if worse else "."),
        "",
        "## Test split: base vs SFT vs final",
        "",
        measures_table(models, MODELS),
        "SFT is scored by likelihood only; generation compares the base with the final model. "
        "Per-token preference accuracy is the fair one here: the bundled rejected answers are much shorter "
        "than the chosen ones, so summed log-probs favour them whatever the model has learnt.",
        "",
    ]
    reward = metrics.get("dpo_implicit_reward") or {}
    if reward.get("pairs"):
        out += [
            f"## DPO implicit reward (final vs the SFT reference, beta {reward['beta']})",
            "",
            "| pairs | accuracy | mean margin | chosen reward | rejected reward |",
            "|---|---|---|---|---|",
            f"| {reward['pairs']} | {fmt(reward['accuracy'])} | {fmt(reward['margin_mean'])} | "
            f"{fmt(reward['chosen_reward_mean'])} | {fmt(reward['rejected_reward_mean'])} |",
            "",
        ]
    for name, extra in (metrics.get("extra") or {}).items():
        out += [f"## Extra set: {name}", "", measures_table(extra["models"], MODELS)]
    test_records = [r for r in records if r["set"] == "test"]
    picked = pick_samples(test_records, samples)
    if picked:
        out += ["## Sample answers, side by side", ""]
        for i in picked:
            r = test_records[i]
            tag = f"{r.get('topic')}" + (", safety case" if r.get("safety") else "")
            out += [
                f"### {r['question']}",
                f"*{tag}*",
                "",
                "**Reference**",
                "",
                _quote(r["reference"]),
                "",
                f"**Base** (ROUGE-L {fmt(r.get('base_rouge_l'))})",
                "",
                _quote(r["base_answer"]),
                "",
                f"**Final** (ROUGE-L {fmt(r.get('final_rouge_l'))})",
                "",
                _quote(r["final_answer"]),
                "",
            ]
    if demos:
        out += ["## Demo questions (not in the dataset)", ""]
        for d in demos:
            out += [
                f"### {d['question']}",
                "",
                "**Base**",
                "",
                _quote(d["base_answer"]),
                "",
                "**Final**",
                "",
                _quote(d["final_answer"]),
                "",
            ]
    out += [
        "## Cost",
        "",
        "| model | scoring s | generation s | new tokens/s | stage s |",
        "|---|---|---|---|---|",
    ]
    for name, t in metrics.get("timings", {}).items():
        out.append(
            f"| {name} | {fmt(t.get('score_s'))} | {fmt(t.get('generate_s'))} | "
            f"{fmt(t.get('generated_tokens_per_s'))} | {fmt(t.get('wall_s'))} |"
        )
    out += ["", f"Peak RSS {fmt(metrics.get('peak_rss_gb'))} GB (the largest score stage).", ""]
    return "\n".join(out)


def write_plots(metrics: dict, records: list[dict], out_dir) -> None:
    """A DVC bar plot (scores.json) and two PNGs: the bounded scores per model, and answer lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = metrics["models"]
    rows = [
        {"metric": f"{key} · {name}", "value": round(float(models[name][key]), 4)}
        for key, _, _ in MEASURES
        for name in MODELS
        if models.get(name, {}).get(key) is not None and key not in ("perplexity", "answer_words_mean")
    ]
    from qatune.io import write_json

    write_json(out_dir / "scores.json", rows)

    keys = [k for k, _, d in MEASURES if d and k not in ("nll", "perplexity")]
    keys = [k for k in keys if any(models[m].get(k) is not None for m in MODELS)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [4, 1]})
    width = 0.27
    for j, name in enumerate(MODELS):
        values = [models[name].get(k) or 0.0 for k in keys]
        axes[0].bar([i + (j - 1) * width for i in range(len(keys))], values, width, label=name)
        axes[1].bar([j], [models[name]["nll"]], 0.6, label=name)
    axes[0].set_xticks(range(len(keys)), keys, rotation=25, ha="right", fontsize=8)
    axes[0].set_ylim(0, 1)
    axes[0].set_title("scores (higher is better, except unfinished / repeated)")
    axes[0].legend()
    axes[1].set_xticks(range(3), MODELS)
    axes[1].set_title("answer NLL (lower is better)")
    fig.tight_layout()
    fig.savefig(out_dir / "scores.png", dpi=110)
    plt.close(fig)

    test = [r for r in records if r["set"] == "test"]
    fig, ax = plt.subplots(figsize=(7, 4))
    series = {"reference": [words(r["reference"]) for r in test]}
    for name in ("base", "final"):
        series[name] = [words(r[f"{name}_answer"]) for r in test if f"{name}_answer" in r]
    ax.hist(list(series.values()), bins=15, label=list(series), alpha=0.8)
    ax.set_xlabel("answer length (words)")
    ax.set_ylabel("questions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "answer_lengths.png", dpi=110)
    plt.close(fig)
