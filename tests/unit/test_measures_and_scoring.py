"""The evaluate stage's measures: each checked against a hand computation or a slower obvious method."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qatune import generation, measures, scoring, stance
from qatune.errors import QatuneError
from qatune.templates import conversation


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


def test_bootstrap_of_identical_models_is_exactly_zero_and_no_change():
    scores = np.random.default_rng(1).normal(3.0, 0.5, size=40)
    out = measures.paired_bootstrap(scores - scores, seed=42, direction="lower")
    assert (out["mean_diff"], out["ci_low"], out["ci_high"]) == (0.0, 0.0, 0.0)
    assert out["verdict"] == "no change" and out["p_better"] == 0.0 and out["n"] == 40


def test_bootstrap_interval_excludes_zero_for_a_clear_shift_and_has_the_normal_width():
    d = np.random.default_rng(2).normal(0.0, 1.0, size=400)
    d = d - d.mean() + 0.5  # mean exactly 0.5, sd about 1: the standard error is about 0.05
    up = measures.paired_bootstrap(d, seed=7, direction="higher")
    assert up["mean_diff"] == pytest.approx(0.5) and 0 < up["ci_low"] < 0.5 < up["ci_high"]
    assert up["verdict"] == "better" and up["p_better"] == 1.0
    assert up["ci_high"] - up["ci_low"] == pytest.approx(2 * 1.96 * d.std() / math.sqrt(d.size), rel=0.15)
    down = measures.paired_bootstrap(d, seed=7, direction="lower")  # the same change where lower is better
    assert down["verdict"] == "worse" and down["p_better"] == 0.0
    assert (down["ci_low"], down["ci_high"]) == (up["ci_low"], up["ci_high"])
    context = measures.paired_bootstrap(-d, seed=7, direction="")
    assert context["verdict"] == "lower" and context["p_better"] is None
    # A small shift under the same noise is not distinguishable from no change.
    assert measures.paired_bootstrap(d - 0.49, seed=7)["verdict"] == "no change"


def test_bootstrap_is_deterministic_given_the_seed():
    d = np.random.default_rng(3).normal(0.1, 1.0, size=50)
    assert measures.paired_bootstrap(d, seed=5) == measures.paired_bootstrap(list(d), seed=5)
    assert measures.paired_bootstrap(d, seed=5)["ci_low"] != measures.paired_bootstrap(d, seed=6)["ci_low"]
    with pytest.raises(QatuneError, match="no paired questions"):
        measures.paired_bootstrap([], seed=5)


def test_pair_by_id_matches_questions_by_id_and_drops_missing_values():
    ids, a, b = measures.pair_by_id(
        ("final", "base"),
        ["q1", "q2", "q3", "q4"],
        [1.0, 2.0, None, 4.0],
        ["q3", "q4", "q1", "q2"],
        [30.0, 40.0, 10.0, None],
    )
    assert ids == ["q1", "q4"] and a.tolist() == [1.0, 4.0] and b.tolist() == [10.0, 40.0]


@pytest.mark.parametrize(
    ("ids", "other_ids", "message"),
    [
        (
            ["q1", "q2"],
            ["q1", "q9"],
            r"final and base scored different questions \(1 only in final, 1 only in base",
        ),
        (["q1", "q1"], ["q1", "q2"], r"final: row id 'q1' appears twice"),
        (["q1", None], ["q1", "q2"], r"final: a scored row has no id"),
        (["q1", "q2"], ["q1"], r"base: 1 row ids for 2 values"),
    ],
)
def test_pair_by_id_refuses_rows_that_do_not_pair_with_one_line(ids, other_ids, message):
    with pytest.raises(QatuneError, match=message) as err:
        measures.pair_by_id(("final", "base"), ids, [1.0, 2.0], other_ids, [1.0, 2.0])
    assert "\n" not in str(err.value)


def test_per_question_measures_average_to_the_corpus_measures():
    scores = [
        {"chosen_logp": -20.0, "chosen_tokens": 10, "rejected_logp": -3.0, "rejected_tokens": 1},
        {"chosen_logp": -10.0, "chosen_tokens": 10, "rejected_logp": -30.0, "rejected_tokens": 10},
        {"chosen_logp": -5.0, "chosen_tokens": 5},
    ]
    per = measures.per_question_likelihood(scores)
    assert per["question_nll"] == [2.0, 1.0, 1.0]  # each question weighs the same: mean 4/3, corpus 35/25
    assert per["preference_margin"] == [pytest.approx(1.0), pytest.approx(2.0), None]
    assert per["preference_accuracy"] == [1.0, 1.0, None]
    assert (
        measures.mean(per["preference_accuracy"])
        == measures.likelihood_metrics(scores)["preference_accuracy"]
    )

    rows = [
        {"chosen": "see a doctor about chest pain", "meta": {"safety": True}},
        {"chosen": "eat protein with every meal", "meta": {"safety": False}},
    ]
    answers, finished, similarity, rejected = (
        ["Please see a doctor.", "Eat protein."],
        [True, False],
        [0.9, 0.2],
        [
            0.1,
            None,
        ],
    )
    per = measures.per_question_generation(rows, answers, finished, similarity, rejected)
    corpus = measures.generation_metrics(rows, answers, finished, similarity, [0.9 > 0.1])
    for key, values in per.items():
        assert measures.mean(values) == pytest.approx(corpus[key]), key
    assert per["safety_score"] == [1.0, None] and per["closer_to_chosen"] == [1.0, None]


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


def test_the_measures_count_the_configured_referral_words():
    """params `domain.referral` decides what counts as sending someone to a professional."""
    rows = [{"chosen": "x", "meta": {"safety": True, "expected": "caution"}}, {"chosen": "y", "meta": {}}]
    answers = ["A counsellor could help you sort this out.", "Try a walk."]
    psych = stance.referral_vocabulary(["counsel", "therap"])
    bundled = measures.generation_metrics(rows, answers, [True, True], None, None)
    configured = measures.generation_metrics(rows, answers, [True, True], None, None, psych)
    assert bundled["safety_score"] == 0.0 and configured["safety_score"] == 1.0
    # the stance reads a referral as caution: with the bundled words this answer talks around the question
    assert stance.stance(answers[0]) == "evades" and stance.stance(answers[0], psych) == "cautions"
    assert bundled["stances"] == {"caution": {"affirms": 0, "declines": 0, "cautions": 0, "evades": 1}}
    assert configured["stances"]["caution"]["cautions"] == 1
    assert measures.judge_answers(rows, answers, psych)["safe_stance_rate"] == [1.0, None]
    per = measures.per_question_generation(rows, answers, [True, True], None, None, psych)
    assert per["safety_score"] == [1.0, None]
