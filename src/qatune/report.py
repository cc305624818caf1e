"""The evaluation report, metrics/report.md: the numbers of qatune.evaluation written for a reader,
measure labels and numbers shown as qatune.display shows them.

The report opens with the answer a reader wants: is the final model better than the base (and than the
SFT-only model), on which measures, by how much, and how sure; every difference is paired by question and
carries a bootstrap interval. The tables, the DPO reward, sample and demo answers and the cost follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qatune import stance
from qatune.display import MEASURES, fmt, interval, is_number, signed
from qatune.evaluation import COMPARISONS, HARM_MEASURES, MODELS, NOT_PER_QUESTION, PER_QUESTION


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


SHOWN = {"base": "base", "sft": "SFT", "final": "final"}  # model names in the report's sentences


def difference_summary(new: str, old: str, block: dict[str, dict], questions: int) -> list[str]:
    """The opening's sentences for one comparison: the count, then each verdict's measures with numbers."""
    labels = {key: label for key, label, _ in PER_QUESTION}
    groups: dict[str, list[str]] = {"better": [], "worse": [], "no change": [], "context": []}
    for key, stats in block.items():
        where = "" if stats["n"] == questions else f" (on {stats['n']} question{'s' * (stats['n'] != 1)})"
        group = "context" if stats["direction"] == "context" else stats["verdict"]
        groups[group].append(f"{labels[key]}: {interval(stats)}{where}")
    better, worse, same = (len(groups[g]) for g in ("better", "worse", "no change"))
    head = (
        f"**{SHOWN[new].capitalize()} vs {SHOWN[old]}: better on {better} of {better + worse + same} "
        f"measures, worse on {worse or 'none'}**; {same} not distinguishable from no change on these "
        f"{questions} questions."
    )
    out = [head, ""]
    for group, title in (
        ("better", "Better (the 95% interval excludes zero)"),
        ("worse", "Worse (the 95% interval excludes zero)"),
        (
            "no change",
            f"Not distinguishable from no change on {questions} questions (the interval includes zero)",
        ),
        ("context", "Context, neither better nor worse"),
    ):
        if groups[group]:
            out += [f"- {title}:", *(f"  - {item}" for item in groups[group])]
    return out + [""]


def differences_table(new: str, old: str, block: dict[str, dict]) -> str:
    labels = {key: label for key, label, _ in PER_QUESTION}
    head = (
        f"| measure | better | {SHOWN[old]} | {SHOWN[new]} | {SHOWN[new]} − {SHOWN[old]} [95% interval] | "
        f"P({SHOWN[new]} better) | questions "
        "| verdict |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {labels[key]} | {s['direction']} | {fmt(s[old])} | {fmt(s[new])} | {interval(s)} | "
        + ("–" if s["p_better"] is None else f"{100 * s['p_better']:.1f}%")
        + f" | {s['n']} | {s['verdict']} |"
        for key, s in block.items()
    ]
    return head + "\n".join(lines) + "\n"


def held_out_split(metrics: dict) -> str:
    """The split the score stages read (`evaluate.split`): test, or val where a profile has no test split."""
    return (metrics.get("settings") or {}).get("split", "test")


def render_harm_first(metrics: dict, records: list[dict], examples: int = 4) -> list[str]:
    """The report's first section: does the final model say yes to harm, or get facts wrong, more than
    the base? The verdict, the four measures with their intervals, and the answers behind them."""
    v = metrics.get("verdict") or {}
    split = held_out_split(metrics)
    out = ["## Safety stance and key facts, final vs base", ""]
    if not v.get("judged"):
        return out + [
            f"No {split} row says which stance a safe answer takes (`expected`) or which fact it states "
            "(`fact`), so nothing here can say whether the tuned model is safer or more correct. The bundled "
            "dataset has both fields; docs/formats.md says how to add them to your own data.",
            "",
        ]
    if v["worse_than_base"]:
        out += [f"**Verdict: WORSE than the base.** The final model {'; it '.join(v['reasons'])}.", ""]
        out += [
            "Whatever the measures below say, this model is more dangerous or less correct than the one it "
            "started from; push-to-hub refuses to publish it unless `hub.allow_worse_than_base: true`.",
            "",
        ]
    else:
        harm, contra, yes_no = v["harmful_affirmed"], v["facts_contradicted"], v.get("yes_no_wrong") or {}
        out += [
            f"**Verdict: no more harmful than the base.** Harmful requests affirmed: base {harm['base']}, "
            f"final {harm['final']} of {harm['of']}; key facts contradicted: base {contra['base']}, final "
            f"{contra['final']} of {contra['of']}; yes/no questions answered the opposite way: base "
            f"{yes_no.get('base')}, final {yes_no.get('final')} of {yes_no.get('of')}.",
            "",
        ]
    block = (metrics.get("differences") or {}).get("final_vs_base") or {}
    models = metrics["models"]
    labels = {key: (label, direction) for key, label, direction in MEASURES}
    out += [
        "| measure | better | base | final | final − base [95% interval] | questions |",
        "|---|---|---|---|---|---|",
    ]
    for key in HARM_MEASURES:
        label, direction = labels[key]
        s = block.get(key)
        out.append(
            f"| {label} | {direction} | {fmt(models['base'].get(key))} | {fmt(models['final'].get(key))} | "
            f"{interval(s) if s else '–'} | {s['n'] if s else 0} |"
        )
    stances = models["final"].get("stances") or {}
    base_stances = models["base"].get("stances") or {}
    if stances:
        out += ["", "Stance of the answers (qatune.stance), base → final:", ""]
        out += [
            "| safe answer should | " + " | ".join(stance.STANCES) + " |",
            "|---|" + "---|" * len(stance.STANCES),
        ]
        for expected, counts in stances.items():
            before = base_stances.get(expected, {})
            out.append(
                f"| {expected} | "
                + " | ".join(f"{before.get(k, 0)} → {counts.get(k, 0)}" for k in stance.STANCES)
                + " |"
            )
    out += [
        "",
        "How: each safety row states the stance a safe answer takes (`expected`: decline for a harmful "
        "request, caution where a conditional yes with a referral is right), and qatune.stance reads the "
        "stance from what the answer commits to, its opening first (a yes with a referral appended still "
        "affirms); its accuracy on hand-labelled answers is in bench/RESULTS.md. Each fact row states its key "
        "fact as a number and unit (qatune.facts); an answer states it when it gives a number inside the "
        "accepted range (±10%), contradicts it when it gives another number for the same quantity. A yes/no "
        "question (not a safety request) whose reference answer opens with yes or no is answered the opposite "
        "way when the answer opens with the other one (qatune.stance.opening_answer); an answer that opens with "
        "neither does not count against it. Intervals: the paired bootstrap described below.",
        "",
    ]
    test = [r for r in records if r["set"] == "test"]
    worse = [r for r in test if r.get("expected") == "decline" and r.get("final_stance") == "affirms"][
        :examples
    ]
    wrong = [r for r in test if "contradicts" in r.get("final_fact", "")][:examples]
    flipped = [r for r in test if r.get("final_yes_no") not in (None, r.get("yes_no"))][:examples]
    for title, rows in (
        ("Harmful requests the final model affirms", worse),
        ("Key facts the final model contradicts", wrong),
        ("Yes/no questions the final model answers the opposite way", flipped),
    ):
        if not rows:
            continue
        out += [f"### {title}", ""]
        for r in rows:
            if "expected" in r:
                tag, base_note = f"expected: {r['expected']}", r.get("base_stance")
            elif rows is flipped:
                tag, base_note = f"reference opens: {r['yes_no']}", r.get("base_yes_no") or "neither"
            else:
                tag, base_note = f"fact: {r['fact']}", r.get("base_fact")
            out += [
                f"**{r['question']}** ({tag}; base: {base_note})",
                "",
                _quote(r["final_answer"]),
                "",
            ]
    return out


def render_judge(metrics: dict) -> list[str]:
    """The optional LLM judge's means per model (docs/judge.md): context, never the verdict."""
    j = metrics.get("judge")
    if not j:
        return []
    out = [
        f"### LLM judge ({j['model']}, rubric v{j['rubric_version']})",
        "",
        "| model | judged | mean correct (1-5) | mean safe (1-5) | judged unsafe (safe <= 2) | unreadable replies |",
        "|---|---|---|---|---|---|",
    ]
    for name in MODELS:
        s = j.get(name)
        if s:
            out.append(
                f"| {name} | {s['judged']} | {fmt(s['mean_correct'])} | {fmt(s['mean_safe'])} | "
                f"{fmt(s['unsafe_rate'])} | {s['errors']} |"
            )
    return out + [
        "",
        "A judge model's scores are only as good as the judge: the stance and fact measures above need none, "
        "and the verdict rests on them alone.",
        "",
    ]


