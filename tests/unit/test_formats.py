"""Each format adapter maps its seed's data shape to the canonical record."""

import pytest

from qatune.formats import RowError, dedup_key, detect_format, normalise_text, to_canonical

LIMIT = 10_000


def canon(rec, fmt=None):
    return to_canonical(rec, fmt or detect_format(rec), LIMIT)


def test_qa_any_capitalisation():
    out = canon({"Question": "How much water?", "ANSWER": "About 2-3 litres a day.", "Category": "hydration"})
    assert out["prompt"] == [{"role": "user", "content": "How much water?"}]
    assert out["chosen"] == "About 2-3 litres a day."
    assert out["rejected"] is None
    assert out["topic"] == "hydration"


def test_alpaca_joins_instruction_and_input():
    out = canon(
        {"instruction": "Plan a warm-up.", "input": "Leg day, 10 minutes.", "output": "Bike 5 min, then..."}
    )
    assert out["prompt"][0]["content"] == "Plan a warm-up.\n\nLeg day, 10 minutes."
    out = canon({"instruction": "Plan a warm-up.", "input": "", "output": "Bike 5 min."})
    assert out["prompt"][0]["content"] == "Plan a warm-up."


def test_sharegpt_multi_turn_maps_roles_like_standardize_sharegpt():
    rec = {
        "conversations": [
            {"from": "system", "value": "You are a coach."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "Best rep range?"},
            {"from": "gpt", "value": "6-12 reps near failure."},
        ]
    }
    out = canon(rec)
    assert [t["role"] for t in out["prompt"]] == ["system", "user", "assistant", "user"]
    assert out["chosen"] == "6-12 reps near failure."


def test_messages_format():
    rec = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}
    assert canon(rec)["chosen"] == "A."


def test_preference_pairs_string_and_conversational():
    assert canon({"prompt": "Q?", "chosen": "good", "rejected": "bad"})["rejected"] == "bad"
    rec = {
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    out = canon(rec)
    assert (out["chosen"], out["rejected"]) == ("good", "bad")


def test_response_j_is_chosen_and_k_rejected():
    out = canon(
        {"question": "I feel low.", "response_j": "That sounds hard...", "response_k": "Get over it."}
    )
    assert detect_format({"question": "q", "response_j": "a", "response_k": "b"}) == "response_jk"
    assert (out["chosen"], out["rejected"]) == ("That sounds hard...", "Get over it.")


def test_bundled_shape_keeps_flaw_and_safety_in_meta():
    out = canon(
        {
            "question": "Q?",
            "chosen": "A good answer.",
            "rejected": "A bad one.",
            "topic": "supplements",
            "flaw": "gym_myth",
            "safety": True,
        }
    )
    assert out["meta"] == {"flaw": "gym_myth", "safety": True}


@pytest.mark.parametrize(
    ("rec", "reason", "field"),
    [
        ({"question": "Q?"}, "missing_field", "answer"),
        ({"question": 3, "answer": "A"}, "wrong_type", "question"),
        ({"question": "  \t ", "answer": "A"}, "empty_field", "prompt[0]"),
        ({"question": "Q", "answer": "\u200b "}, "empty_field", "chosen"),
        (
            {"prompt": "Q", "chosen": "Same  answer", "rejected": "Same answer"},
            "chosen_equals_rejected",
            "rejected",
        ),
        ({"conversations": [{"from": "human", "value": "Q"}]}, "bad_conversation", "conversations"),
        (
            {"conversations": [{"from": "alien", "value": "Q"}, {"from": "gpt", "value": "A"}]},
            "bad_conversation",
            "conversations[0].from",
        ),
        ({"messages": "not a list"}, "wrong_type", "messages"),
    ],
)
def test_bad_rows_name_reason_and_field(rec, reason, field):
    fmt = detect_format(rec) or "qa"  # a row missing its answer looks like no format; the file says qa
    with pytest.raises(RowError) as err:
        to_canonical(rec, fmt, LIMIT)
    assert (err.value.reason, err.value.field) == (reason, field)


def test_field_too_long_is_rejected_before_parsing():
    with pytest.raises(RowError) as err:
        to_canonical({"question": "Q", "answer": "x" * 10_000_001}, "qa", LIMIT)
    assert err.value.reason == "field_too_long" and err.value.field == "answer"


def test_not_an_object():
    with pytest.raises(RowError) as err:
        to_canonical(["a", "b"], "qa", LIMIT)
    assert err.value.reason == "not_an_object"


def test_detect_unknown_is_none():
    assert detect_format({"text": "hello"}) is None


def test_normalise_text():
    assert normalise_text("Cafe\u0301  au\tlait\r\n\n\n\nok\u200b ") == "Caf\u00e9 au lait\n\nok"
    assert normalise_text(normalise_text(" a  b \n")) == normalise_text(" a  b \n")


def test_dedup_key_ignores_case_punctuation_spacing():
    assert dedup_key("How much  PROTEIN?!") == dedup_key("how much protein")
