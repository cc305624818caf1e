"""Key facts: does an answer state the number a correct answer gives, or a different one for the same quantity?

A fact-bearing row carries its key fact as one short string, e.g.

    "1.6-2.2 g/kg"             1.6 to 2.2 grams per kilogram of body weight
    "150-300 min/week"         150 to 300 minutes (of moderate activity) a week
    "7-9 h sleep"              7 to 9 hours, in a sentence about sleep
    "4 kcal/g"                 4 kilocalories per gram

that is, VALUE UNIT [SUBJECT ...]. VALUE is a number or a range (`lo-hi`); UNIT is one of UNITS, optionally
`/per` (g/kg, min/week, mg/day, kcal/g, g/h, days/week, ...); each SUBJECT word must appear in the sentence
that holds the number (a prefix match: `sleep` also matches `sleeping`), which keeps a number for another
quantity in the same answer (8 hours of fasting, in a sentence that does not mention sleep) from counting.

An answer *states* the fact when some mention of the quantity lies inside the accepted range (a relative
tolerance of 10% on each end, for rounding: 2.2 g/kg covers 2.4, 1 L covers 1.1); it *contradicts* the fact
when some mention shares no value with that range (3-4 g/kg for 1.6-2.2). A mention that only overlaps it
("150-300 minutes a week" for a fact of 150, "1-3 g/kg" for 1.6-2.2) is neither: imprecise, not wrong. Both can hold (a hedging answer). A mention is a number or a range
followed by the unit, and, for a `/per` unit, the `per` word within a few words after it ("1.6 g of it
per kg", "150 minutes of brisk walking a week"). Numbers may be written with digits (1,500 / 2.5 / ½) or as
words up to twenty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qatune.errors import QatuneError

TOLERANCE = 0.10
# Canonical unit -> what follows the number in prose. Longer alternatives first.
UNITS: dict[str, str] = {
    "g": r"g|grams?|gm",
    "mg": r"mg|milligrams?",
    "mcg": r"mcg|µg|μg|micrograms?",
    "IU": r"IU|international units",
    "kcal": r"kcal|kilocalories|calories|cal",
    "kJ": r"kJ|kilojoules?",
    "L": r"L|litres?|liters?",
    "ml": r"ml|mL|millilitres?|milliliters?",
    "oz": r"oz|ounces?",
    "cups": r"cups?|glasses",
    "min": r"min|mins|minutes?",
    "h": r"h|hrs?|hours?",
    "s": r"s|secs?|seconds?",
    "%": r"%|percent|per cent",
    "reps": r"reps?|repetitions?",
    "sets": r"sets?",
    "days": r"days?",
    "weeks": r"weeks?",
    "months": r"months?",
    "sessions": r"sessions?|workouts?|times",
    "kg": r"kg|kilos?|kilograms?",
    "lb": r"lbs?|pounds?",
    "bpm": r"bpm|beats per minute|beats a minute",
    "mmHg": r"mmHg|mm Hg",
    "servings": r"servings?|portions?",
    "steps": r"steps",
    "drinks": r"drinks|units",
    "years": r"years?|yrs?",
    "km": r"km|kilometres?|kilometers?",
}
# The `/per` part: what a sentence says after the number and unit.
PER: dict[str, str] = {
    "kg": r"kg|kilo|kilogram|body ?weight|bodyweight",
    "lb": r"lb|pound",
    "g": r"g\b|gram",
    "day": r"day|daily|24 ?h",
    "week": r"week|weekly|wk",
    "night": r"night|nightly",
    "h": r"h\b|hour|hr\b",
    "session": r"session|workout",
    "meal": r"meal|sitting|serving",
    "set": r"set\b|sets\b",
    "muscle": r"muscle",
    "min": r"min\b|minute",
}
PER_WINDOW = 6  # words between the unit and its `per` part ("1.6 g of it per kilogram of body weight")
_WORD_NUMBERS = {
    w: i
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
}
_WORD_NUMBERS |= {
    "half": 0.5,
    "a half": 0.5,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "ninety": 90,
}
_NUM = (
    r"(?:\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?|\.\d+|½|"
    + "|".join(sorted(_WORD_NUMBERS, key=len, reverse=True))
    + r")"
)
_RANGE_SEP = r"\s*(?:-|–|—|to|or|and)\s*"
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])|\n+")


@dataclass(frozen=True)
class Fact:
    low: float
    high: float
    unit: str
    per: str | None
    subject: tuple[str, ...]
    text: str

    def accepts(self, low: float, high: float) -> bool:
        """The mention lies inside the accepted range (each end with the tolerance): it states the fact."""
        return low >= self.low * (1 - TOLERANCE) - 1e-9 and high <= self.high * (1 + TOLERANCE) + 1e-9

    def disagrees(self, low: float, high: float) -> bool:
        """The mention shares no value with the accepted range (with the tolerance): another number for the
        same quantity. A mention that only overlaps ("150-300 minutes" for a fact of 150) is neither."""
        return high < self.low * (1 - TOLERANCE) - 1e-9 or low > self.high * (1 + TOLERANCE) + 1e-9


def _number(text: str) -> float:
    text = text.strip().lower()
    if text in _WORD_NUMBERS:
        return float(_WORD_NUMBERS[text])
    if text == "½":
        return 0.5
    return float(text.replace(",", ""))


def parse_fact(text: str) -> Fact:
    """A row's `fact` string -> Fact; a one-line QatuneError naming what is wrong."""
    parts = text.split()
    if len(parts) < 2:
        raise QatuneError(f"fact {text!r}: expected 'VALUE UNIT [SUBJECT ...]', e.g. '7-9 h sleep'")
    value, unit, subject = parts[0], parts[1], tuple(p.lower() for p in parts[2:])
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?", value.replace(",", ""))
    if not m:
        raise QatuneError(f"fact {text!r}: value {value!r} is not a number or a range like 1.6-2.2")
    low = float(m.group(1))
    high = float(m.group(2)) if m.group(2) else low
    if high < low:
        raise QatuneError(f"fact {text!r}: range {value!r} runs backwards")
    base, _, per = unit.partition("/")
    if base not in UNITS:
        raise QatuneError(f"fact {text!r}: unknown unit {base!r} (known: {', '.join(UNITS)})")
    if per and per not in PER:
        raise QatuneError(f"fact {text!r}: unknown '/{per}' (known: {', '.join(PER)})")
    return Fact(low, high, base, per or None, subject, text)


