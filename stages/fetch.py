"""fetch: collect raw rows from every configured source and materialise the base model.

    python stages/fetch.py --params params.yaml --raw data/raw --model models/base

Reads `seed`, `data_samples`, `base_model` and `fetch` from params. Writes one envelope per row to
data/raw/<source>.jsonl ({source, file, line, record} or {..., error} for a row that does not
parse, which clean turns into a reject), data/raw/provenance.json, and models/base/ (safetensors
weights, tokenizer, qatune_base.json).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from qatune.base_model import materialise_base
from qatune.errors import fail_cleanly
from qatune.fetch import allocate, envelope, load_source, sample_rows, source_seed
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

    loaded = [(src, *load_source(src)) for src in params.fetch.sources]
    wanted = [min(src.samples or len(rows), len(rows)) for src, rows, _ in loaded]
    counts = allocate(wanted, params.data_samples)
    raw = Path(args.raw)
    shutil.rmtree(raw, ignore_errors=True)
    provenance = {"seed": params.seed, "data_samples": params.data_samples, "sources": []}
    for index, ((src, rows, origin), n) in enumerate(zip(loaded, counts, strict=True)):
        picked = sample_rows(rows, n, source_seed(params.seed, index))
        label = origin.get("file") or f"hub:{src.dataset}"
        write_jsonl(raw / f"{src.name}.jsonl", (envelope(src.name, label, row) for row in picked))
        provenance["sources"].append(
            {
                "name": src.name,
                "type": src.type,
                "format": src.format,
                **origin,
                "rows_available": len(rows),
                "rows_requested": src.samples,
                "rows_written": len(picked),
            }
        )
        print(f"fetch: {src.name}: {len(picked)} of {len(rows)} rows")

    base = materialise_base(params.base_model.source, params.base_model.revision, args.model)
    write_json(Path(args.model) / BASE_RECORD, base)
    provenance["base_model"] = base
    write_json(raw / "provenance.json", provenance)
    print(f"fetch: base model {base['source']} -> {args.model}")


if __name__ == "__main__":
    main()
