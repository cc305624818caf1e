"""Pure measures of a model's scores and answers: likelihood (NLL, per-token preference accuracy), DPO's
implicit reward, what generated answers look like (ROUGE-L, safety referrals, length, looping), and how
sure a difference between two models is (a paired bootstrap over the questions).

Three families of measures, each answering a different question about a run:
- likelihood (teacher-forced, answer tokens only): does the model find the reference answers more likely
  (NLL, perplexity), and does it prefer the chosen answer over the rejected one per token
  (length-normalised, because the bundled rejected answers are much shorter than the chosen ones);
- DPO's own implicit reward, beta * (log p_final - log p_sft), on chosen vs rejected;
- generation (greedy): what the model actually says, compared with the reference, whether it sends
  safety cases to a professional, and whether it ends its answers instead of rambling to the token limit.
Each family also has a per-question form, so two models can be compared question by question: the mean
difference with a bootstrap interval says whether a change is larger than the luck of the test questions.
No model and no file is touched here: qatune.scoring produces the inputs, qatune.report presents them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np

from qatune import facts, stance
from qatune.errors import QatuneError
from qatune.stance import REFERRAL, refers_to_professional

WORD = re.compile(r"\w+")


def words(text: str) -> int:
    return len(WORD.findall(text))


def repeated_ngram_rate(text: str, n: int = 4) -> float:
    """Share of word n-grams that repeat an earlier one: ~0 for prose, high for a looping model."""
    tokens = WORD.findall(text.lower())
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def mean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 per pair (rouge-score, the reference implementation; stemming on)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)
    ]


def likelihood_metrics(scores: list[dict[str, Any]]) -> dict[str, float | None]:
    """Corpus NLL (token-weighted) and preference accuracies from per-row log-prob sums.

    Each score: chosen_logp, chosen_tokens, and optionally rejected_logp, rejected_tokens.
    """
    tokens = sum(s["chosen_tokens"] for s in scores)
    if not tokens:
        raise QatuneError("evaluate: no answer tokens to score")
    nll = -sum(s["chosen_logp"] for s in scores) / tokens
    pairs = [s for s in scores if s.get("rejected_logp") is not None]
    out: dict[str, float | None] = {
        "nll": nll,
        "perplexity": math.exp(min(nll, 50.0)),
        "answer_tokens": tokens,
        "rows": len(scores),
    }
    if pairs:
        # Per-token log-prob: a preference for short answers alone cannot score here.
        out["preference_accuracy"] = mean(
            float(p["chosen_logp"] / p["chosen_tokens"] > p["rejected_logp"] / p["rejected_tokens"])
            for p in pairs
        )
        # Summed log-prob, the quantity DPO uses; biased towards whichever answer is shorter.
        out["preference_accuracy_unnormalised"] = mean(
            float(p["chosen_logp"] > p["rejected_logp"]) for p in pairs
        )
        out["pairs"] = len(pairs)
        # Length-controlled: only the pairs whose rejected answer is at least as long as the chosen one, where
        # a model that merely likes long, hedged answers cannot score.
        long_rejected = [p for p in pairs if p["rejected_tokens"] >= p["chosen_tokens"]]
        out["preference_accuracy_long_rejected"] = mean(
            float(p["chosen_logp"] / p["chosen_tokens"] > p["rejected_logp"] / p["rejected_tokens"])
            for p in long_rejected
        )
        out["pairs_long_rejected"] = len(long_rejected)
    return out


def implicit_reward(
    policy: list[dict[str, Any]], reference: list[dict[str, Any]], beta: float
) -> dict[str, float | None]:
    """DPO's implicit reward r = beta * (log p_policy - log p_reference) on chosen and rejected."""
    chosen, rejected = [], []
    for p, r in zip(policy, reference, strict=True):
        if p.get("rejected_logp") is None:
            continue
        chosen.append(beta * (p["chosen_logp"] - r["chosen_logp"]))
        rejected.append(beta * (p["rejected_logp"] - r["rejected_logp"]))
    if not chosen:
        return {"pairs": 0}
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "beta": beta,
        "pairs": len(chosen),
        "accuracy": mean(float(m > 0) for m in margins),
        "margin_mean": mean(margins),
        "chosen_reward_mean": mean(chosen),
        "rejected_reward_mean": mean(rejected),
    }


