"""How measures are shown: each measure's key, label and which way is better (MEASURES), in the order tables
list them, the one number format (fmt), and a difference with its interval (signed, interval). The evaluation report, the model cards and `qatune compare`
all print measures this way; keeping it apart from the report's prose means a card depends only on how a
number looks, not on what the report says around it.
"""

from __future__ import annotations

import math
from typing import Any


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: Any) -> str:
    """4 significant digits: metrics from a few hundred test rows carry no more."""
    if not is_number(value):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


# (key, label, which way is better: "lower", "higher" or "" for context only)
MEASURES = [
    ("harmful_affirm_rate", "harmful requests affirmed (expected: decline, answer affirms)", "lower"),
    (
        "safe_stance_rate",
        "safety questions answered safely (stance; a yes needs a referral on caution rows)",
        "higher",
    ),
    ("fact_contradicted_rate", "key facts contradicted (another number for the same quantity)", "lower"),
    ("fact_stated_rate", "key facts stated (the accepted number with its unit)", "higher"),
    (
        "yes_no_wrong_rate",
        "yes/no questions answered the opposite way (opening yes/no vs the reference's)",
        "lower",
    ),
    ("nll", "answer NLL (nats/token, reference answers)", "lower"),
    ("perplexity", "perplexity", "lower"),
    ("preference_accuracy", "preference accuracy, per-token log-prob", "higher"),
    (
        "preference_accuracy_long_rejected",
        "preference accuracy, per-token, pairs whose rejected answer is as long or longer",
        "higher",
    ),
    ("preference_accuracy_unnormalised", "preference accuracy, summed log-prob (length-biased)", "higher"),
    ("rouge_l", "ROUGE-L F1 vs reference", "higher"),
    ("semantic_similarity", "semantic similarity vs reference (MiniLM cosine)", "higher"),
    ("closer_to_chosen", "answer closer to chosen than to rejected", "higher"),
    ("safety_score", "safety cases naming a professional (referral words only: blind to a yes)", ""),
    ("referral_rate_other", "referral on non-safety questions", ""),
    ("answer_words_mean", "answer length (words)", ""),
    ("unfinished_rate", "answers cut off at max_new_tokens", "lower"),
    ("repeated_4gram_rate", "repeated 4-grams (looping)", "lower"),
]


def signed(value: float, decimals: int | None = None) -> str:
    """A difference: sign shown, exactly zero as "0"; 3 significant digits unless `decimals` is given."""
    if value == 0:
        return "0"
    return f"{value:+.3g}" if decimals is None else f"{value:+.{decimals}f}"


def interval(stats: dict) -> str:
    """ "mean [low, high]" to two significant digits of the interval's width, so the digits shown are the
    ones the data can tell apart; an end that is not zero never prints as zero."""
    low, high = stats["ci_low"], stats["ci_high"]
    decimals = 1 - math.floor(math.log10(high - low)) if high > low else 3
    for end in (low, high):
        if end != 0:
            decimals = max(decimals, -math.floor(math.log10(abs(end))))
    decimals = min(max(decimals, 0), 8)
    return f"{signed(stats['mean_diff'], decimals)} [{signed(low, decimals)}, {signed(high, decimals)}]"
