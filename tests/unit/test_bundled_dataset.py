"""The bundled fitness & nutrition preference pairs: schema, variety, balance, and the card's numbers."""

import itertools
import json
import re
import unicodedata
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from qatune.clean import clean_rows
from qatune.formats import dedup_key
from scripts.datacard import CARD, load, render

ROWS = load()
FLAWS = {
    "factual_error",
    "unsafe_advice",
    "gym_myth",
    "vague_generic",
    "overconfident",
    "ignores_context",
    "off_topic",
}
FIELDS = {"id", "question", "chosen", "rejected", "topic", "flaw", "safety", "expected", "fact"}


def words(text):
    return len(text.split())


def tokens(text):
    return set(re.findall(r"[a-z0-9]+", unicodedata.normalize("NFC", text).casefold()))


def test_schema_and_ids():
    assert len(ROWS) >= 1000
    for r in ROWS:
        assert set(r) == FIELDS, r["id"]
        assert all(isinstance(r[k], str) and r[k].strip() for k in FIELDS - {"safety", "expected", "fact"}), (
            r["id"]
        )
        assert isinstance(r["safety"], bool) and r["flaw"] in FLAWS, r["id"]
    assert len({r["id"] for r in ROWS}) == len(ROWS)


def test_questions_unique_and_no_near_duplicates():
    assert len({dedup_key(r["question"]) for r in ROWS}) == len(ROWS)
    toks = [tokens(r["question"]) for r in ROWS]
    close = [
        (ROWS[i]["id"], ROWS[j]["id"])
        for (i, a), (j, b) in itertools.combinations(enumerate(toks), 2)
        if len(a & b) / len(a | b) > 0.8
    ]
    assert close == []


def test_answers_differ_and_lengths_are_in_bounds():
    for r in ROWS:
        assert dedup_key(r["chosen"]) != dedup_key(r["rejected"]), r["id"]
        assert 40 <= words(r["chosen"]) <= 150, r["id"]
        assert 15 <= words(r["rejected"]) <= 150, r["id"]
        assert words(r["question"]) >= 4, r["id"]


def test_topic_flaw_and_safety_balance():
    topics, flaws = Counter(r["topic"] for r in ROWS), Counter(r["flaw"] for r in ROWS)
    assert len(topics) >= 14 and max(topics.values()) <= 0.15 * len(ROWS)
    assert set(flaws) == FLAWS and min(flaws.values()) >= 0.05 * len(ROWS)
    assert sum(r["safety"] for r in ROWS) >= 0.10 * len(ROWS)


def test_safety_answers_refer_to_a_professional():
    who = re.compile(
        r"doctor|physio|GP\b|dietitian|midwife|emergency|911|999|112|medical|clinician|specialist|"
        r"obstetric|cardiolog|pharmacist|professional|nurse|surgeon|care team|psycholog|therapist|"
        r"endocrinolog|urgent|A&E|hospital|diabetes team|consultant|paediatric|sleep clinic",
        re.I,
    )
    missing = [r["id"] for r in ROWS if r["safety"] and not who.search(r["chosen"])]
    assert missing == []


def test_safety_rows_say_which_stance_a_safe_answer_takes_and_their_answers_take_it():
    from qatune.stance import stance

    assert all((r["expected"] in ("decline", "caution")) == r["safety"] for r in ROWS)
    decline = [r for r in ROWS if r["expected"] == "decline"]
    assert len(decline) >= 0.08 * len(ROWS) and {r["topic"] for r in decline} == {r["topic"] for r in ROWS}
    # a safe answer to a harmful request never approves it, and the classifier the evaluation uses agrees
    assert [r["id"] for r in decline if stance(r["chosen"]) == "affirms"] == []
    # most rejected answers to harmful requests say yes (the habit DPO must unlearn), fluently and at length
    affirming = [r for r in decline if stance(r["rejected"]) == "affirms"]
    assert len(affirming) >= 0.8 * len(decline)
    assert sum(words(r["rejected"]) >= 0.9 * words(r["chosen"]) for r in affirming) >= 0.7 * len(affirming)


def test_key_facts_parse_and_the_chosen_answer_states_them_and_never_contradicts_them():
    from qatune.facts import check

    with_fact = [r for r in ROWS if r["fact"] is not None]
    assert len(with_fact) >= 0.45 * len(ROWS)  # enough in a ~10% test split for a +-0.15 interval
    assert {r["topic"] for r in with_fact} == {r["topic"] for r in ROWS}
    bad = [
        r["id"] for r in with_fact if check(r["fact"], r["chosen"]) != {"states": True, "contradicts": False}
    ]
    assert bad == []
    contradicted = [r for r in with_fact if check(r["fact"], r["rejected"])["contradicts"]]
    assert len(contradicted) >= 0.5 * len(with_fact)  # wrong numbers for the same quantity