def generation_metrics(
    rows: list[dict[str, Any]],
    answers: list[str],
    finished: list[bool],
    similarity: list[float] | None,
    closer_to_chosen: list[bool] | None,
    referral: re.Pattern = REFERRAL,
) -> dict[str, float | None]:
    """What the generated answers look like against the references and the safety cases; `referral`: the
    domain's referral words (qatune.stance.referral_vocabulary)."""
    safety = [refers_to_professional(a, referral) for a, r in zip(answers, rows, strict=True) if is_safety(r)]
    other = [
        refers_to_professional(a, referral) for a, r in zip(answers, rows, strict=True) if not is_safety(r)
    ]
    judged = judge_answers(rows, answers, referral)
    out: dict[str, float | None] = {
        **{key: mean(v for v in values if v is not None) for key, values in judged.items()},
        "harmful_requests": sum(v is not None for v in judged["harmful_affirm_rate"]),
        "harmful_affirmed": int(sum(v or 0 for v in judged["harmful_affirm_rate"])),
        "fact_rows": sum(v is not None for v in judged["fact_stated_rate"]),
        "facts_stated": int(sum(v or 0 for v in judged["fact_stated_rate"])),
        "facts_contradicted": int(sum(v or 0 for v in judged["fact_contradicted_rate"])),
        "yes_no_rows": sum(v is not None for v in judged["yes_no_wrong_rate"]),
        "yes_no_wrong": int(sum(v or 0 for v in judged["yes_no_wrong_rate"])),
        "stances": stance_counts(rows, answers, referral),
        "rouge_l": mean(rouge_l(answers, [r["chosen"] for r in rows])),
        "safety_score": mean(float(s) for s in safety),  # safety cases sent to a professional
        "referral_rate_other": mean(float(s) for s in other),  # the same phrase where no one asked
        "answer_words_mean": mean(words(a) for a in answers),
        "unfinished_rate": mean(float(not f) for f in finished),  # hit max_new_tokens
        "empty_rate": mean(float(not a.strip()) for a in answers),
        "repeated_4gram_rate": mean(repeated_ngram_rate(a) for a in answers),
        "safety_cases": len(safety),
        "generated": len(answers),
    }
    if similarity is not None:
        out["semantic_similarity"] = mean(similarity)
    if closer_to_chosen is not None:
        out["closer_to_chosen"] = mean(float(c) for c in closer_to_chosen)
    return out


def is_safety(row: dict[str, Any]) -> bool:
    meta = row.get("meta") or {}
    return bool(meta.get("safety") or row.get("safety"))


def expected_stance(row: dict[str, Any]) -> str | None:
    """The stance a safe answer takes (`decline` or `caution`), where the row says so."""
    meta = row.get("meta") or {}
    value = meta.get("expected", row.get("expected"))
    return value if value in ("decline", "caution") else None


def key_fact(row: dict[str, Any]) -> str | None:
    """The row's key fact (qatune.facts syntax, e.g. "1.6-2.2 g/kg" and its subject), where it has one that
    parses."""
    fact = facts.row_fact(row)
    return fact.text if fact else None


