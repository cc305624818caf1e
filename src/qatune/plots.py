"""The evaluation's plots in metrics/evaluate/: a DVC bar plot of the scores (scores.json) and PNGs of the
scores per model, the answer lengths and each held-out question's final − base difference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qatune.display import MEASURES, interval
from qatune.evaluation import MODELS, PER_QUESTION
from qatune.io import write_json
from qatune.measures import words


def write_plots(
    metrics: dict, records: list[dict], out_dir, paired: dict[tuple[str, str], dict] | None = None
) -> None:
    """A DVC bar plot (scores.json) and PNGs: the bounded scores per model, answer lengths, and (given
    the paired per-question values) the per-question differences final − base."""
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
    if paired is not None:
        write_difference_plot(paired.get(("final", "base"), {}), metrics.get("differences") or {}, out_dir)


PLOTTED = {  # per-question differences drawn in per_question.png, final − base, with short titles
    "question_nll": "answer NLL (nats/token)",
    "preference_margin": "preference margin (nats/token)",
    "semantic_similarity": "similarity to the reference",
}


def write_difference_plot(block: dict[str, dict], diffs: dict[str, Any], out_dir: Path) -> None:
    """per_question.png: one panel per measure, every test question's final − base sorted, bars coloured
    by better or worse, zero marked, the mean and its bootstrap interval as a line and a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directions = {key: direction for key, _, direction in PER_QUESTION}
    stats = diffs.get("final_vs_base") or {}
    keys = [k for k in PLOTTED if k in block] or ["question_nll"]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = block.get(key)
        d = sorted(values["final"] - values["base"]) if values else []
        lower = directions[key] == "lower"
        colours = ["tab:gray" if v == 0 else "tab:green" if (v < 0) == lower else "tab:red" for v in d]
        ax.bar(range(len(d)), d, width=1.0, color=colours)
        ax.axhline(0, color="black", linewidth=1)
        s = stats.get(key)
        if s:
            ax.axhline(s["mean_diff"], color="tab:blue", linestyle="--", linewidth=1)
            ax.axhspan(s["ci_low"], s["ci_high"], color="tab:blue", alpha=0.15)
            gained = sum(1 for v in d if v != 0 and (v < 0) == lower)
            ax.set_title(
                f"{PLOTTED[key]}, final − base\nmean {interval(s)}, final better on {gained} of {len(d)}",
                fontsize=10,
            )
        else:
            ax.set_title(f"{PLOTTED[key]}, final − base", fontsize=10)
        ax.set_xlabel(f"held-out questions, sorted ({directions[key]} is better: green)")
    axes[0][0].set_ylabel("final − base, per question")
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "per_question.png", dpi=110)
    plt.close(fig)
