"""Deterministic train / val / test split that never lets one question straddle two splits."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Any

from qatune.errors import QatuneError
from qatune.formats import Record, dedup_key, question_text

SPLITS = ("train", "val", "test")


def resolve_size(size: float, total: int, name: str) -> int:
    """A fraction (< 1) of `total` rows, or an absolute count (>= 1)."""
    if size < 1:
        return round(size * total)
    if size != int(size):
        raise QatuneError(
            f"params.yaml: 'split.{name}': {size} is neither a fraction below 1 nor a whole count"
        )
    return int(size)


def _largest_remainder(weights: dict[str, int], total: int) -> dict[str, int]:
    whole = sum(weights.values())
    if whole == 0:
        return dict.fromkeys(weights, 0)
    shares = {k: w * total / whole for k, w in weights.items()}
    out = {k: int(s) for k, s in shares.items()}
    for k in sorted(shares, key=lambda k: (shares[k] - out[k], k), reverse=True)[: total - sum(out.values())]:
        out[k] += 1
    return out


def split_rows(
    rows: list[Record],
    val: float,
    test: float,
    seed: int,
    stratify: str | None = "topic",
    given: dict[str, str] | None = None,
) -> dict[str, list[Record]]:
    """Assign whole question groups to splits by seed, keeping topic proportions if asked.

    `given` maps a source name to the split its rows are, as the source gave them (a separate
    validation file): those rows are placed as they are, the others are split by `val` and `test`.
    The result depends only on the set of rows and the seed, not on their order.
    """
    given = given or {}
    placed = [r for r in rows if r.get("source") in given]
    rows = [r for r in rows if r.get("source") not in given]
    if not rows and (val or test):
        raise QatuneError(
            "params.yaml: every source has use_as, so split.val and split.test find no rows: set them to 0"
        )
    n = len(rows)
    n_val, n_test = resolve_size(val, n, "val"), resolve_size(test, n, "test")
    if rows and n_val + n_test >= n:
        raise QatuneError(
            f"params.yaml: split.val + split.test = {n_val + n_test} rows leaves no training rows out of {n}"
        )
    groups: dict[str, list[Record]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r["id"]):
        groups[dedup_key(question_text(row["prompt"]))].append(row)
    strata: dict[str, list[str]] = defaultdict(list)
    for key in sorted(groups):
        first = groups[key][0]
        strata[str(first.get(stratify) or "") if stratify else ""].append(key)
    sizes = {s: sum(len(groups[k]) for k in keys) for s, keys in strata.items()}
    quota = {"test": _largest_remainder(sizes, n_test), "val": _largest_remainder(sizes, n_val)}
    rng = random.Random(seed)
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for stratum in sorted(strata):
        keys = strata[stratum]
        rng.shuffle(keys)
        taken = Counter()
        for key in keys:
            group = groups[key]
            name = next((s for s in ("test", "val") if taken[s] < quota[s][stratum]), "train")
            taken[name] += len(group)
            out[name].extend(group)
    for row in placed:
        out[given[row["source"]]].append(row)
    for name in SPLITS:
        out[name].sort(key=lambda r: r["id"])
        random.Random(f"{seed}-{name}").shuffle(out[name])
    return out


def split_counts(splits: dict[str, list[Record]]) -> dict[str, Any]:
    topics = sorted({str(r.get("topic")) for rows in splits.values() for r in rows})
    questions = {s: {dedup_key(question_text(r["prompt"])) for r in rows} for s, rows in splits.items()}
    return {
        "rows": {s: len(rows) for s, rows in splits.items()},
        "questions": {s: len(q) for s, q in questions.items()},
        "with_rejected": {s: sum(r["rejected"] is not None for r in rows) for s, rows in splits.items()},
        # bad answers with no good one (unpaired preference data): only dpo.method kto trains them
        "without_chosen": {s: sum(r.get("chosen") is None for r in rows) for s, rows in splits.items()},
        # questions asked in two splits: only possible where sources give their own splits (use_as)
        "questions_in_two_splits": len(
            set().union(
                *(
                    questions[a] & questions[b]
                    for a, b in (("train", "val"), ("train", "test"), ("val", "test"))
                )
            )
        ),
        "by_topic": {
            t: {s: sum(str(r.get("topic")) == t for r in rows) for s, rows in splits.items()} for t in topics
        },
    }
