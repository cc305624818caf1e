"""Each format adapter maps its data shape to the canonical record; detection picks the right one."""

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
    assert detect_format({"foo": "hello"}) is None
    assert detect_format({"chosen": "only one side"}) is None


def test_normalise_text_fixes_only_what_no_reader_sees():
    assert (
        normalise_text("\n\n Cafe\u0301  au\tlait \r\n\r\n\r\n\rok\u200b \n\n")
        == "Caf\u00e9  au\tlait\n\n\n\nok"
    )
    assert normalise_text("a\x00b\ufeff c") == "ab c"
    assert normalise_text("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645 \U0001f468\u200d\U0001f469") == (
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645 \U0001f468\u200d\U0001f469"
    )  # joiners carry meaning: a Persian word, an emoji sequence
    for text in (" a  b \n", "x\r\n\t y \n\n\n z", "e\x00\u0301"):
        assert normalise_text(normalise_text(text)) == normalise_text(text)


CODE = """Use this:

```python
def protein_target(kg: float, per_kg: float = 1.6) -> float:
    \"\"\"Grams of protein a day.\"\"\"
    if kg <= 0:
        raise ValueError("weight must be positive")
    return round(kg * per_kg, 1)


print(protein_target(80))
```"""
NESTED_LIST = "Plan:\n\n1. Warm up\n   - bike, 5 min\n     - easy pace\n   - leg swings\n2. Squat\n\t- 5 x 5"
TABLE = "| food | protein |\n|:-----|--------:|\n| egg  |    6 g  |\n| tofu |    8 g  |"


@pytest.mark.parametrize("text", [CODE, NESTED_LIST, TABLE], ids=["python", "nested_list", "table"])
def test_code_lists_tables_and_tabs_survive_byte_for_byte(text):
    assert normalise_text(text) == text
    assert (
        normalise_text(text.replace("\n", "\r\n") + "  \r\n") == text
    )  # Windows line endings, a trailing space
    out = canon({"prompt": f"Explain:\n\n{text}", "chosen": text, "rejected": "No."})
    assert out["prompt"][0]["content"] == f"Explain:\n\n{text}" and out["chosen"] == text


def test_answers_that_differ_only_in_spacing_are_equal():
    with pytest.raises(RowError) as err:
        canon({"prompt": "Q?", "chosen": "Rest  two\nminutes.", "rejected": "Rest two minutes."})
    assert err.value.reason == "chosen_equals_rejected"


def test_dedup_key_ignores_case_punctuation_spacing():
    assert dedup_key("How much  PROTEIN?!") == dedup_key("how much protein")
    assert dedup_key("pro\u200dtein\n\n  intake\t") == dedup_key("protein intake")


# --------------------------------------------------------------------------- formats users bring

U, A, S = "user", "assistant", "system"


def turn(role, content, key=("role", "content")):
    return {key[0]: role, key[1]: content}


def gpt(role, value):
    return {"from": role, "value": value}


def test_prompt_completion_standard():
    rec = {"prompt": "Is creatine safe for teens?", "completion": "Ask a doctor first; the evidence is thin."}
    assert detect_format(rec) == "prompt_completion"
    out = canon(rec)
    assert out["prompt"] == [{"role": U, "content": "Is creatine safe for teens?"}]
    assert (out["chosen"], out["rejected"]) == ("Ask a doctor first; the evidence is thin.", None)
    assert out["meta"] == {}


def test_prompt_completion_conversational():
    rec = {
        "prompt": [turn(S, "Be brief."), turn(U, "Squat depth?")],
        "completion": [turn(A, "Hips to knee height or lower, if pain-free.")],
    }
    out = canon(rec)
    assert [t["role"] for t in out["prompt"]] == [S, U]
    assert out["chosen"] == "Hips to knee height or lower, if pain-free."


def test_prompt_completion_multi_turn_completion_keeps_the_multi_turn_representation():
    rec = {
        "prompt": [turn(U, "Rest days?")],
        "completion": [turn(A, "One or two a week."), turn(U, "Active ones?"), turn(A, "Walks count.")],
    }
    out = canon(rec)
    assert [t["content"] for t in out["prompt"]] == ["Rest days?", "One or two a week.", "Active ones?"]
    assert out["chosen"] == "Walks count."


