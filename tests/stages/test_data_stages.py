"""fetch -> clean -> split as scripts, on a tiny local model, in a scratch project on CPU."""

import json
import sys

import pytest
import yaml

from tests.conftest import FIXTURES, run, write_jsonl


def stage(proj, name, check=True):
    return run([sys.executable, f"stages/{name}.py", "--params", "params.yaml"], proj, check=check)


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines and lines[-1].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def bad_input_file(tmp_path):
    good = {
        "question": "How long should I rest between heavy sets?",
        "chosen": "Two to five minutes.",
        "rejected": "Never rest.",
        "topic": "strength",
    }
    lines = [
        json.dumps(good).encode(),  # 1 kept
        b'{"question": "broken", "chosen": ',  # 2 malformed JSON
        '{"question": "caf\u00e9?", "chosen": "x", "rejected": "y"}'.encode("latin-1"),  # 3 non-UTF-8
        json.dumps({"question": "No answer here?"}).encode(),  # 4 missing chosen
        json.dumps({"question": ["a"], "chosen": "A", "rejected": "B"}).encode(),  # 5 wrong type
        json.dumps(
            {"question": "Huge?", "chosen": "x" * 10_000_000, "rejected": "n"}
        ).encode(),  # 6 10 MB field
        json.dumps(good).encode(),  # 7 exact duplicate
        json.dumps(
            {"question": "Same?", "chosen": "Same.", "rejected": "Same."}
        ).encode(),  # 8 chosen == rejected
        json.dumps({"question": "   ", "chosen": "A", "rejected": "B"}).encode(),  # 9 empty
        json.dumps(
            {
                "question": "Is walking enough exercise?",
                "chosen": "It is a great start.",
                "rejected": "No.",
                "topic": "cardio",
            }
        ).encode(),  # 10 kept
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_input_rows_become_rejects_and_counts_add_up(project, tmp_path):
    proj = project(bad_input_file(tmp_path))
    for name in ("fetch", "clean"):
        stage(proj, name)
    rejects = read(proj / "data/clean/rejects.jsonl")
    got = {r["line"]: (r["reason"], r["field"]) for r in rejects}
    assert got == {
        2: ("malformed_json", None),
        3: ("non_utf8", None),
        4: ("missing_field", "chosen"),
        5: ("wrong_type", "question[0]"),
        6: ("field_too_long", "chosen"),
        7: ("exact_duplicate", None),
        8: ("chosen_equals_rejected", "rejected"),
        9: ("empty_field", "prompt[0]"),
    }
    assert all(r["source"] == "fixture" and r["file"].endswith("bad.jsonl") for r in rejects)
    metrics = json.loads((proj / "metrics/clean.json").read_text())
    assert (metrics["read"], metrics["kept"], metrics["dropped"]) == (10, 2, 8)
    kept = read(proj / "data/clean/rows.jsonl")
    assert [r["chosen"] for r in kept] == ["Two to five minutes.", "It is a great start."]
    assert kept[0]["prompt"] == [{"role": "user", "content": "How long should I rest between heavy sets?"}]


def test_token_limits_use_the_base_tokenizer_and_cut_or_drop(project, tmp_path):
    from transformers import AutoTokenizer

    from qatune.templates import conversation, use_prompt_format

    rows = [
        {"question": "protein " * 300 + "How much?", "chosen": "ok", "rejected": "no"},
        {"question": "Short?", "chosen": "protein " * 2000, "rejected": "no"},
        {"question": "Fine?", "chosen": "Yes.", "rejected": "No."},
    ]
    proj = project(write_jsonl(tmp_path / "long.jsonl", rows))
    stage(proj, "fetch")
    stage(proj, "clean")
    metrics = json.loads((proj / "metrics/clean.json").read_text())
    assert (metrics["kept"], metrics["dropped"], metrics["truncated"]) == (3, 0, {"prompt": 1, "answer": 1})
    params = yaml.safe_load((proj / "params.yaml").read_text())
    c, system = params["clean"], params["train"]["system_prompt"]
    tok = AutoTokenizer.from_pretrained(proj / "models/base")

    def count(messages, generation_prompt):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    kept = read(proj / "data/clean/rows.jsonl")
    assert kept[0]["prompt"][0]["content"].endswith("protein How much?")
    assert kept[1]["chosen"].startswith("protein protein")
    for row in kept:  # within the limits as training counts them, system prompt included
        prompt = conversation(row, system)
        assert count(prompt, True) <= c["max_prompt_length"]
        assert count([*prompt, {"role": "assistant", "content": row["chosen"]}], False) <= c["max_length"]
    params["clean"]["over_long"] = "drop"
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    stage(proj, "clean")
    assert [r["reason"] for r in read(proj / "data/clean/rejects.jsonl")] == ["prompt_too_long", "too_long"]
    metrics = json.loads((proj / "metrics/clean.json").read_text())
    assert (metrics["kept"], metrics["dropped"], metrics["truncated"]) == (1, 2, {"prompt": 0, "answer": 0})

    # Seed 001's plain format is what training renders then: the limits count its `User:`/`Assistant:` text,
    # not the chat template's markup, so a cut prompt keeps more of its words and still fits.
    chat_words = kept[0]["prompt"][0]["content"].count("protein")
    params["clean"]["over_long"] = "truncate"
    params["train"]["prompt_format"] = "plain"
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    stage(proj, "clean")
    use_prompt_format(tok, "plain")
    plain = read(proj / "data/clean/rows.jsonl")
    for row in plain:
        prompt = conversation(row, system)
        assert count(prompt, True) <= c["max_prompt_length"]
        assert count([*prompt, {"role": "assistant", "content": row["chosen"]}], False) <= c["max_length"]
    assert plain[0]["prompt"][0]["content"].count("protein") > chat_words
    assert count(conversation(plain[0], system), True) > c["max_prompt_length"] - 4  # cut to the plain limit


def test_full_data_path_writes_splits_and_provenance(project):
    proj = project()
    for name in ("fetch", "clean", "split"):
        stage(proj, name)
    prov = json.loads((proj / "data/raw/provenance.json").read_text())
    assert prov["sources"][0]["rows_written"] == 30 and len(prov["sources"][0]["sha256"]) == 64
    assert (proj / "models/base/model.safetensors").is_file()
    assert json.loads((proj / "models/base/qatune_base.json").read_text())["source"].endswith("llama")
    sizes = {n: len(read(proj / f"data/split/{n}.jsonl")) for n in ("train", "val", "test")}
    assert sizes == {"train": 24, "val": 3, "test": 3}
    assert json.loads((proj / "metrics/split.json").read_text())["rows"] == sizes


def test_data_samples_caps_the_fetched_rows(project):
    proj = project(data_samples=12)
    stage(proj, "fetch")
    assert len(read(proj / "data/raw/fixture.jsonl")) == 12


@pytest.mark.parametrize("case", ["missing", "unknown_format", "plain_text", "all_invalid", "empty"])
def test_fatal_problems_exit_with_one_line(project, tmp_path, case):
    if case == "missing":
        proj = project(tmp_path / "nope.jsonl")
        assert_one_line_error(stage(proj, "fetch", check=False), "nope.jsonl", "file not found")
        return
    if case == "empty":
        (tmp_path / "empty.jsonl").write_bytes(b"")
        proj = project(tmp_path / "empty.jsonl")
        assert_one_line_error(stage(proj, "fetch", check=False), "empty.jsonl", "file is empty")
        return
    rows = {
        "unknown_format": [{"sentence": "hello", "score": 1}],
        "plain_text": [{"text": "Squats build the legs."}],  # language-modelling rows: no answer to learn
    }.get(case, [{"question": "Q?", "answer": 5}])
    proj = project(write_jsonl(tmp_path / "x.jsonl", rows))
    stage(proj, "fetch")
    proc = stage(proj, "clean", check=False)
    if case == "unknown_format":
        assert_one_line_error(proc, "x.jsonl:1", "unknown format", "'sentence'")
    elif case == "plain_text":
        assert_one_line_error(proc, "no valid rows", "x.jsonl:1", "plain text row", "no answer to learn")
    else:
        assert_one_line_error(proc, "no valid rows", "x.jsonl:1", "field 'answer'")


def test_misspelled_param_stops_the_stage_naming_the_key(project):
    proj = project(seeed=1)
    assert_one_line_error(stage(proj, "split", check=False), "unknown key 'seeed'")


def test_fixture_is_what_the_other_tests_expect():
    assert len(read(FIXTURES / "mixed_small.jsonl")) == 30
