"""Key facts: a fact string parses into a range, a unit and subject words; an answer states it with a number
inside the range, contradicts it with another number for the same quantity, and other quantities never count."""

import pytest

from qatune.errors import QatuneError
from qatune.facts import check, parse_fact


@pytest.mark.parametrize(
    ("fact", "answer", "states", "contradicts"),
    [
        ("1.6-2.2 g/kg protein", "Aim for 1.6-2.2 g of protein per kg of body weight each day.", True, False),
        ("1.6-2.2 g/kg protein", "Eat 3-4 g of protein per kilogram daily.", False, True),
        ("1.6-2.2 g/kg protein", "Eat 20-40 g of protein per meal.", False, False),  # another quantity
        ("1.6-2.2 g/kg protein", "About 2 grams per kilo of protein is plenty.", True, False),
        ("150-300 min/week", "Adults need 150 to 300 minutes of moderate activity a week.", True, False),
        (
            "150-300 min/week",
            "Aim for 10,000-20,000 minutes per week.",
            False,
            True,
        ),  # the old default's answer
        ("150-300 min/week", "Walk for 30 minutes today.", False, False),  # no week: not the quantity
        ("7-9 h sleep", "Most adults need seven to nine hours of sleep.", True, False),
        ("7-9 h sleep", "Most adults need 5 hours of sleep a night.", False, True),
        (
            "7-9 h sleep",
            "Rest 2 hours after lunch. Sleep matters.",
            False,
            False,
        ),  # subject not in the sentence
        ("3-5 g creatine", "Take 3-5 g of creatine monohydrate daily.", True, False),
        ("3-5 g creatine", "Take 20 g of creatine daily for life.", False, True),
        ("2300 mg sodium", "Keep sodium under 2,300 mg a day.", True, False),
        ("2300 mg sodium", "Keep sodium under 2,500 mg a day.", True, False),  # within 10%: rounding
        ("4 kcal/g", "Protein and carbs give 4 kcal/g.", True, False),
        ("4 kcal/g", "Protein gives 4 kcal/g but fat gives 9 kcal/g.", True, True),  # both: the literal limit
        ("400 mcg folic", "Take 400 µg of folic acid daily.", True, False),
    ],
)
def test_states_and_contradicts(fact, answer, states, contradicts):
    assert check(fact, answer) == {"states": states, "contradicts": contradicts}


@pytest.mark.parametrize(
    ("fact", "message"),
    [
        ("1.6", "expected 'VALUE UNIT"),
        ("lots g", "is not a number"),
        ("5-3 g", "runs backwards"),
        ("3 parsecs", "unknown unit 'parsecs'"),
        ("3 g/fortnight", "unknown '/fortnight'"),
    ],
)
def test_a_bad_fact_is_one_clear_error(fact, message):
    with pytest.raises(QatuneError, match=message.replace("(", r"\(")):
        parse_fact(fact)


def test_a_mention_that_only_overlaps_the_range_neither_states_nor_contradicts():
    assert check("150 min/week", "Aim for 150-300 minutes per week.") == {
        "states": False,
        "contradicts": False,
    }
    assert check("1.6-2.2 g/kg protein", "Eat 1-3 g of protein per kg.") == {
        "states": False,
        "contradicts": False,
    }
    assert check("1.6-2.2 g/kg protein", "Eat 2.5-4 g of protein per kg.") == {
        "states": False,
        "contradicts": True,
    }


def test_focus_first_puts_refusals_and_right_numbers_first_alternating():
    from qatune.focus import focus_first

    def row(i, **meta):
        return {
            "id": i,
            "chosen": "Take 3-5 g of creatine a day.",
            "rejected": "Take 20 g of creatine a day.",
            "meta": meta,
        }

    rows = [
        row("plain"),
        row("fact-right-rejected", fact="3-5 g creatine"),
        row("harm-1", expected="decline"),
        row("fact-wrong-rejected", fact="3-5 g creatine"),
        row("harm-2", expected="decline"),
        row("bad-fact", fact="lots of creatine"),  # does not parse: never picked, never an error
    ]
    rows[1]["rejected"] = "Take 4 g of creatine a day."  # a rejected answer that states the fact too
    ordered = focus_first(rows, 3, wrong_rejected=True)
    assert [r["id"] for r in ordered] == [
        "harm-1",
        "fact-wrong-rejected",
        "harm-2",
        "plain",
        "fact-right-rejected",
        "bad-fact",
    ]
    assert [r["id"] for r in focus_first(rows, 2)][:2] == ["harm-1", "fact-right-rejected"]
    assert focus_first(rows, 0) is rows
    assert sorted(r["id"] for r in focus_first(rows, 99)) == sorted(r["id"] for r in rows)  # nothing lost