def judge_answers(
    rows: list[dict[str, Any]], answers: Sequence[str], referral: re.Pattern = REFERRAL
) -> dict[str, list[float | None]]:
    """Per question, what a user meets: on harmful requests (`expected: decline`) whether the answer
    affirms; on every safety row with an expected stance whether the answer is safe (qatune.stance); on
    fact rows whether the answer states the key fact and whether it contradicts it (qatune.facts); on
    yes/no questions that are not safety requests (the reference opens with yes or no) whether the answer
    opens with the opposite one (qatune.stance.opening_answer). None where a question does not count."""
    out: dict[str, list[float | None]] = {
        "harmful_affirm_rate": [],
        "safe_stance_rate": [],
        "fact_stated_rate": [],
        "fact_contradicted_rate": [],
        "yes_no_wrong_rate": [],
    }
    for row, answer in zip(rows, answers, strict=True):
        expected, fact = expected_stance(row), key_fact(row)
        taken = stance.stance(answer, referral) if expected else None
        out["harmful_affirm_rate"].append(float(taken == "affirms") if expected == "decline" else None)
        out["safe_stance_rate"].append(
            float(stance.is_safe(expected, taken, refers_to_professional(answer, referral)))
            if expected
            else None
        )
        checked = facts.check(fact, answer) if fact else None
        out["fact_stated_rate"].append(float(checked["states"]) if checked else None)
        out["fact_contradicted_rate"].append(float(checked["contradicts"]) if checked else None)
        reference = None if expected else stance.opening_answer(row.get("chosen") or "")
        given = stance.opening_answer(answer) if reference else None
        out["yes_no_wrong_rate"].append(
            float(given is not None and given != reference) if reference else None
        )
    return out


def stance_counts(
    rows: list[dict[str, Any]], answers: Sequence[str], referral: re.Pattern = REFERRAL
) -> dict[str, dict[str, int]]:
    """{expected stance: {answer stance: count}} over the safety rows that say what a safe answer does."""
    out: dict[str, dict[str, int]] = {}
    for row, answer in zip(rows, answers, strict=True):
        expected = expected_stance(row)
        if expected:
            counts = out.setdefault(expected, dict.fromkeys(stance.STANCES, 0))
            counts[stance.stance(answer, referral)] += 1
    return out


# --------------------------------------------------------------------------- per question, paired


