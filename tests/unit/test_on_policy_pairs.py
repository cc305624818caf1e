"""dpo's on-policy pairs: which of the SFT model's own answers become rejected answers. The model is replaced
by fixed answers (the generation itself is tested in tests/stages/test_training_stages.py)."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("dpo_stage", Path(__file__).parents[2] / "stages" / "dpo.py")
dpo_stage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dpo_stage)


def row(id_, prompt, chosen, **meta):
    return {"id": id_, "prompt": prompt, "chosen": chosen, "meta": meta}


ROWS = [
    row(
        "h1", "Can I take my sister's insulin to cut?", "No, please don't: ask a doctor.", expected="decline"
    ),
    row("h2", "Can I train through chest pain?", "No, stop and get checked.", expected="decline"),
    row(
        "f1",
        "How much protein to build muscle?",
        "About 1.6-2.2 g/kg of protein a day.",
        fact="1.6-2.2 g/kg protein",
    ),
    row("f2", "How long should I sleep?", "Most adults need 7-9 h of sleep.", fact="7-9 h sleep"),
    row("f3", "How much creatine?", "Take some creatine daily.", fact="3-5 g creatine"),  # states no number
    row("f4", "Weekly cardio?", "150 min/week of moderate cardio.", fact="150 min/week"),
]
ANSWERS = {
    "h1": "Yes, that's generally safe if you are careful.",  # affirms: a pair
    "h2": "No. Stop now and see a doctor before you train again.",  # declines: no pair
    "f1": "Aim for about 5-6 g/kg of protein per day.",  # contradicts: a pair
    "f2": "Most adults do well on 7-8 h of sleep a night.",  # states: no pair
    "f4": "Try some cardio most days.",  # neither: no pair
}


def run(monkeypatch, harm_rows, fact_rows):
    asked = []

    def answer(model, tokenizer, rows, *args):
        asked.extend(r["id"] for r in rows)
        return [{**r, "rejected": ANSWERS[r["id"]]} for r in rows]

    monkeypatch.setattr(dpo_stage, "on_policy_rejected", answer)
    pairs, seen = dpo_stage.own_answer_pairs(None, None, ROWS, harm_rows, fact_rows, None, 16, 4)
    return asked, pairs, seen


def test_wrong_answers_become_pairs_right_ones_do_not(monkeypatch):
    asked, pairs, seen = run(monkeypatch, 2, 3)
    # f3's chosen answer states no number: it cannot teach the fact, so it is never asked
    assert asked == ["h1", "h2", "f1", "f2", "f4"]
    assert seen == {
        "harm": {"affirms": 1, "declines": 1},
        "facts": {"contradicts": 1, "states": 1, "neither": 1},
    }
    assert [(p["id"], p["rejected"], p["chosen"]) for p in pairs] == [
        ("h1-on-policy", ANSWERS["h1"], ROWS[0]["chosen"]),
        ("f1-on-policy", ANSWERS["f1"], ROWS[2]["chosen"]),
    ]
    assert all("_fact" not in p for p in pairs)  # the bookkeeping key stays out of the training rows


def test_limits_are_per_kind(monkeypatch):
    asked, pairs, seen = run(monkeypatch, 1, 0)
    assert asked == ["h1"] and seen == {"harm": {"affirms": 1}, "facts": {}} and len(pairs) == 1
    asked, _, _ = run(monkeypatch, 0, 1)
    assert asked == ["f1"]
