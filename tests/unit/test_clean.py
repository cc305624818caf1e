"""clean: counts add up, nothing is lost, cleaning is idempotent, limits are in tokens, and a
completion labelled bad is never a chosen answer."""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qatune.clean import choose_format, clean_rows
from qatune.errors import QatuneError
from qatune.formats import dedup_key
from qatune.params import load_params
from qatune.templates import conversation

ROOT = Path(__file__).resolve().parents[2]
# LLaMA-Factory's data/dpo_en_demo.json shape (sharegpt conversations, chosen/rejected as one gpt turn),
# with rows longer than the default limits: a long multi-turn log, a long context before the question,
# a long plan, and a short row with a table, a nested list and tabs.
LLAMA_FACTORY_DPO = ROOT / "tests" / "fixtures" / "dpo_en_demo_long.json"


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


def test_token_limits_drop_with_counts_when_asked():
    long_q = {"prompt": "word " * 70, "chosen": "ok", "rejected": "no"}
    long_a = {"prompt": "short?", "chosen": "word " * 130, "rejected": "no"}
    long_r = {"prompt": "short two?", "chosen": "fine", "rejected": "word " * 130}
    res = run([env(long_q, 1), env(long_a, 2), env(long_r, 3)], over_long="drop")
    assert [(r["reason"], r["field"]) for r in res.rejects] == [
        ("prompt_too_long", "prompt"),
        ("too_long", "chosen"),
        ("too_long", "rejected"),
    ]
    assert "tokens" in res.rejects[0]["detail"]


def numbered(prefix, n):
    return " ".join(f"{prefix}{i}" for i in range(n))


def test_over_long_rows_are_cut_by_default_prompt_keeps_its_end_answer_its_start():
    long_q = {"prompt": numbered("w", 70) + " question?", "chosen": "ok", "rejected": "no"}
    long_a = {"prompt": "short?", "chosen": numbered("a", 130), "rejected": "no"}
    long_r = {"prompt": "short two?", "chosen": "fine", "rejected": numbered("r", 130)}
    res = run([env(long_q, 1), env(long_a, 2), env(long_r, 3)])
    assert res.rejects == [] and len(res.kept) == 3
    # 64 tokens = 59 words + 3 for the turn + 2 for the header: the last 59 words, the question among them
    assert res.kept[0]["prompt"] == [
        {"role": "user", "content": " ".join(f"w{i}" for i in range(12, 70)) + " question?"}
    ]
    # 128 tokens = prompt (1 word + 3) + answer (121 words + 3): the first 121 words
    assert res.kept[1]["chosen"] == numbered("a", 121) and res.kept[1]["rejected"] == "no"
    assert res.kept[2]["rejected"] == numbered("r", 120)  # a prompt of 2 words leaves room for 120
    for row in res.kept:
        assert words(row["prompt"], True) <= 64
        for name in ("chosen", "rejected"):
            assert words([*row["prompt"], {"role": "assistant", "content": row[name]}], False) <= 128
    counts = res.counts()
    assert counts["truncated"] == {"prompt": 1, "answer": 2}
    assert counts["kept"] + counts["dropped"] == counts["read"] == 3


def test_the_system_prompt_training_adds_counts_toward_the_limit():
    rec = {"prompt": numbered("w", 50), "chosen": "ok", "rejected": "no"}  # 55 tokens alone: fits 64
    system = numbered("s", 10)  # +13 tokens: 68
    assert run([env(rec, 1)]).counts()["truncated"]["prompt"] == 0
    res = run([env(rec, 1)], system_prompt=system)
    assert res.kept[0]["prompt"] == [{"role": "user", "content": " ".join(f"w{i}" for i in range(4, 50))}]
    assert words([{"role": "system", "content": system}, *res.kept[0]["prompt"]], True) == 64
    dropped = run([env(rec, 1)], system_prompt=system, over_long="drop")
    assert [(r["reason"], r["field"]) for r in dropped.rejects] == [("prompt_too_long", "prompt")]
    assert "prompt is 68 tokens (clean.max_prompt_length=64)" in dropped.rejects[0]["detail"]
    # a system prompt that leaves no room: the row is rejected, saying why
    res = run([env(rec, 1)], system_prompt=numbered("s", 70))
    assert res.kept == [] and res.rejects[0]["reason"] == "prompt_too_long"
    assert "not one word of the last user turn fits beside the system prompt" in res.rejects[0]["detail"]


