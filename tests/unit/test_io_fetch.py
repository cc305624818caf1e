"""Readers keep every row (bad ones as errors with their line); fetch samples reproducibly."""

import json

import pandas as pd
import pytest

from qatune.clean import choose_format
from qatune.errors import QatuneError
from qatune.fetch import allocate, load_source, sample_rows, stream_hub_rows, streams
from qatune.formats import detect_format
from qatune.io import read_rows
from qatune.params import SourceParams


def test_jsonl_malformed_and_non_utf8_lines_become_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(
        b'{"question": "q", "answer": "a"}\n{"question": \n\n{"question": "caf\xe9", "answer": "a"}\n'
    )
    rows = list(read_rows(f))
    assert [r[0] for r in rows] == [1, 2, 4]
    assert rows[0][1] == {"question": "q", "answer": "a"}
    assert rows[1][2].startswith("malformed_json") and rows[2][2].startswith("non_utf8")


@pytest.mark.parametrize("name", ["e.jsonl", "e.csv"])
def test_empty_file_is_fatal_and_named(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(QatuneError, match=f"{name}: file is empty"):
        list(read_rows(tmp_path / name))


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(QatuneError, match="file not found"):
        read_rows(tmp_path / "x.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(QatuneError, match="unsupported file type '.txt'"):
        read_rows(tmp_path / "x.txt")


def test_json_csv_parquet_readers(tmp_path):
    recs = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": 'a, "quoted"\nline'}]
    (tmp_path / "d.json").write_text(json.dumps({"data": recs}))
    pd.DataFrame(recs).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(recs).to_parquet(tmp_path / "d.parquet")
    for suffix in ("json", "csv", "parquet"):
        assert [r[1] for r in read_rows(tmp_path / f"d.{suffix}")] == recs, suffix


def test_byte_order_mark_is_skipped_in_csv_jsonl_and_json(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a BOM; it must not stick to the first column's name."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "d.csv").write_bytes(bom + "question,answer\r\nCafé or tea?,Either.\r\n".encode())
    (tmp_path / "d.jsonl").write_bytes(
        bom + b'{"question": "q", "answer": "a"}\n{"question": "q2", "answer": "a2"}\n'
    )
    (tmp_path / "d.json").write_bytes(bom + b'[{"question": "q", "answer": "a"}]')
    assert [r[1] for r in read_rows(tmp_path / "d.csv")] == [
        {"question": "Café or tea?", "answer": "Either."}
    ]
    assert [r[:2] for r in read_rows(tmp_path / "d.jsonl")] == [
        (1, {"question": "q", "answer": "a"}),
        (2, {"question": "q2", "answer": "a2"}),
    ]
    assert [r[1] for r in read_rows(tmp_path / "d.json")] == [{"question": "q", "answer": "a"}]
    envs = [{"line": line, "record": rec} for line, rec, _ in read_rows(tmp_path / "d.csv")]
    assert choose_format(envs, "auto", "d.csv") == "qa"


def test_csv_of_unpaired_rows_reads_string_labels(tmp_path):
    pd.DataFrame(
        [
            {"prompt": "Q?", "completion": "Good.", "label": True},
            {"prompt": "Q?", "completion": "Bad.", "label": False},
        ]
    ).to_csv(tmp_path / "k.csv", index=False)
    rows = [r[1] for r in read_rows(tmp_path / "k.csv")]
    assert [r["label"] for r in rows] == ["True", "False"]
    assert {detect_format(r) for r in rows} == {"unpaired"}


def test_invalid_json_file_is_fatal_with_line(tmp_path):
    (tmp_path / "d.json").write_text('[\n{"a": 1},\n{oops}\n]')
    with pytest.raises(QatuneError, match=r"d.json:3: invalid JSON"):
        list(read_rows(tmp_path / "d.json"))


def test_allocate_scales_to_cap():
    assert allocate([100, 50], 0) == [100, 50]
    assert allocate([100, 50], 30) == [20, 10]
    assert sum(allocate([7, 7, 7], 10)) == 10


def test_sample_rows_is_seeded_and_ordered():
    rows = [(i, {"i": i}, None) for i in range(100)]
    a, b = sample_rows(rows, 10, 3), sample_rows(rows, 10, 3)
    assert a == b and [r[0] for r in a] == sorted(r[0] for r in a)
    assert sample_rows(rows, 10, 4) != a and sample_rows(rows, None, 3) == rows


def test_bundled_source_loads_and_hub_offline_fails_naming_the_dataset(monkeypatch):
    rows, origin = load_source(SourceParams(name="f", type="bundled", path="fitness_pairs"))
    assert len(rows) >= 1000 and origin["file"] == "bundled:fitness_pairs" and len(origin["sha256"]) == 64
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(QatuneError, match="cannot load hub dataset 'mlabonne/FineTome-100k'"):
        load_source(SourceParams(name="h", type="hub", dataset="mlabonne/FineTome-100k"))


def test_a_capped_hub_source_streams_only_the_rows_it_needs(monkeypatch):
    """The Hub is stood in by a real datasets.IterableDataset over a counting generator (no network here):
    what load_dataset is asked for, and how many rows are pulled from it, are what is checked."""
    import datasets

    pulled, calls = [], []

    def rows():
        for i in range(100_000):
            pulled.append(i)
            yield {"question": f"q{i}", "answer": f"a{i}"}

    def fake_load(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.IterableDataset.from_generator(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    src = SourceParams(name="h", type="hub", dataset="org/big", samples=50, shuffle_buffer=200)
    assert streams(src, 0) and streams(src.model_copy(update={"samples": None}), 30)
    assert not streams(src.model_copy(update={"samples": None}), 0)  # no cap: the whole split, as before
    assert not streams(SourceParams(name="f", type="bundled", path="fitness_pairs", samples=5), 0)

    got, origin = stream_hub_rows(src, 50, seed=7)
    assert calls[0][1]["streaming"] is True and calls[0][0][0] == "org/big"
    assert len(got) == 50 and len(pulled) <= 50 + 200 + 1  # the buffer, then the rows taken: not 100,000
    assert origin["streamed"] == {"seed": 7, "shuffle_buffer": 200, "rows_read": 50}
    questions = [rec["question"] for _, rec, _ in got]
    assert questions != [f"q{i}" for i in range(50)]  # shuffled in the buffer, by seed
    pulled.clear()
    assert [rec["question"] for _, rec, _ in stream_hub_rows(src, 50, seed=7)[0]] == questions
    assert [rec["question"] for _, rec, _ in stream_hub_rows(src, 50, seed=8)[0]] != questions


def test_streaming_a_missing_hub_dataset_names_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    src = SourceParams(name="h", type="hub", dataset="org/absent", samples=5)
    with pytest.raises(QatuneError, match="source 'h': cannot stream hub dataset 'org/absent'"):
        stream_hub_rows(src, 5, seed=1)