def test_implicit_preference_conversational_prompt_is_the_shared_prefix():
    shared = [turn(S, "You are a coach."), turn(U, "Hi"), turn(A, "Hello!"), turn(U, "Carbs before a run?")]
    rec = {
        "chosen": [*shared, turn(A, "A banana an hour before helps most people.")],
        "rejected": [*shared, turn(A, "Never eat carbs.")],
    }
    assert detect_format(rec) == "implicit_preference"
    out = canon(rec)
    assert out["prompt"] == shared
    assert (out["chosen"], out["rejected"]) == (
        "A banana an hour before helps most people.",
        "Never eat carbs.",
    )


def test_implicit_preference_string_form_cuts_at_a_word():
    rec = {
        "chosen": "How long to rest between sets? About two minutes.",
        "rejected": "How long to rest between sets? Abs need none.",
    }
    out = canon(rec)
    assert out["prompt"] == [{"role": U, "content": "How long to rest between sets?"}]
    assert (out["chosen"], out["rejected"]) == ("About two minutes.", "Abs need none.")


@pytest.mark.parametrize(
    ("rec", "reason", "field"),
    [
        ({"chosen": "Yes indeed.", "rejected": "No way."}, "no_shared_prompt", "chosen"),
        (
            {"chosen": [turn(U, "Q1"), turn(A, "A")], "rejected": [turn(U, "Q2"), turn(A, "B")]},
            "bad_conversation",
            "chosen",
        ),
        (
            {"chosen": [turn(U, "Q"), turn(A, "A")], "rejected": [turn(U, "Q"), turn(A, "A")]},
            "chosen_equals_rejected",
            "rejected",
        ),
        ({"chosen": [turn(U, "Q"), turn(A, "A")], "rejected": "B"}, "wrong_type", "rejected"),
    ],
)
def test_implicit_preference_rejects(rec, reason, field):
    with pytest.raises(RowError) as err:
        to_canonical(rec, "implicit_preference", LIMIT)
    assert (err.value.reason, err.value.field) == (reason, field)


def test_sharegpt_preference_llama_factory_with_system_column():
    rec = {
        "conversations": [
            gpt("human", "Knee hurts on lunges."),
            gpt("gpt", "Where exactly?"),
            gpt("human", "Front."),
        ],
        "chosen": gpt("gpt", "Shorten the range and see a physio if it persists."),
        "rejected": gpt("gpt", "Push through it."),
        "system": "You are a careful coach.",
    }
    assert detect_format(rec) == "sharegpt_preference"
    out = canon(rec)
    assert [t["role"] for t in out["prompt"]] == [S, U, A, U]
    assert out["prompt"][0]["content"] == "You are a careful coach."
    assert (out["chosen"], out["rejected"]) == (
        "Shorten the range and see a physio if it persists.",
        "Push through it.",
    )
    assert "system" not in out["meta"]


def test_sharegpt_preference_openai_tags_and_bad_ending():
    rec = {"messages": [turn(U, "Q?")], "chosen": turn(A, "good"), "rejected": turn(A, "bad")}
    assert detect_format(rec) == "sharegpt_preference"
    assert (canon(rec)["chosen"], canon(rec)["rejected"]) == ("good", "bad")
    rec = {
        "conversations": [gpt("human", "Q"), gpt("gpt", "A")],
        "chosen": gpt("gpt", "x"),
        "rejected": gpt("gpt", "y"),
    }
    with pytest.raises(RowError) as err:
        canon(rec)
    assert (err.value.reason, err.value.field) == ("bad_conversation", "conversations")


def test_sharegpt_system_column_and_empty_tools():
    rec = {"conversations": [gpt("human", "Q?"), gpt("gpt", "A.")], "system": "Be kind.", "tools": ""}
    out = canon(rec)
    assert out["prompt"] == [{"role": S, "content": "Be kind."}, {"role": U, "content": "Q?"}]
    # a system turn inside the conversation wins over the column, as in LLaMA-Factory
    rec["conversations"].insert(0, gpt("system", "Inline."))
    assert canon(rec)["prompt"][0]["content"] == "Inline."