def render_opening(metrics: dict, plot_dir: str | None) -> list[str]:
    """The report's first section: is the final model better, where, by how much, and how sure."""
    diffs = metrics.get("differences") or {}
    method, questions = diffs.get("method") or {}, metrics["test_rows"]
    split = held_out_split(metrics)
    out = ["## Is the tuned model better than the base?", ""]
    if not diffs.get("final_vs_base"):
        return out + ["No per-question scores to compare.", ""]
    against = (
        "against the base and, on the likelihood of the reference answers only (the SFT model answers no "
        "questions), against the SFT-only model"
        if metrics.get("sft_run", True)
        else "against the base (no SFT run: sft.enabled is false, DPO started from the base)"
    )
    tuned = "SFT + DPO" if metrics.get("sft_run", True) else "DPO"
    out += [
        f"The final model ({tuned}) on the {questions} held-out {split} questions, {against}. Each number is "
        "the mean per-question difference, final minus the other model, then [its 95% interval]; how they "
        "are computed follows the tables.",
        "",
    ]
    for new, old in COMPARISONS:
        if diffs.get(f"{new}_vs_{old}"):
            out += difference_summary(new, old, diffs[f"{new}_vs_{old}"], questions)
    for new, old in COMPARISONS:
        if diffs.get(f"{new}_vs_{old}"):
            out += [differences_table(new, old, diffs[f"{new}_vs_{old}"])]
    out += [
        f"How sure: a paired bootstrap over the {split} questions. Each measure is taken per question for both "
        f"models, and the questions are resampled with replacement {method['resamples']:,} times (seed "
        f"{method['seed']}); the interval holds the central {method['level']:.0%} of the resampled mean "
        "differences, and P(final better) is the share of resamples where the final model comes out "
        "ahead. An interval that includes zero means these questions cannot tell the change from no "
        "change. The means here weigh every question the same; the next table's answer NLL weighs every "
        f"token. No interval for {NOT_PER_QUESTION}. The plot shows every question's difference, sorted, "
        "with the mean and its interval.",
        "",
    ]
    if plot_dir is not None:
        out += [f"![per-question differences, final − base]({plot_dir}/per_question.png)", ""]
    return out


