"""Which rows a short training run sees first: the ones that teach safety and correctness.

A run capped by max_steps (the embedded default trains 240 SFT rows and 96 DPO pairs of ~1,000) would
otherwise see what the split's shuffle gave it. `focus_first` moves harmful requests answered with a refusal
and key-fact rows to the front, alternating. Putting yes/no rows among them too was measured and not kept
(bench/RESULTS.md section 9, run H).
"""

from __future__ import annotations

from qatune.facts import Fact, check, row_fact


def _meta(row: dict) -> dict:
    return row.get("meta") or {}


def harmful_requests(rows: list[dict]) -> list[dict]:
    """Rows that ask approval for something harmful (`expected: decline`) and have a refusal to learn."""
    return [r for r in rows if _meta(r).get("expected") == "decline" and r.get("chosen")]


def fact_rows(rows: list[dict]) -> list[tuple[dict, Fact]]:
    """(row, its key fact) for the rows with an answer and a fact that parses; harmful requests excluded."""
    out = []
    for r in rows:
        fact = row_fact(r) if r.get("chosen") and _meta(r).get("expected") != "decline" else None
        if fact:
            out.append((r, fact))
    return out


def focus_first(rows: list[dict], n: int, wrong_rejected: bool = False) -> list[dict]:
    """`rows` with up to `n` rows that teach safety and correctness moved to the front, alternating:
    harmful requests (`expected: decline`, a refusal as the answer) and key-fact rows (a `fact` the answer
    states; with `wrong_rejected`, only those whose rejected answer contradicts it: a right number preferred to
    a wrong one). The rest keep their order. A run capped by max_steps then trains on these first."""
    if n <= 0:
        return rows
    harm = harmful_requests(rows)
    fact = [
        r
        for r, f in fact_rows(rows)
        if not wrong_rejected or (r.get("rejected") and check(f, r["rejected"])["contradicts"])
    ]
    picked: list[dict] = []
    for i in range(max(len(harm), len(fact))):
        picked += [group[i] for group in (harm, fact) if i < len(group)]
    picked = picked[:n]
    chosen = {id(r) for r in picked}
    return picked + [r for r in rows if id(r) not in chosen]