def test_alpaca_system_and_history():
    rec = {
        "instruction": "And on rest days?",
        "input": "",
        "output": "Keep protein the same.",
        "system": "You are a dietitian.",
        "history": [["Protein per day?", "About 1.6 g/kg."]],
    }
    out = canon(rec)
    assert out["prompt"] == [
        {"role": S, "content": "You are a dietitian."},
        {"role": U, "content": "Protein per day?"},
        {"role": A, "content": "About 1.6 g/kg."},
        {"role": U, "content": "And on rest days?"},
    ]
    assert out["chosen"] == "Keep protein the same." and out["meta"] == {}
    with pytest.raises(RowError) as err:
        canon({**rec, "history": [["only one"]]})
    assert (err.value.reason, err.value.field) == ("wrong_type", "history[0]")


def test_alpaca_preference_and_axolotl_argilla_names():
    rec = {
        "instruction": "Rate my plan.",
        "input": "Run daily.",
        "chosen": "Add rest days.",
        "rejected": "Perfect.",
    }
    assert detect_format(rec) == "alpaca_preference"
    out = canon(rec)
    assert out["prompt"][0]["content"] == "Rate my plan.\n\nRun daily."
    assert (out["chosen"], out["rejected"]) == ("Add rest days.", "Perfect.")
    rec = {
        "instruction": "Cardio first?",
        "chosen_response": "Either; lift first for strength.",
        "rejected_response": "Always cardio.",
    }
    assert detect_format(rec) == "alpaca_preference"
    assert (canon(rec)["chosen"], canon(rec)["rejected"]) == (
        "Either; lift first for strength.",
        "Always cardio.",
    )


def test_axolotl_question_with_system_is_preference():
    rec = {
        "system": "Cite guidelines.",
        "question": "Daily steps?",
        "chosen": "7-10k helps.",
        "rejected": "100k.",
    }
    assert detect_format(rec) == "preference"
    out = canon(rec)
    assert out["prompt"] == [
        {"role": S, "content": "Cite guidelines."},
        {"role": U, "content": "Daily steps?"},
    ]
    assert "system" not in out["meta"]


def test_unpaired_label_true_is_an_answer_label_false_never_is():
    good = {"prompt": "Fasted cardio burns more fat?", "completion": "Not over a whole day.", "label": True}
    assert detect_format(good) == "unpaired"
    out = canon(good)
    assert (out["chosen"], out["rejected"], out["meta"]) == ("Not over a whole day.", None, {})
    bad = {**good, "completion": "Yes, always train fasted.", "label": False}
    with pytest.raises(RowError) as err:
        canon(bad)
    assert (err.value.reason, err.value.field) == ("unpaired_bad_completion", "label")
    assert "never used as an answer" in err.value.detail and "dpo.method: kto" in err.value.detail


@pytest.mark.parametrize("fmt", ["prompt_completion", "messages", "qa", "preference"])
def test_label_false_is_never_chosen_even_when_a_format_is_forced(fmt):
    rec = {
        "prompt": "Q?",
        "question": "Q?",
        "completion": "bad",
        "answer": "bad",
        "chosen": "bad",
        "messages": [turn(U, "Q?"), turn(A, "bad")],
        "label": "False",
    }
    with pytest.raises(RowError) as err:
        to_canonical(rec, fmt, LIMIT)
    assert err.value.reason == "unpaired_bad_completion"


def test_unpaired_conversational_forms_and_csv_labels():
    rec = {
        "messages": [turn(U, "Stretch before lifting?"), turn(A, "A dynamic warm-up is better.")],
        "label": True,
    }
    assert detect_format(rec) == "unpaired"
    assert canon(rec)["chosen"] == "A dynamic warm-up is better."
    rec = {"prompt": [turn(U, "Q?")], "completion": [turn(A, "A.")], "label": "true"}  # CSV writes strings
    assert detect_format(rec) == "unpaired" and canon(rec)["chosen"] == "A."
    with pytest.raises(RowError) as err:
        to_canonical({**rec, "label": "maybe"}, "unpaired", LIMIT)
    assert (err.value.reason, err.value.field) == ("wrong_type", "label")


