"""clean: normalise every raw row to one canonical record, reject the rest with a reason.

    python stages/clean.py --params params.yaml --raw data/raw --model models/base \
        --out data/clean/rows.jsonl --rejects data/clean/rejects.jsonl --metrics metrics/clean.json

Reads `clean`, `fetch.sources` (for each source's format), `dpo.method` (with kto, a label-false
completion with no good partner is kept alone for KTO, never as an answer), `train.system_prompt` and
`train.prompt_format` from params. Token lengths are measured as training sees a row: the base model's own
tokenizer and the prompt format training renders (the model's chat template, or seed 001's plain
`User:`/`Assistant:` text), the system prompt included. Over-long rows are cut to fit (clean.over_long: truncate; a prompt
keeps its end, an answer its start) or rejected (drop). kept + dropped == read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qatune.clean import choose_format, clean_rows
from qatune.errors import QatuneError, fail_cleanly
from qatune.facts import parse_fact
from qatune.io import read_jsonl, write_json, write_jsonl
from qatune.params import load_params
from qatune.templates import use_prompt_format


def token_counter(model_dir: str, prompt_format: str = "chat"):
    from transformers import AutoTokenizer

    tokenizer = use_prompt_format(AutoTokenizer.from_pretrained(model_dir), prompt_format)

    def count(messages: list[dict], generation_prompt: bool) -> int:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


def unusable_labels(rows: list[dict]) -> list[str]:
    """'source id: field value (why)' for each kept row whose `fact` or `expected` the evaluation ignores."""
    out = []
    for row in rows:
        meta = row.get("meta") or {}
        where = f"{row.get('source')} {row.get('id') or '(no id)'}"
        if meta.get("expected") is not None and meta["expected"] not in ("decline", "caution"):
            out.append(f"{where}: field 'expected' {meta['expected']!r} (not decline or caution)")
        if isinstance(meta.get("fact"), str):
            try:
                parse_fact(meta["fact"])
            except QatuneError as e:
                out.append(f"{where}: field 'fact': {e}")
    return out


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml", help="params file to read")
    parser.add_argument("--raw", default="data/raw", help="folder written by the fetch stage")
    parser.add_argument("--model", default="models/base", help="base model folder (for its tokenizer)")
    parser.add_argument("--out", default="data/clean/rows.jsonl", help="canonical rows to write")
    parser.add_argument("--rejects", default="data/clean/rejects.jsonl", help="dropped rows with reasons")
    parser.add_argument("--metrics", default="metrics/clean.json", help="counts to write")
    args = parser.parse_args(argv)
    params = load_params(args.params)

    envelopes, formats = [], {}
    for src in params.fetch.sources:
        path = Path(args.raw) / f"{src.name}.jsonl"
        if not path.is_file():
            raise QatuneError(f"{path}: missing; run the fetch stage first (dvc repro fetch)")
        rows = read_jsonl(path)
        label = rows[0]["file"] if rows else str(path)
        formats[src.name] = choose_format(rows, src.format, label)
        print(f"clean: {src.name}: format {formats[src.name]}")
        envelopes.extend(rows)

    c = params.clean
    result = clean_rows(
        envelopes,
        formats,
        token_counter(args.model, params.train.prompt_format),
        c.max_prompt_length,
        c.max_length,
        c.max_field_chars,
        keep_unpaired_bad=params.dpo.method == "kto",  # KTOTrainer learns a bad answer alone
        system_prompt=params.train.system_prompt,  # training puts it before every prompt: it takes tokens
        over_long=c.over_long,
    )
    if not result.kept:
        first = result.rejects[0] if result.rejects else None
        hint = f" (first reject: {first['file']}:{first['line']}: {first['detail']})" if first else ""
        raise QatuneError(f"no valid rows left after cleaning {result.read} rows{hint}")
    unparsed = unusable_labels(result.kept)
    if unparsed:
        print(
            f"clean: warning: {len(unparsed)} rows carry a `fact` or `expected` the evaluation cannot use, kept as "
            f"they are and not judged (first: {unparsed[0]}); docs/formats.md gives the syntax"
        )
    write_jsonl(args.out, result.kept)
    write_jsonl(args.rejects, result.rejects)
    counts = {**result.counts(), "formats": formats}
    write_json(args.metrics, counts)
    print(
        f"clean: read {counts['read']}, kept {counts['kept']}, dropped {counts['dropped']} "
        f"{counts['dropped_by_reason']}, truncated to the token limits {counts['truncated']}"
    )


if __name__ == "__main__":
    main()