def chat(*turns):
    return [{"role": role, "content": text} for role, text in turns]


def test_a_long_conversation_loses_its_earliest_turns_first_and_still_opens_on_a_user_turn():
    old = [("user", numbered("old", 40)), ("assistant", numbered("reply", 10))]
    rows = [
        {"prompt": chat(*old, ("user", "And the last question?")), "chosen": "A.", "rejected": "B."},
        {
            "prompt": chat(("system", "Be brief."), *old, ("user", "Last one?")),
            "chosen": "A.",
            "rejected": "C.",
        },
        {"prompt": chat(*old, ("user", numbered("q", 70) + " why?")), "chosen": "A.", "rejected": "D."},
    ]
    res = run([env(r, i + 1) for i, r in enumerate(rows)])
    assert [r["prompt"] for r in res.kept] == [
        chat(("user", "And the last question?")),
        chat(("system", "Be brief."), ("user", "Last one?")),
        chat(("user", " ".join(f"q{i}" for i in range(12, 70)) + " why?")),
    ]
    assert res.counts()["truncated"] == {"prompt": 3, "answer": 0}


def test_answers_equal_once_cut_and_rows_equal_once_cut_are_rejected():
    same = numbered("a", 130)
    pair = {"prompt": "Q?", "chosen": same + " good.", "rejected": same + " bad."}
    res = run([env(pair, 1)])
    assert [(r["reason"], r["field"]) for r in res.rejects] == [("chosen_equals_rejected", "rejected")]
    assert "once cut to clean.max_length=128 tokens" in res.rejects[0]["detail"]
    first = {"prompt": "early " + numbered("w", 70), "chosen": "ok", "rejected": "no"}
    second = {"prompt": "other " + numbered("w", 70), "chosen": "ok", "rejected": "no"}
    res = run([env(first, 1), env(second, 2)])
    assert len(res.kept) == 1 and [r["reason"] for r in res.rejects] == ["normalised_duplicate"]
    assert f"id {res.kept[0]['id']} once cut" in res.rejects[0]["detail"]


def test_unpaired_pair_whose_bad_answer_is_long_is_cut_and_kept():
    rows = [kto("Short?", numbered("w", 130), False), kto("Short?", "Fine.", True)]
    res = run([env(r, i + 1) for i, r in enumerate(rows)], fmt="unpaired")
    assert [(r["chosen"], r["rejected"]) for r in res.kept] == [("Fine.", numbered("w", 121))]
    assert [r["reason"] for r in res.rejects] == ["merged_into_pair"]
    assert res.counts()["truncated"] == {"prompt": 0, "answer": 1}


@pytest.fixture(scope="module")
def smollm2_count():
    from qatune.base_model import bundled_tokenizer

    tok = bundled_tokenizer("smollm2-135m-instruct")

    def count(messages, generation_prompt):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return count


def test_llama_factory_dpo_demo_rows_are_kept_within_the_default_limits(smollm2_count):
    params = load_params(ROOT / "params.yaml")
    c, system = params.clean, params.train.system_prompt
    raw = json.loads(LLAMA_FACTORY_DPO.read_text(encoding="utf-8"))
    envs = [env(r, i + 1) for i, r in enumerate(raw)]
    assert choose_format(envs, "auto", LLAMA_FACTORY_DPO.name) == "sharegpt_preference"
    limits = (smollm2_count, c.max_prompt_length, c.max_length, c.max_field_chars)
    res = clean_rows(envs, {"s": "sharegpt_preference"}, *limits, system_prompt=system)
    assert res.rejects == [] and len(res.kept) == len(raw) == 4
    assert res.counts()["truncated"] == {"prompt": 2, "answer": 2}
    for row in res.kept:  # counted as training sees them: the system prompt and SmolLM2's template
        prompt = conversation(row, system)
        assert smollm2_count(prompt, True) <= c.max_prompt_length
        for name in ("chosen", "rejected"):
            total = smollm2_count([*prompt, {"role": "assistant", "content": row[name]}], False)
            assert total <= c.max_length
    multi, context, plan, short = res.kept
    assert multi["prompt"] == [{"role": "user", "content": raw[0]["conversations"][2]["value"]}]
    code = raw[0]["chosen"]["value"].split("\n\nRun it")[0]
    assert multi["chosen"].startswith(code)  # the Python block, indentation and tab included
    total = smollm2_count(
        [*conversation(multi, system), {"role": "assistant", "content": multi["chosen"]}], False
    )
    assert total > c.max_length - 20  # cut close to the limit, not far short of it
    assert context["prompt"][0]["content"].endswith("\n\nGiven this log, should I take a deload week now?")
    assert raw[1]["conversations"][0]["value"].endswith(context["prompt"][0]["content"])
    assert (
        raw[2]["chosen"]["value"].startswith(plan["chosen"]) and "\n   - Rest 2-3 minutes" in plan["chosen"]
    )
    assert (short["chosen"], short["rejected"]) == (raw[3]["chosen"]["value"], raw[3]["rejected"]["value"])
    dropped = clean_rows(envs, {"s": "sharegpt_preference"}, *limits, system_prompt=system, over_long="drop")
    assert [(r["line"], r["reason"], r["field"]) for r in dropped.rejects] == [
        (1, "prompt_too_long", "prompt"),
        (2, "prompt_too_long", "prompt"),
        (3, "too_long", "chosen"),
    ]
    assert len(dropped.kept) + len(dropped.rejects) == dropped.read == 4


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