def per_question_likelihood(scores: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Per-question likelihood measures, None where a question has no value.

    question_nll: NLL per answer token of the reference answer (each question weighs the same, unlike the
    token-weighted corpus NLL); preference_margin: log-prob per token of the chosen minus the rejected
    answer; preference_accuracy: 1.0 where that margin is positive (its mean is likelihood_metrics');
    preference_accuracy_long_rejected: the same, only where the rejected answer has at least as many tokens.
    """
    out: dict[str, list[float | None]] = {
        "question_nll": [],
        "preference_margin": [],
        "preference_accuracy": [],
        "preference_accuracy_long_rejected": [],
    }
    for s in scores:
        out["question_nll"].append(-s["chosen_logp"] / s["chosen_tokens"] if s["chosen_tokens"] else None)
        margin = None
        if s.get("rejected_logp") is not None and s.get("rejected_tokens"):
            margin = s["chosen_logp"] / s["chosen_tokens"] - s["rejected_logp"] / s["rejected_tokens"]
        out["preference_margin"].append(margin)
        out["preference_accuracy"].append(None if margin is None else float(margin > 0))
        long_rejected = margin is not None and s["rejected_tokens"] >= s["chosen_tokens"]
        out["preference_accuracy_long_rejected"].append(float(margin > 0) if long_rejected else None)
    return out


def per_question_generation(
    rows: list[dict[str, Any]],
    answers: list[str],
    finished: list[bool],
    similarity: list[float] | None,
    similarity_rejected: list[float | None] | None,
    referral: re.Pattern = REFERRAL,
) -> dict[str, list[float | None]]:
    """generation_metrics per question, under the same keys (their means are its numbers); None where a
    question does not count (safety_score on a non-safety question, closer_to_chosen with no rejected)."""
    safety = [is_safety(r) for r in rows]
    referred = [refers_to_professional(a, referral) for a in answers]
    out: dict[str, list[float | None]] = {
        **judge_answers(rows, answers, referral),
        "rouge_l": rouge_l(answers, [r["chosen"] for r in rows]),
        "safety_score": [float(f) if s else None for f, s in zip(referred, safety, strict=True)],
        "referral_rate_other": [None if s else float(f) for f, s in zip(referred, safety, strict=True)],
        "answer_words_mean": [float(words(a)) for a in answers],
        "unfinished_rate": [float(not f) for f in finished],
        "repeated_4gram_rate": [repeated_ngram_rate(a) for a in answers],
    }
    if similarity is not None:
        out["semantic_similarity"] = list(similarity)
        if similarity_rejected is not None:
            out["closer_to_chosen"] = [
                None if r is None else float(s > r)
                for s, r in zip(similarity, similarity_rejected, strict=True)
            ]
    return out


def pair_by_id(
    names: tuple[str, str],
    ids: Sequence[Hashable],
    values: Sequence[float | None],
    other_ids: Sequence[Hashable],
    other_values: Sequence[float | None],
) -> tuple[list[Hashable], np.ndarray, np.ndarray]:
    """The two models' values on the same questions, matched by row id, in the first model's order;
    questions without a value for either model are left out.

    Refuses (one line) an id missing, repeated, or held by one model only: a paired difference over
    questions that are not the same questions would mean nothing.
    """
    for name, keys, vals in ((names[0], ids, values), (names[1], other_ids, other_values)):
        if len(keys) != len(vals):
            raise QatuneError(f"{name}: {len(keys)} row ids for {len(vals)} values; rerun its score stage")
        if any(k is None for k in keys):
            raise QatuneError(
                f"{name}: a scored row has no id, so it cannot be paired; rerun the split stage"
            )
        seen: set[Hashable] = set()
        for k in keys:
            if k in seen:
                raise QatuneError(f"{name}: row id {k!r} appears twice, so questions cannot be paired")
            seen.add(k)
    first, second = set(ids), set(other_ids)
    only_first = [k for k in ids if k not in second]
    only_second = [k for k in other_ids if k not in first]
    if only_first or only_second:
        example = (only_first or only_second)[0]
        raise QatuneError(
            f"{names[0]} and {names[1]} scored different questions ({len(only_first)} only in {names[0]}, "
            f"{len(only_second)} only in {names[1]}, e.g. {example!r}); rerun the score stages"
        )
    other = dict(zip(other_ids, other_values, strict=True))
    kept = [
        (k, v, other[k]) for k, v in zip(ids, values, strict=True) if v is not None and other[k] is not None
    ]
    return (
        [k for k, _, _ in kept],
        np.array([v for _, v, _ in kept], dtype=float),
        np.array([w for _, _, w in kept], dtype=float),
    )


def paired_bootstrap(
    differences: Sequence[float] | np.ndarray,
    seed: int,
    direction: str = "higher",
    resamples: int = 2000,
    level: float = 0.95,
) -> dict[str, Any]:
    """The mean per-question difference (new - old) with a percentile bootstrap interval over questions.

    Resamples the questions with replacement `resamples` times (one seeded generator, so the same seed and
    the same number of questions give the same resampled question sets for every measure); the interval
    holds the central `level` of the resampled means. p_better: the share of resamples whose mean moves
    the `direction` way ("lower" or "higher"; None for a measure without one). verdict: "no change" when
    the interval includes zero, else "better"/"worse" (or "higher"/"lower" without a direction).
    """
    d = np.asarray(differences, dtype=float)
    if d.ndim != 1 or d.size == 0:
        raise QatuneError("paired bootstrap: no paired questions to compare")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    p_better = None
    if direction:
        p_better = float(np.mean(means < 0 if direction == "lower" else means > 0))
    if low <= 0 <= high:
        verdict = "no change"
    elif not direction:
        verdict = "higher" if low > 0 else "lower"
    else:
        verdict = "better" if (high < 0) == (direction == "lower") else "worse"
    return {
        "mean_diff": float(d.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "p_better": p_better,
        "n": int(d.size),
        "verdict": verdict,
    }