def pick_changes(records: list[dict[str, Any]], n: int, key: str) -> list[tuple[int, str, float]]:
    """(index, "better" or "worse", final − base of `key`) for `n` answers: the (n + 1) // 2 that gained
    most, then the n // 2 that lost most. An unchanged answer is neither; a side with fewer changes
    shows fewer."""
    changes = [
        (i, r[f"final_{key}"] - r[f"base_{key}"])
        for i, r in enumerate(records)
        if is_number(r.get(f"final_{key}")) and is_number(r.get(f"base_{key}"))
    ]
    gains = sorted((c for c in changes if c[1] > 0), key=lambda c: (-c[1], c[0]))[: (n + 1) // 2]
    losses = sorted((c for c in changes if c[1] < 0), key=lambda c: (c[1], c[0]))[: n // 2]
    return [(i, "better", d) for i, d in gains] + [(i, "worse", d) for i, d in losses]


SAMPLE_MEASURES = {  # what picks the sample answers, the first one the records have
    "similarity": "similarity to the reference answer (MiniLM cosine)",
    "rouge_l": "ROUGE-L F1 against the reference answer",
}


def render_samples(records: list[dict], samples: int) -> list[str]:
    """The test answers that changed most between base and final, each labelled better or worse."""
    test = [r for r in records if r["set"] == "test"]
    key = next((k for k in SAMPLE_MEASURES if test and is_number(test[0].get(f"final_{k}"))), None)
    picked = pick_changes(test, samples, key) if key else []
    if not picked:
        return []
    label = SAMPLE_MEASURES[key]
    gained = sum(1 for _, which, _ in picked if which == "better")
    out = [
        "## Sample answers: where the final model got better, and worse",
        "",
        f"Picked by one per-question measure, the {label}, final − base: the {gained} held-out questions where "
        f"it rose most, then the {len(picked) - gained} where it fell most. One number picks them; read the "
        "answers to judge them.",
        "",
    ]
    for i, which, change in picked:
        r = test[i]
        tag = f"{r.get('topic')}" + (", safety case" if r.get("safety") else "")
        out += [
            f"### {which.capitalize()} ({signed(change)}): {r['question']}",
            f"*{tag} · {label}: base {fmt(r[f'base_{key}'])} → final {fmt(r[f'final_{key}'])}*",
            "",
            "**Reference**",
            "",
            _quote(r["reference"]),
            "",
            f"**Base** (similarity {fmt(r.get('base_similarity'))}, ROUGE-L {fmt(r.get('base_rouge_l'))})",
            "",
            _quote(r["base_answer"]),
            "",
            f"**Final** (similarity {fmt(r.get('final_similarity'))}, ROUGE-L {fmt(r.get('final_rouge_l'))})",
            "",
            _quote(r["final_answer"]),
            "",
        ]
    return out


def render_report(
    metrics: dict, records: list[dict], demos: list[dict], samples: int, plot_dir: str | None = None
) -> str:
    """metrics/report.md; `plot_dir`: the plots folder relative to the report, for the opening's plot."""
    models = metrics["models"]
    settings = metrics["settings"]
    split = held_out_split(metrics).capitalize()
    out = [
        "# qatune evaluation report",
        "",
        *render_harm_first(metrics, records),
        *render_judge(metrics),
        *render_opening(metrics, plot_dir),
        f"## {split} split: base vs SFT vs final",
        "",
        f"{split} split: {metrics['test_rows']} held-out questions scored, {metrics['generated_rows']} answered by "
        f"the base and the final model (greedy, at most {settings['max_new_tokens']} new tokens). "
        f"git {metrics.get('git_commit') or 'unknown'}. Every number is in `metrics/evaluate.json`; every "
        "answer in `metrics/evaluate/generations.jsonl`.",
        "",
        measures_table(models, MODELS),
        (
            "SFT is scored by likelihood only; "
            if metrics.get("sft_run", True)
            else "No SFT run (sft.enabled: false): the sft column scores the base itself; "
        )
        + "generation compares the base with the final model. "
        "Per-token preference accuracy is the fair one of the likelihood measures; on the pairs whose rejected "
        "answer is at least as long as the chosen one (the length-controlled row) a taste for long, hedged "
        "answers cannot score. Summed log-probs favour whichever answer is shorter.",
        "",
    ]
    reward = metrics.get("dpo_implicit_reward") or {}
    if reward.get("pairs"):
        out += [
            f"## DPO implicit reward (final vs the {'base' if reward.get('reference') == 'base' else 'SFT'} reference, "
            f"beta {reward['beta']})",
            "",
            "| pairs | accuracy | mean margin | chosen reward | rejected reward |",
            "|---|---|---|---|---|",
            f"| {reward['pairs']} | {fmt(reward['accuracy'])} | {fmt(reward['margin_mean'])} | "
            f"{fmt(reward['chosen_reward_mean'])} | {fmt(reward['rejected_reward_mean'])} |",
            "",
        ]
    for name, extra in (metrics.get("extra") or {}).items():
        out += [f"## Extra set: {name}", "", measures_table(extra["models"], MODELS)]
    out += render_samples(records, samples)
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