word = st.sampled_from(["lift", "eat", "sleep", "rest\n", "  run", "\tpace", "why?"])
long_text = st.lists(word, min_size=1, max_size=50).map(" ".join)
long_answer = st.lists(word, min_size=10, max_size=90).map(" ".join)
turns = st.lists(long_text, min_size=0, max_size=4).map(
    lambda texts: [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]
)
long_row = st.builds(
    lambda earlier, question, chosen, rejected: {
        "prompt": earlier[: len(earlier) // 2 * 2] + [{"role": "user", "content": question}],
        "chosen": chosen,
        "rejected": rejected,
    },
    turns,
    long_text,
    long_answer,
    st.one_of(st.none(), long_answer),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(long_row, max_size=12), st.one_of(st.none(), long_text))
def test_every_kept_row_fits_the_limits_and_cutting_again_changes_nothing(records, system):
    limits = {"max_prompt_length": 20, "max_length": 32, "system_prompt": system}
    res = run([env(r, i + 1) for i, r in enumerate(records)], **limits)
    counts = res.counts()
    assert counts["kept"] + counts["dropped"] == counts["read"] == len(records)
    assert sum(counts["dropped_by_reason"].values()) == counts["dropped"]
    assert len({r["id"] for r in res.kept}) == len(res.kept)
    for row in res.kept:
        prompt = ([{"role": "system", "content": system}] if system else []) + row["prompt"]
        assert row["prompt"][-1]["role"] == "user" and row["prompt"][0]["role"] == "user"
        assert words(prompt, True) <= 20
        for name in ("chosen", "rejected"):
            if row[name]:
                assert words([*prompt, {"role": "assistant", "content": row[name]}], False) <= 32
    again = run([env(r, i + 1) for i, r in enumerate(res.kept)], **limits)
    assert again.rejects == [] and again.counts()["truncated"] == {"prompt": 0, "answer": 0}
    assert [r["id"] for r in again.kept] == [r["id"] for r in res.kept]


# --------------------------------------------------------------------------- unpaired (KTO-style) rows


def kto(prompt, completion, label):
    return {"prompt": prompt, "completion": completion, "label": label}


def test_unpaired_good_and_bad_of_one_prompt_become_one_pair():
    rows = [
        kto("Is fasted cardio better?", "Yes, always train fasted.", False),
        kto("Is fasted cardio better?", "Not for fat loss over a whole day.", True),
        kto("How much sleep?", "Seven to nine hours.", True),
    ]
    res = run([env(r, i + 1) for i, r in enumerate(rows)], fmt="unpaired")
    assert [(r["chosen"], r["rejected"]) for r in res.kept] == [
        ("Not for fat loss over a whole day.", "Yes, always train fasted."),
        ("Seven to nine hours.", None),
    ]
    (merged,) = res.rejects
    assert (merged["line"], merged["reason"], merged["field"]) == (1, "merged_into_pair", "label")
    assert f"line 2 (id {res.kept[0]['id']})" in merged["detail"] and merged["record"] == rows[0]
    counts = res.counts()
    assert counts["kept"] + counts["dropped"] == counts["read"] == 3
    assert counts["with_rejected"] == 1


def test_unpaired_bad_without_a_good_partner_is_rejected_never_kept():
    rows = [
        kto("Creatine and kidneys?", "It wrecks them, avoid it.", False),
        kto("creatine and KIDNEYS", "Also bad advice.", False),  # same prompt key, still no good one
        kto(
            "Creatine and kidneys?",
            "Safe for healthy kidneys; ask a doctor if you have kidney disease.",
            True,
        ),
    ]
    res = run([env(r, i + 1) for i, r in enumerate(rows)], fmt="unpaired")
    assert [r["chosen"] for r in res.kept] == [rows[2]["completion"]]
    assert res.kept[0]["rejected"] == "It wrecks them, avoid it."
    assert [(r["line"], r["reason"]) for r in res.rejects] == [
        (1, "merged_into_pair"),
        (2, "unpaired_bad_completion"),
    ]
    assert "kto" in res.rejects[1]["detail"] and "line 3" in res.rejects[1]["detail"]
    alone = run([env(kto("Q?", "bad", False), 1)], fmt="unpaired")
    assert alone.kept == [] and alone.rejects[0]["reason"] == "unpaired_bad_completion"
    assert "dpo.method: kto" in alone.rejects[0]["detail"]


def test_with_kto_an_unpaired_bad_completion_is_kept_alone_and_never_as_an_answer():
    rows = [
        kto("Creatine and kidneys?", "It wrecks them, avoid it.", False),
        kto("creatine and KIDNEYS", "Also bad advice.", False),  # no good partner left: kept alone
        kto(
            "Creatine and kidneys?",
            "Safe for healthy kidneys; ask a doctor if you have kidney disease.",
            True,
        ),
        kto("Fasted cardio?", "It burns muscle only, never do it.", False),  # no good one at all
        kto("Fasted cardio?", "It burns muscle only, never do it.", False),  # its duplicate
    ]
    envs = [env(r, i + 1) for i, r in enumerate(rows)]
    res = clean_rows(envs, {"s": "unpaired"}, words, 64, 128, 2000, keep_unpaired_bad=True)
    assert [(r["chosen"], r["rejected"]) for r in res.kept] == [
        (None, "Also bad advice."),
        (rows[2]["completion"], "It wrecks them, avoid it."),
        (None, "It burns muscle only, never do it."),
    ]
    assert {r["chosen"] for r in res.kept} & {r["completion"] for r in rows if not r["label"]} == set()
    assert [(r["line"], r["reason"]) for r in res.rejects] == [
        (1, "merged_into_pair"),
        (5, "exact_duplicate"),
    ]
    counts = res.counts()
    assert counts["kept"] + counts["dropped"] == counts["read"] == 5 and counts["without_chosen"] == 2
    # without KTO the same rows lose nothing either: the lone bad ones are rejects with the reason
    res = clean_rows(envs, {"s": "unpaired"}, words, 64, 128, 2000)
    assert [r["chosen"] for r in res.kept] == [rows[2]["completion"]]
    assert len(res.kept) + len(res.rejects) == 5
    # a label-false row in a forced non-unpaired format is refused even with KTO (it would be `chosen`)
    forced = clean_rows(
        [env({"prompt": "Q?", "completion": "bad", "label": False}, 1)],
        {"s": "prompt_completion"}, words, 64, 128, 2000, keep_unpaired_bad=True,
    )  # fmt: skip
    assert forced.kept == [] and forced.rejects[0]["reason"] == "unpaired_bad_completion"


def test_unpaired_pair_dropped_only_for_the_bad_answer_keeps_the_good_one_alone():
    rows = [kto("Short?", "word " * 130, False), kto("Short?", "Fine.", True)]
    res = run([env(r, i + 1) for i, r in enumerate(rows)], fmt="unpaired", over_long="drop")
    assert [(r["chosen"], r["rejected"]) for r in res.kept] == [("Fine.", None)]
    assert [(r["line"], r["reason"], r["field"]) for r in res.rejects] == [(1, "too_long", "rejected")]


def test_unpaired_pair_dropped_for_the_prompt_accounts_for_both_rows():
    rows = [kto("word " * 70, "Bad.", False), kto("word " * 70, "Good.", True)]
    res = run([env(r, i + 1) for i, r in enumerate(rows)], fmt="unpaired", over_long="drop")
    assert res.kept == []
    assert [r["reason"] for r in res.rejects] == ["merged_into_pair", "prompt_too_long"]
    assert "pair was dropped (prompt_too_long" in res.rejects[0]["detail"]


label_row = st.builds(
    kto,
    st.sampled_from(["Q one?", "q ONE", "Q two?", "Q three?"]),
    st.sampled_from(["Answer a.", "Answer b.", "Answer c.", "Answer a!", ""]),
    st.sampled_from([True, False, "true", "false", 1, 0]),
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(label_row, max_size=20))
def test_label_false_never_becomes_chosen_and_counts_add_up(records):
    res = run([env(r, i + 1) for i, r in enumerate(records)], fmt="unpaired")
    counts = res.counts()
    assert counts["kept"] + counts["dropped"] == counts["read"] == len(records)
    assert len({r["line"] for r in res.rejects}) == len(res.rejects)  # one reject per input row at most
    good = {(dedup_key(r["prompt"]), r["completion"]) for r in records if r["label"] in (True, "true", 1)}
    for kept in res.kept:
        assert (dedup_key(kept["prompt"][0]["content"]), kept["chosen"]) in good
    bad_lines = {i + 1 for i, r in enumerate(records) if r["label"] in (False, "false", 0)}
    assert bad_lines <= {r["line"] for r in res.rejects}  # every bad row is accounted for as a reject


def test_mixed_file_counts_and_reasons():
    """One source per shape: every row is read once and ends up kept or with exactly one reason."""
    sources = {
        "pc": ("prompt_completion", [{"prompt": "Q1?", "completion": "A1."}]),
        "kto": (
            "unpaired",
            [kto("Q2?", "Bad.", False), kto("Q2?", "Good.", True), kto("Q3?", "Bad.", False)],
        ),
        "chat": (
            "messages",
            [
                {"messages": [{"role": "user", "content": "Q4?"}, {"role": "assistant", "content": "A4."}]},
                {"messages": [{"role": "user", "content": "Q5?"}, {"role": "tool", "content": "{}"}]},
            ],
        ),
        "lm": ("text", [{"text": "Just prose."}]),
        "po": ("prompt_only", [{"prompt": "Q6?"}]),
    }
    envs, formats = [], {}
    for name, (fmt, rows) in sources.items():
        formats[name] = fmt
        envs += [env(r, i + 1, source=name) for i, r in enumerate(rows)]
    envs.append({"source": "pc", "file": "f.jsonl", "line": 9, "error": "malformed_json: bad at column 1"})
    res = clean_rows(envs, formats, words, max_prompt_length=64, max_length=128, max_field_chars=2000)
    counts = res.counts()
    assert counts["read"] == len(envs) == 9
    assert counts["kept"] + counts["dropped"] == counts["read"]
    assert counts["kept"] == 3 and counts["with_rejected"] == 1
    assert counts["dropped_by_reason"] == {
        "malformed_json": 1,
        "merged_into_pair": 1,
        "no_answer": 1,
        "prompt_only": 1,
        "unpaired_bad_completion": 1,
        "unsupported_role": 1,
    }
    tool = next(r for r in res.rejects if r["reason"] == "unsupported_role")
    assert tool["field"] == "messages[1].role" and "'tool'" in tool["detail"]
    assert all(r["chosen"] != "Bad." for r in res.kept)


def test_choose_format_on_new_shapes():
    assert choose_format([env({"text": "prose"}, i) for i in range(3)], "auto", "lm.jsonl") == "text"
    res = run([env({"text": "prose"}, 1)], fmt="text")
    assert res.rejects[0]["reason"] == "no_answer" and res.rejects[0]["field"] == "text"
    assert "plain text row" in res.rejects[0]["detail"]
    kto_rows = [env(kto("q", "a", i % 2 == 0), i) for i in range(4)]
    assert choose_format(kto_rows, "auto", "k.jsonl") == "unpaired"
    assert choose_format(kto_rows, "prompt_completion", "k.jsonl") == "prompt_completion"
    forced = run(kto_rows, fmt="prompt_completion")  # forcing a format never learns a bad completion
    assert {r["reason"] for r in forced.rejects} >= {"unpaired_bad_completion"}
    assert all(r["meta"].get("label") in (True, None) for r in forced.kept)
