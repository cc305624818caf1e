"""The evaluate stage's measures: each checked against a hand computation or a slower obvious method."""

from __future__ import annotations

import json
import math

import pytest

from qatune import generation, measures, report, scoring
from qatune.chat import conversation
from qatune.errors import QatuneError


def test_preference_accuracy_is_per_token_and_the_summed_one_is_length_biased():
    # chosen: 100 tokens at -1.0 each; rejected: 10 tokens at -2.0 each. Per token chosen wins,
    # summed log-prob (-100 vs -20) prefers the short rejected answer.
    scores = [{"chosen_logp": -100.0, "chosen_tokens": 100, "rejected_logp": -20.0, "rejected_tokens": 10}]
    out = measures.likelihood_metrics(scores)
    assert out["preference_accuracy"] == 1.0
    assert out["preference_accuracy_unnormalised"] == 0.0
    assert out["nll"] == pytest.approx(1.0) and out["perplexity"] == pytest.approx(math.e)


def test_nll_is_token_weighted_and_rows_without_rejected_are_not_pairs():
    scores = [
        {"chosen_logp": -10.0, "chosen_tokens": 10},
        {"chosen_logp": -60.0, "chosen_tokens": 20, "rejected_logp": -1.0, "rejected_tokens": 1},
    ]
    out = measures.likelihood_metrics(scores)
    assert out["nll"] == pytest.approx(70 / 30)
    assert out["pairs"] == 1 and out["preference_accuracy"] == 0.0
    with pytest.raises(QatuneError, match="no answer tokens"):
        measures.likelihood_metrics([{"chosen_logp": 0.0, "chosen_tokens": 0}])


def test_implicit_reward_matches_the_dpo_definition():
    policy = [
        {"chosen_logp": -10.0, "rejected_logp": -30.0},
        {"chosen_logp": -12.0, "rejected_logp": -18.0},
    ]
    reference = [
        {"chosen_logp": -11.0, "rejected_logp": -29.0},
        {"chosen_logp": -11.0, "rejected_logp": -19.0},
    ]
    out = measures.implicit_reward(policy, reference, beta=0.5)
    # margins: 0.5*((1) - (-1)) = 1.0 ; 0.5*((-1) - (1)) = -1.0
    assert out["accuracy"] == 0.5 and out["margin_mean"] == pytest.approx(0.0)
    assert out["chosen_reward_mean"] == pytest.approx(0.0) and out["pairs"] == 2


def test_referral_detection_and_looping_rate():
    assert measures.refers_to_professional("Please see your GP before starting.")
    assert measures.refers_to_professional("Talk to a registered dietitian.")
    assert not measures.refers_to_professional("Eat more vegetables and sleep well.")
    assert measures.repeated_ngram_rate("one two three four five six seven eight") == 0.0
    loop = " ".join(["it is about being a runner"] * 10)
    assert measures.repeated_ngram_rate(loop) > 0.8


def test_generation_metrics_split_safety_and_other_questions():
    rows = [
        {"chosen": "see a doctor about chest pain", "meta": {"safety": True}},
        {"chosen": "eat protein with every meal", "meta": {"safety": False}},
    ]
    out = measures.generation_metrics(
        rows, ["Please see a doctor.", "Eat protein."], [True, False], None, None
    )
    assert out["safety_score"] == 1.0 and out["referral_rate_other"] == 0.0
    assert out["unfinished_rate"] == 0.5 and out["safety_cases"] == 1
    assert 0 < out["rouge_l"] < 1 and "semantic_similarity" not in out


def test_pick_samples_covers_topics_and_puts_safety_cases_first():
    rows = [
        {"topic": t, "meta": {"safety": s}}
        for t, s in [("a", False), ("a", True), ("b", False), ("c", False)]
    ]
    picked = report.pick_samples(rows, 3)
    assert picked == [1, 2, 3]  # one per topic, the safety case for topic a
    assert report.pick_samples(rows, 10) == [0, 1, 2, 3] and report.pick_samples(rows, 0) == []


def test_verdict_uses_each_measures_direction():
    models = {"base": {"nll": 3.0, "safety_score": 0.5, "answer_words_mean": 10}, "sft": {}}
    models["final"] = {"nll": 2.5, "safety_score": 0.4, "answer_words_mean": 90}
    better, worse = report.verdict(models)
    assert any("NLL" in b for b in better) and any("safety" in w for w in worse)
    assert not any("length" in x for x in better + worse)  # context only


def test_extra_eval_file_bad_row_names_file_line_and_field(tmp_path):
    good = {"question": "How much protein?", "answer": "About 1.6 g/kg."}
    path = tmp_path / "faq.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"question": "Empty?", "answer": " "}) + "\n")
    with pytest.raises(QatuneError, match=r"faq.jsonl:2: field 'chosen'"):
        scoring.read_eval_file(str(path), "auto")
    path.write_text(json.dumps(good) + "\n")
    rows = scoring.read_eval_file(str(path), "auto")
    assert rows[0]["chosen"] == "About 1.6 g/kg." and rows[0]["rejected"] is None


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tok


ROWS = [
    {
        "prompt": [{"role": "user", "content": "How much water a day?"}],
        "chosen": "About two litres.",
        "rejected": "None.",
    },
    {
        "prompt": [{"role": "user", "content": "Is it fine to stretch before running?"}],
        "chosen": "Yes, dynamic stretches.",
        "rejected": "No",
    },
    {
        "prompt": [{"role": "user", "content": "Protein?"}],
        "chosen": "1.6 grams per kilogram per day.",
        "rejected": "x",
    },
]


def test_answer_logprobs_equal_a_full_softmax_over_answer_tokens_only(tiny):
    import torch

    model, tok = tiny
    encoded = scoring.encode_pairs(tok, ROWS, "Be safe.", "chosen")
    got = scoring.answer_logprobs(model, encoded, batch_size=2, pad_id=tok.pad_token_id)
    for (ids, start), (total, count) in zip(encoded, got, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        logp = logits.log_softmax(-1)
        expected = sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))
        assert count == len(ids) - start  # answer tokens and the end-of-turn token, no prompt token
        assert total == pytest.approx(expected, abs=1e-3)
    assert encoded[0][0][-1] == tok.eos_token_id


def test_batched_greedy_generation_equals_one_question_at_a_time(tiny):
    model, tok = tiny
    questions = [conversation(r, "Be safe.") for r in ROWS]
    batched, finished = generation.greedy_answers(model, tok, questions, 3, 8, 1.0, "test")
    one_by_one = [generation.greedy_answers(model, tok, [q], 1, 8, 1.0, "test")[0][0] for q in questions]
    assert batched == one_by_one and len(finished) == 3