def test_rejected_answers_are_often_as_long_as_the_chosen_ones_in_every_topic():
    """Length must not tell chosen from rejected: a large share of rejected answers is as long, in every topic."""
    long_wrong = [r for r in ROWS if words(r["rejected"]) >= 0.9 * words(r["chosen"])]
    assert len(long_wrong) >= 0.5 * len(ROWS)
    assert sum(words(r["rejected"]) >= words(r["chosen"]) for r in ROWS) >= 0.3 * len(ROWS)
    per_topic = Counter(r["topic"] for r in long_wrong)
    assert all(per_topic[t] >= 0.3 * c for t, c in Counter(r["topic"] for r in ROWS).items()), per_topic


def test_yes_and_no_openings_do_not_tell_chosen_from_rejected():
    """Harmful requests' refusals open with no and their rejected answers with yes; elsewhere the balance must go
    the other way often enough that "start with no" is not a shortcut to the chosen answer."""
    from scripts.datacard import opens

    assert opens(ROWS, "chosen", "yes") >= opens(ROWS, "chosen", "no")
    assert opens(ROWS, "rejected", "no") >= 0.5 * opens(ROWS, "rejected", "yes")
    decline = [r for r in ROWS if r["expected"] == "decline"]
    assert opens(decline, "chosen", "no") <= 0.4 * len(decline)  # refusals in many words, not one


def test_card_numbers_match_the_file():
    text = CARD.read_text(encoding="utf-8")
    assert render(text, ROWS) == text, "DATA_CARD.md is stale: run python scripts/datacard.py"
    assert f"**{len(ROWS)} records**" in text


def test_demo_questions_are_not_in_the_dataset():
    path = resources.files("qatune") / "data" / "demo_questions.txt"
    demos = [q for q in path.read_text(encoding="utf-8").splitlines() if q.strip() and not q.startswith("#")]
    assert len(demos) >= 8
    known = {dedup_key(r["question"]) for r in ROWS}
    assert not [q for q in demos if dedup_key(q) in known]


@pytest.fixture(scope="module")
def smollm2_counter():
    from qatune.base_model import bundled_tokenizer

    tok = bundled_tokenizer("smollm2-135m-instruct")

    def count(messages, generation_prompt):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return count


def test_clean_reads_it_with_zero_rejects_under_the_default_limits(smollm2_counter):
    from qatune.params import load_params

    c = load_params(Path(__file__).resolve().parents[2] / "params.yaml").clean
    envs = [{"source": "fitness", "file": "bundled", "line": i, "record": r} for i, r in enumerate(ROWS, 1)]
    result = clean_rows(
        envs, {"fitness": "preference"}, smollm2_counter, c.max_prompt_length, c.max_length, c.max_field_chars
    )
    assert result.rejects == []
    assert len(result.kept) == len(ROWS)
    assert {r["meta"]["safety"] for r in result.kept} == {True, False}


def test_the_bundled_tokenizer_is_what_its_gguf_file_states():
    """Under every transformers an image installs (5.17's GGUF loader takes <|im_start|> as eos, no pad, and
    adds byte fallback), the tokenizer ends a turn at <|im_end|>, pads with it, and is a byte-level BPE."""
    import transformers

    from qatune.base_model import bundled_gguf, bundled_tokenizer, gguf_tokenizer_metadata

    folder, name = bundled_gguf("smollm2-135m-instruct")
    stated = gguf_tokenizer_metadata(folder / name)
    assert stated["model"] == "gpt2"
    assert stated["special"] == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
    }
    tok = bundled_tokenizer("smollm2-135m-instruct")
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("<|im_end|>", 2, 2), (
        transformers.__version__
    )
    state = json.loads(tok.backend_tokenizer.to_str())
    assert state["model"]["byte_fallback"] is False and state["model"]["unk_token"] is None
    assert state["decoder"]["type"] == "ByteLevel" and state["normalizer"] is None
    text = "Protein , per kg ?\n  3×10 reps, café 🏋️"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_the_saved_bundled_tokenizer_is_the_same_online_and_offline(tmp_path, monkeypatch):
    """models/base must not depend on how the stage was started: from_pretrained records local_files_only
    (true under HF_HUB_OFFLINE=1, which `make repro` sets and a plain `dvc repro` may not) and
    save_pretrained wrote it, so a fresh clone's `make repro` disagreed with a lock written by `dvc repro`."""
    from qatune.base_model import bundled_tokenizer

    saved = {}
    for offline in ("1", "0"):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        bundled_tokenizer("smollm2-135m-instruct").save_pretrained(tmp_path / offline)
        saved[offline] = (tmp_path / offline / "tokenizer_config.json").read_text()
    assert "local_files_only" not in saved["1"]
    assert saved["1"] == saved["0"]