def test_prompt_only_is_rejected_with_its_own_reason():
    for rec in ({"prompt": "Best pre-workout snack?"}, {"prompt": [turn(U, "Best pre-workout snack?")]}):
        assert detect_format(rec) == "prompt_only"
        with pytest.raises(RowError) as err:
            canon(rec)
        assert (err.value.reason, err.value.field) == ("prompt_only", "prompt")
        assert "on-policy" in err.value.detail


def test_plain_text_is_rejected_as_no_answer():
    rec = {"text": "Protein is made of amino acids.", "id": 7}
    assert detect_format(rec) == "text"
    with pytest.raises(RowError) as err:
        canon(rec)
    assert (err.value.reason, err.value.field) == ("no_answer", "text")
    assert err.value.detail.startswith("plain text row (language modelling): there is no answer to learn")


@pytest.mark.parametrize(
    ("rec", "field", "role"),
    [
        (
            {
                "conversations": [
                    gpt("human", "Weather?"),
                    gpt("function_call", "{}"),
                    gpt("observation", "{}"),
                    gpt("gpt", "Sunny."),
                ]
            },
            "conversations[1].from",
            "'function_call'",
        ),
        (
            {
                "messages": [
                    turn(U, "Q"),
                    {"role": A, "content": None, "tool_calls": [{"id": "1"}]},
                    turn("tool", "{}"),
                    turn(A, "A"),
                ]
            },
            "messages[1].tool_calls",
            "'assistant' with tool_calls",
        ),
        ({"messages": [turn(U, "Q"), turn("tool", "{}"), turn(A, "A")]}, "messages[1].role", "'tool'"),
        (
            {"conversations": [gpt("human", "Q"), gpt("gpt", "A")], "tools": '[{"name": "bmi"}]'},
            "tools",
            None,
        ),
        ({"messages": [turn(U, "Q"), turn(A, "A")], "tools": [{"name": "bmi"}]}, "tools", None),
    ],
)
def test_tool_calls_are_unsupported_role_naming_the_turn(rec, field, role):
    with pytest.raises(RowError) as err:
        canon(rec)
    assert (err.value.reason, err.value.field) == ("unsupported_role", field)
    assert "tool calls are not supported" in err.value.detail
    if role:
        assert f"has role {role}" in err.value.detail


@pytest.mark.parametrize(
    ("rec", "fmt"),
    [
        ({"prompt": "q", "completion": "a", "label": False}, "unpaired"),
        ({"prompt": "q", "completion": "a", "label": 1}, "unpaired"),
        ({"prompt": "q", "completion": "a", "label": "nutrition"}, "prompt_completion"),
        ({"messages": [], "label": True}, "unpaired"),
        ({"messages": [], "label": "nutrition"}, "messages"),
        ({"messages": [], "chosen": {}, "rejected": {}}, "sharegpt_preference"),
        ({"conversations": [], "chosen": {}}, "sharegpt_preference"),
        ({"conversations": [], "system": "s", "tools": "t"}, "sharegpt"),
        ({"instruction": "i", "input": "x", "chosen": "c", "rejected": "r"}, "alpaca_preference"),
        ({"instruction": "i", "output": "o", "history": []}, "alpaca"),
        ({"prompt": "q", "chosen": "c", "rejected": "r"}, "preference"),
        ({"Question": "q", "Chosen": "c"}, "preference"),
        ({"chosen": [], "rejected": []}, "implicit_preference"),
        ({"question": "q", "answer": "a", "text": "t"}, "qa"),
        ({"prompt": "q", "completion": "c"}, "prompt_completion"),
        ({"prompt": "q", "id": 3}, "prompt_only"),
        ({"prompt": "q", "rejected": "r"}, None),
        ({"text": "t", "meta": {}}, "text"),
        ({"\ufeffquestion": "q", "answer": "a"}, "qa"),
    ],
)
def test_detection_of_overlapping_shapes(rec, fmt):
    assert detect_format(rec) == fmt


def test_explicit_format_overrides_detection():
    rec = {"question": "Q?", "answer": "A.", "chosen": "C.", "rejected": "R."}
    assert detect_format(rec) == "preference"
    assert canon(rec, "qa")["chosen"] == "A." and canon(rec, "qa")["rejected"] is None
    assert canon(rec, "preference")["chosen"] == "C."
    rec = {"prompt": "Q?", "completion": "A.", "label": True}
    assert canon(rec, "prompt_completion")["chosen"] == "A."