def _mention_pattern(unit: str) -> re.Pattern[str]:
    return re.compile(
        rf"(?<![\w.,])(?P<a>{_NUM})(?:{_RANGE_SEP}(?P<b>{_NUM}))?\s*(?:-\s*)?(?:{UNITS[unit]})(?![A-Za-z])",
        re.IGNORECASE,
    )


_PATTERNS: dict[str, re.Pattern[str]] = {}


def mentions(fact: Fact, answer: str) -> list[tuple[float, float]]:
    """Every (low, high) the answer gives for the fact's quantity."""
    pattern = _PATTERNS.setdefault(fact.unit, _mention_pattern(fact.unit))
    per = re.compile(rf"^\s*/\s*(?:{PER[fact.per]})|\b(?:{PER[fact.per]})", re.I) if fact.per else None
    found = []
    for sentence in _SENTENCE.split(answer):
        lowered = sentence.lower()
        if fact.subject and not all(re.search(rf"\b{re.escape(s)}", lowered) for s in fact.subject):
            continue
        for m in pattern.finditer(sentence):
            if per is not None:
                after = sentence[m.end() :]
                window = " ".join(after.split()[:PER_WINDOW])
                if after.lstrip().startswith("/"):
                    window = after.lstrip()
                if not per.search(window):
                    continue
            a = _number(m.group("a"))
            b = _number(m.group("b")) if m.group("b") else a
            found.append((min(a, b), max(a, b)))
    return found


def row_fact(row: dict) -> Fact | None:
    """The row's key fact (`fact`, in `meta` or at the top), parsed; None where it has none or one that does
    not parse (a `fact` column of someone else's data may be prose; the clean stage warns about it)."""
    value = (row.get("meta") or {}).get("fact", row.get("fact"))
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return parse_fact(value)
    except QatuneError:
        return None


def check(fact: Fact | str, answer: str) -> dict[str, bool]:
    """{"states": a mention inside the accepted range, "contradicts": a mention that shares no value with it}."""
    fact = parse_fact(fact) if isinstance(fact, str) else fact
    found = mentions(fact, answer)
    return {
        "states": any(fact.accepts(lo, hi) for lo, hi in found),
        "contradicts": any(fact.disagrees(lo, hi) for lo, hi in found),
    }
