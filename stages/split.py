"""split: deterministic train / val / test files, one question never in two splits.

    python stages/split.py --params params.yaml --rows data/clean/rows.jsonl --out data/split \
        --metrics metrics/split.json

Reads `seed`, `split` and the sources' `use_as` from params. Writes data/split/{train,val,test}.jsonl.
A source with `use_as: val` (or train, test) is that split as given (seed 001's separate
validation file); the other rows are split by `split.val` and `split.test`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qatune.errors import fail_cleanly
from qatune.io import read_jsonl, write_json, write_jsonl
from qatune.params import load_params
from qatune.split import SPLITS, split_counts, split_rows


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml", help="params file to read")
    parser.add_argument("--rows", default="data/clean/rows.jsonl", help="canonical rows from the clean stage")
    parser.add_argument("--out", default="data/split", help="folder for train/val/test jsonl")
    parser.add_argument("--metrics", default="metrics/split.json", help="counts to write")
    args = parser.parse_args(argv)
    params = load_params(args.params)

    rows = read_jsonl(args.rows)
    given = {src.name: src.use_as for src in params.fetch.sources if src.use_as}
    splits = split_rows(rows, params.split.val, params.split.test, params.seed, params.split.stratify, given)
    for name in SPLITS:
        write_jsonl(Path(args.out) / f"{name}.jsonl", splits[name])
    counts = split_counts(splits)
    write_json(args.metrics, {"seed": params.seed, **counts})
    print(f"split: {counts['rows']}" + (f" (as given: {given})" if given else ""))
    if counts["questions_in_two_splits"]:
        print(f"split: note: {counts['questions_in_two_splits']} questions are in two of the given splits")


if __name__ == "__main__":
    main()
