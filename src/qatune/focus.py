"""Which rows a short training run sees first: the ones that teach safety and correctness.

A run capped by max_steps (the embedded default trains 240 SFT rows and 96 DPO pairs of ~1,000) would
otherwise see what the split's shuffle gave it. `focus_first` moves harmful requests answered with a refusal,
yes/no questions and key-fact rows to the front, one of each in turn.
"""

from __future__ import annotations

from qatune.errors import QatuneError
from qatune.facts import check, parse_fact
from qatune.stance import opening_answer


def focus_first(rows: list[dict], n: int, wrong_rejected: bool = False) -> list[dict]:
    """`rows` with up to `n` rows that teach safety and correctness moved to the front, taking one of each
    group in turn: harmful requests (`expected: decline`, a refusal as the answer), yes/no questions (the
    answer opens with yes or no, qatune.stance.opening_answer; not a safety request) and key-fact rows (a
    `fact` the answer states). With `wrong_rejected`, only pairs whose rejected answer is wrong in that way:
    a yes/no row whose rejected answer opens with the other word, a fact row whose rejected answer
    contradicts the fact. The rest keep their order. A run capped by max_steps then trains on these first."""
    if n <= 0:
        return rows

    def meta(row: dict) -> dict:
        return row.get("meta") or {}

    harm = [r for r in rows if meta(r).get("expected") == "decline" and r.get("chosen")]
    yes_no, fact = [], []
    for r in rows:
        if not r.get("chosen") or meta(r).get("expected"):
            continue
        said = opening_answer(r["chosen"])
        if said and (not wrong_rejected or opening_answer(r.get("rejected") or "") not in (None, said)):
            yes_no.append(r)
            continue
        value = meta(r).get("fact")
        if not isinstance(value, str):
            continue
        try:
            parsed = parse_fact(value)
        except QatuneError:
            continue
        if not wrong_rejected or (r.get("rejected") and check(parsed, r["rejected"])["contradicts"]):
            fact.append(r)
    picked: list[dict] = []
    for i in range(max(len(harm), len(yes_no), len(fact))):
        picked += [group[i] for group in (harm, yes_no, fact) if i < len(group)]
    picked = picked[:n]
    chosen = {id(r) for r in picked}
    return picked + [r for r in rows if id(r) not in chosen]
