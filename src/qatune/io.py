"""Reading data files row by row without losing track of where each row came from, and the one way qatune
writes JSON and JSON Lines.

Every reader yields `(line, record_or_None, error_or_None)`: a row that cannot be parsed is not
dropped here, it travels on as an error so the clean stage can write it to its rejects file.
A UTF-8 byte-order mark at the start of a file (Excel and some Windows editors write one) is
skipped, so it never sticks to the first CSV column's name or breaks the first JSON line.

JSON files are written by `write_json` (text for a file written elsewhere: `json_text`): two-space indent,
keys in insertion order, non-ASCII kept as UTF-8 and a trailing newline unless a caller asks otherwise.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from qatune.errors import QatuneError

Row = tuple[int, Any, str | None]
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
BOM = b"\xef\xbb\xbf"
csv.field_size_limit(1 << 30)  # a 10 MB field must reach clean, which rejects it with a reason


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _jsonl(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield line_no, None, f"non_utf8: byte {err.start} of the line is not UTF-8"
                continue
            try:
                yield line_no, json.loads(text), None
            except json.JSONDecodeError as err:
                yield line_no, None, f"malformed_json: {err.msg} at column {err.colno}"


def _json(path: Path) -> Iterator[Row]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise QatuneError(f"{path}: byte {err.start} is not UTF-8") from None
    except json.JSONDecodeError as err:
        raise QatuneError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: the first list value
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if not isinstance(data, list):
        raise QatuneError(f"{path}: expected a JSON list of records (or an object holding one)")
    for i, rec in enumerate(data, 1):
        yield i, rec, None


def _csv(path: Path) -> Iterator[Row]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            for rec in reader:
                line = reader.line_num
                if None in rec:
                    yield line, None, "malformed_csv: more values than header columns"
                    continue
                yield line, {k: v for k, v in rec.items() if v is not None}, None
    except UnicodeDecodeError as err:
        raise QatuneError(f"{path}: byte {err.start} is not UTF-8") from None


def _parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise QatuneError(f"{path}: not a readable parquet file ({err})") from None
    for i, rec in enumerate(table.to_pylist(), 1):
        yield i, rec, None


def read_rows(path: str | Path) -> Iterator[Row]:
    """Rows of a jsonl/json/csv/parquet file. Missing, empty or unsupported files are fatal."""
    path = Path(path)
    if not path.is_file():
        raise QatuneError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise QatuneError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    readers = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}
    if suffix not in readers:
        raise QatuneError(f"{path}: unsupported file type '{suffix}' (use one of {', '.join(SUFFIXES)})")
    return readers[suffix](path)


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[Any]:
    with open(path, encoding="utf-8-sig") as f:
        return [json.loads(line) for line in f if line.strip()]


def json_text(
    data: Any, *, indent: int = 2, ensure_ascii: bool = False, default: Callable[[Any], Any] | None = None
) -> str:
    """`data` as the text of a JSON file, ending in a newline. `default` turns values JSON has no type for
    into ones it has (str: paths and the like in provenance records)."""
    return json.dumps(data, indent=indent, ensure_ascii=ensure_ascii, default=default) + "\n"


def write_json(
    path: str | Path,
    data: Any,
    *,
    indent: int = 2,
    ensure_ascii: bool = False,
    default: Callable[[Any], Any] | None = None,
) -> None:
    """Write `data` as json_text gives it, creating the folder; atomic: an interrupted write never leaves half
    a file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(
        json_text(data, indent=indent, ensure_ascii=ensure_ascii, default=default), encoding="utf-8"
    )
    tmp.replace(path)
