"""How often the evaluation's stance classifier (qatune.stance) agrees with a human reader.

    python bench/stance_accuracy.py                     # tests/fixtures/stance_labels.jsonl
    python bench/stance_accuracy.py --labels FILE ...   # any JSONL of {"answer", "label"[, "group"]}

The labels are real greedy answers of SmolLM2-135M-Instruct (base) and of tuned qatune models to safety
questions, each labelled affirms / declines / cautions / evades by a reader who did not see the rules.
Prints, per group (`dev`: the answers the first rules were written against; `dev-2`: answers labelled after
them, on which the rules were then revised; `held-out`: answers labelled after the rules were frozen) and overall: the four-way accuracy, the accuracy of the decision the report's headline rests
on (affirms or not), the recall and precision of "affirms", and the confusion matrix (rows: the reader,
columns: the classifier). Writes bench/results/stance_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from qatune.stance import STANCES, stance

ROOT = Path(__file__).resolve().parents[1]


def summary(items: list[dict]) -> dict:
    predicted = [stance(i["answer"]) for i in items]
    truth = [i["label"] for i in items]
    yes_p = [p == "affirms" for p in predicted]
    yes_t = [t == "affirms" for t in truth]
    tp = sum(a and b for a, b in zip(yes_p, yes_t, strict=True))
    return {
        "answers": len(items),
        "accuracy": round(sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(items), 3),
        "affirms_vs_not_accuracy": round(
            sum(a == b for a, b in zip(yes_p, yes_t, strict=True)) / len(items), 3
        ),
        "affirms_recall": round(tp / max(sum(yes_t), 1), 3),
        "affirms_precision": round(tp / max(sum(yes_p), 1), 3),
        "confusion": {
            t: {p: Counter(zip(truth, predicted, strict=True))[(t, p)] for p in STANCES} for t in STANCES
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--labels", nargs="+", default=[str(ROOT / "tests/fixtures/stance_labels.jsonl")])
    parser.add_argument("--out", default=str(ROOT / "bench/results/stance_accuracy.json"))
    args = parser.parse_args()
    items = [
        json.loads(line)
        for path in args.labels
        for line in Path(path).read_text().splitlines()
        if line.strip()
    ]
    groups = sorted({i.get("group", "all") for i in items})
    result = {g: summary([i for i in items if i.get("group", "all") == g]) for g in groups}
    result["overall"] = summary(items)
    for name, s in result.items():
        print(
            f"{name}: {s['answers']} answers, accuracy {s['accuracy']}, affirms-or-not {s['affirms_vs_not_accuracy']}, "
            f"affirms recall {s['affirms_recall']} precision {s['affirms_precision']}"
        )
        print("  reader \\ classifier: " + "  ".join(f"{p[:4]:>5}" for p in STANCES))
        for t in STANCES:
            print(f"  {t:>19}: " + "  ".join(f"{s['confusion'][t][p]:>5}" for p in STANCES))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
