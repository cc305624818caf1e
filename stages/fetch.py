"""fetch: collect raw rows from every configured source and materialise the base model.

    python stages/fetch.py --params params.yaml --raw data/raw --model models/base

Reads `seed`, `data_samples`, `base_model` and `fetch` from params. Writes one envelope per row to
data/raw/<source>.jsonl ({source, file, line, record} or {..., error} for a row that does not
parse, which clean turns into a reject), data/raw/provenance.json, and models/base/ (safetensors
weights, tokenizer, qatune_base.json). A Hub source with a row cap (`samples`, or its share of
`data_samples`) is streamed and shuffled by seed in a buffer: only the rows it needs are downloaded.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from qatune.base_model import materialise_base
from qatune.errors import fail_cleanly
from qatune.fetch import (
    allocate,
    envelope,
    load_source,
    sample_rows,
    source_seed,
    stream_hub_rows,
    streams,
)
from qatune.io import write_json, write_jsonl
from qatune.params import load_params
from qatune.provenance import BASE_RECORD


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml", help="params file to read")
    parser.add_argument("--raw", default="data/raw", help="output folder for raw rows and provenance")
    parser.add_argument("--model", default="models/base", help="output folder for the base model")
    args = parser.parse_args(argv)
    params = load_params(args.params)

    sources = params.fetch.sources
    streamed = [streams(src, params.data_samples) for src in sources]
    loaded = [None if stream else load_source(src) for src, stream in zip(sources, streamed, strict=True)]
    wanted = [
        src.samples or params.data_samples if got is None else min(src.samples or len(got[0]), len(got[0]))
        for src, got in zip(sources, loaded, strict=True)
    ]
    counts = allocate(wanted, params.data_samples)
    raw = Path(args.raw)
    shutil.rmtree(raw, ignore_errors=True)
    provenance = {"seed": params.seed, "data_samples": params.data_samples, "sources": []}
    for index, (src, got, n) in enumerate(zip(sources, loaded, counts, strict=True)):
        seed = source_seed(params.seed, index)
        if got is None:  # a capped Hub source: only the rows it needs, read as a stream
            picked, origin = stream_hub_rows(src, n, seed)
            available = None
        else:
            rows, origin = got
            picked, available = sample_rows(rows, n, seed), len(rows)
        label = origin.get("file") or f"hub:{src.dataset}"
        write_jsonl(raw / f"{src.name}.jsonl", (envelope(src.name, label, row) for row in picked))
        provenance["sources"].append(
            {
                "name": src.name,
                "type": src.type,
                "format": src.format,
                **origin,
                "rows_available": available,
                "rows_requested": src.samples,
                "rows_written": len(picked),
            }
        )
        print(f"fetch: {src.name}: {len(picked)} of {available or 'a stream of'} rows")

    base = materialise_base(params.base_model.source, params.base_model.revision, args.model)
    write_json(Path(args.model) / BASE_RECORD, base)
    provenance["base_model"] = base
    write_json(raw / "provenance.json", provenance)
    print(f"fetch: base model {base['source']} -> {args.model}")


if __name__ == "__main__":
    main()
