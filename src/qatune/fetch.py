"""Collect raw rows from the configured sources, sampled reproducibly, with provenance."""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path
from typing import Any

from qatune.errors import QatuneError
from qatune.io import Row, read_rows, sha256_file
from qatune.params import SourceParams

BUNDLED_DATASETS = {"fitness_pairs": "fitness_pairs.jsonl"}


def bundled_dataset_path(name: str) -> Path:
    if name not in BUNDLED_DATASETS:
        raise QatuneError(f"unknown bundled dataset '{name}' (have: {', '.join(BUNDLED_DATASETS)})")
    return Path(str(resources.files("qatune") / "data" / BUNDLED_DATASETS[name]))


def allocate(counts: list[int], cap: int) -> list[int]:
    """Scale per-source row counts down to a total of `cap`, proportionally (largest remainder)."""
    total = sum(counts)
    if cap <= 0 or total <= cap:
        return list(counts)
    shares = [c * cap / total for c in counts]
    out = [int(s) for s in shares]
    by_remainder = sorted(range(len(counts)), key=lambda i: (shares[i] - out[i], -i), reverse=True)
    for i in by_remainder[: cap - sum(out)]:
        out[i] += 1
    return out


def sample_rows(rows: list[Row], n: int | None, seed: int) -> list[Row]:
    """`n` rows drawn without replacement by `seed`, kept in file order (all rows if n is None)."""
    if n is None or n >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def hub_error(src: SourceParams, verb: str, err: Exception) -> QatuneError:
    """One line naming the source, the Hub dataset and why it could not be read."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return QatuneError(
        f"source '{src.name}': cannot {verb} hub dataset '{src.dataset}' (config {src.config}, split "
        f"{src.split}, revision {src.revision}): {type(err).__name__}: {first} "
        "(offline? this needs the Hugging Face Hub; use a local or bundled source instead)"
    )


def _hub_rows(src: SourceParams) -> tuple[list[Row], dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(src.dataset, src.config, split=src.split, revision=src.revision)
    except Exception as err:  # offline, missing repo or split: say which dataset and why, in one line
        raise hub_error(src, "load", err) from None
    fingerprint = getattr(ds, "_fingerprint", None)
    return [(i, rec, None) for i, rec in enumerate(ds, 1)], {
        "dataset": src.dataset,
        "config": src.config,
        "split": src.split,
        "revision": src.revision,
        "fingerprint": fingerprint,
    }


def streams(src: SourceParams, data_samples: int) -> bool:
    """A Hub source with a row cap is read as a stream, so only the rows it needs are downloaded."""
    return src.type == "hub" and bool(src.samples or data_samples)


def stream_hub_rows(src: SourceParams, n: int, seed: int) -> tuple[list[Row], dict[str, Any]]:
    """`n` rows of a Hub dataset without downloading the rest: a streamed split, shuffled by `seed` in a
    buffer of `shuffle_buffer` rows (seed 002 shuffles at load time), read until `n` rows are in hand."""
    import itertools

    import datasets

    try:
        ds = datasets.load_dataset(
            src.dataset, src.config, split=src.split, revision=src.revision, streaming=True
        ).shuffle(seed=seed, buffer_size=src.shuffle_buffer)
        rows = [(i, rec, None) for i, rec in enumerate(itertools.islice(ds, n), 1)]
    except Exception as err:
        raise hub_error(src, "stream", err) from None
    return rows, {
        "dataset": src.dataset,
        "config": src.config,
        "split": src.split,
        "revision": src.revision,
        "streamed": {"seed": seed, "shuffle_buffer": src.shuffle_buffer, "rows_read": len(rows)},
    }


def load_source(src: SourceParams) -> tuple[list[Row], dict[str, Any]]:
    """All rows of one source plus what identifies its exact content."""
    if src.type == "hub":
        return _hub_rows(src)
    path = bundled_dataset_path(src.path) if src.type == "bundled" else Path(src.path)
    rows = list(read_rows(path))
    if not rows:
        raise QatuneError(f"{path}: no rows (only blank lines)")
    return rows, {
        "file": str(path) if src.type == "local" else f"bundled:{src.path}",
        "sha256": sha256_file(path),
    }


def envelope(source: str, origin: str, row: Row) -> dict[str, Any]:
    line, rec, error = row
    out: dict[str, Any] = {"source": source, "file": origin, "line": line}
    if error is None:
        out["record"] = rec
    else:
        out["error"] = error
    return out


def source_seed(seed: int, index: int) -> int:
    """Each source gets its own stream, so adding a source leaves the others' samples unchanged."""
    return seed * 1_000_003 + index
