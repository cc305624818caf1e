"""clean: counts add up, nothing is lost, cleaning is idempotent, limits are in tokens."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qatune.clean import choose_format, clean_rows
from qatune.errors import QatuneError


def words(messages, generation_prompt):
    """A stand-in tokenizer for pure tests: one token per word plus 3 per turn (+2 for the header)."""
    return sum(len(m["content"].split()) + 3 for m in messages) + (2 if generation_prompt else 0)


def env(rec, line, source="s"):
    return {"source": source, "file": "f.jsonl", "line": line, "record": rec}


def run(envs, fmt="preference", **kw):
    limits = {"max_prompt_length": 64, "max_length": 128, "max_field_chars": 2000} | kw
    return clean_rows(envs, {"s": fmt}, words, **limits)


def test_duplicates_exact_and_normalised_are_rejected_first_kept():
    a = {"prompt": "How much protein?", "chosen": "1.6 g/kg.", "rejected": "Tons."}
    b = {"prompt": "how much  PROTEIN", "chosen": "1.6 g/kg", "rejected": "tons"}
    res = run([env(a, 1), env(dict(a), 2), env(b, 3)])
    assert [r["reason"] for r in res.rejects] == ["exact_duplicate", "normalised_duplicate"]
    assert [r["line"] for r in res.rejects] == [2, 3]
    assert len(res.kept) == 1 and res.kept[0]["chosen"] == "1.6 g/kg."


def test_same_question_different_answers_are_both_kept():
    res = run(
        [
            env({"prompt": "Q?", "chosen": "A one.", "rejected": "B"}, 1),
            env({"prompt": "Q?", "chosen": "A two.", "rejected": "B"}, 2),
        ]
    )
    assert len(res.kept) == 2


def test_token_limits_reject_with_counts():
    long_q = {"prompt": "word " * 70, "chosen": "ok", "rejected": "no"}
    long_a = {"prompt": "short?", "chosen": "word " * 130, "rejected": "no"}
    long_r = {"prompt": "short two?", "chosen": "fine", "rejected": "word " * 130}
    res = run([env(long_q, 1), env(long_a, 2), env(long_r, 3)])
    assert [(r["reason"], r["field"]) for r in res.rejects] == [
        ("prompt_too_long", "prompt"),
        ("too_long", "chosen"),
        ("too_long", "rejected"),
    ]
    assert "tokens" in res.rejects[0]["detail"]


def test_parse_errors_from_fetch_become_rejects_with_line():
    res = run(
        [
            {
                "source": "s",
                "file": "f.jsonl",
                "line": 7,
                "error": "malformed_json: Expecting value at column 1",
            },
            env({"prompt": "Q", "chosen": "A", "rejected": "B"}, 8),
        ]
    )
    assert res.rejects[0]["reason"] == "malformed_json" and res.rejects[0]["line"] == 7
    assert res.counts()["dropped_by_reason"] == {"malformed_json": 1}


def test_reject_keeps_the_raw_record():
    rec = {"prompt": "Q", "chosen": 5}
    res = run([env(rec, 1)])
    assert res.rejects[0]["record"] == rec and res.rejects[0]["field"] == "chosen"


def test_choose_format_detects_majority_and_rejects_unknown():
    envs = [env({"question": "q", "answer": "a"}, i) for i in range(3)] + [env({"foo": 1}, 4)]
    assert choose_format(envs, "auto", "f.jsonl") == "qa"
    with pytest.raises(QatuneError, match=r"f.jsonl:1: unknown format, fields \['bar', 'foo'\]"):
        choose_format([env({"foo": 1, "bar": 2}, 1)], "auto", "f.jsonl")
    with pytest.raises(QatuneError, match="unknown format 'yaml'"):
        choose_format(envs, "yaml", "f.jsonl")
    assert choose_format(envs, "alpaca", "f.jsonl") == "alpaca"


text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
row = st.one_of(
    st.fixed_dictionaries(
        {"prompt": text, "chosen": text}, optional={"rejected": st.one_of(text, st.none())}
    ),
    st.fixed_dictionaries({"prompt": st.integers(), "chosen": text}),
    st.just({"prompt": "same question", "chosen": "same answer", "rejected": "other"}),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(row, max_size=25))
def test_counts_add_up_and_every_drop_has_a_reason(records):
    res = run([env(r, i + 1) for i, r in enumerate(records)])
    counts = res.counts()
    assert counts["kept"] + counts["dropped"] == counts["read"] == len(records)
    assert sum(counts["dropped_by_reason"].values()) == counts["dropped"]
    assert {r["line"] for r in res.rejects}.isdisjoint(range(0))  # lines are real
    assert len({r["id"] for r in res.kept}) == len(res.kept)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(row, max_size=25))
def test_cleaning_is_idempotent(records):
    first = run([env(r, i + 1) for i, r in enumerate(records)])
    second = run([env(r, i + 1) for i, r in enumerate(first.kept)])
    assert second.rejects == []
    strip = [{k: r[k] for k in ("id", "prompt", "chosen", "rejected", "topic", "meta")} for r in first.kept]
    assert [
        {k: r[k] for k in ("id", "prompt", "chosen", "rejected", "topic", "meta")} for r in second.kept
    ] == strip
