"""Every token that ends a turn stops generation: the real chat templates of Gemma, Llama 3, Qwen 2.5/3 and
Mistral on tiny tokenizers whose eos is the family's real one (Gemma's <eos>, Llama 3 base's
<|end_of_text|>, Qwen's <|endoftext|>), not the end-of-turn token the template writes. qatune derives the
stop tokens from the template (qatune.generation.stop_tokens), and every generation path stops there: a tiny
model whose greedy next token is <end_of_turn> answers one token, not max_new_tokens of them."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from qatune import export, hub, inference, scoring
from qatune.generation import after_answer, gguf_stop_tokens, greedy_answers, stop_tokens, until_stop
from qatune.params import GenerateParams
from qatune.templates import use_prompt_format
from tests.tiny import CHATML, build_model, build_tokenizer
from tests.unit.test_chat_templates import FAMILIES, tokenizer_with

# mistralai/Mistral-7B-Instruct-v0.1's tokenizer_config.json chat_template: the answer ends with eos_token.
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# name -> (tiny family, real template, the real tokenizer's eos, the stop texts qatune must derive)
CASES = {
    "gemma": ("gemma", FAMILIES["gemma"][1], "<eos>", ["<end_of_turn>", "<eos>"]),
    "llama3": ("llama", FAMILIES["llama3"][1], "<|end_of_text|>", ["<|eot_id|>", "<|end_of_text|>"]),
    "llama3.2": ("llama", FAMILIES["llama3.2"][1], "<|end_of_text|>", ["<|eot_id|>", "<|end_of_text|>"]),
    "qwen2.5": ("qwen2", FAMILIES["qwen2.5"][1], "<|endoftext|>", ["<|im_end|>", "<|endoftext|>"]),
    "qwen3": ("qwen3", FAMILIES["qwen3"][1], "<|endoftext|>", ["<|im_end|>", "<|endoftext|>"]),
    "mistral": ("mistral", MISTRAL_V01, "</s>", ["</s>"]),  # its template ends a turn with eos itself
    "smollm2": ("llama", CHATML, "<|im_end|>", ["<|im_end|>"]),
}


def family_tokenizer(name: str):
    """A tiny tokenizer with the family's real template and its real eos token (added where the tiny
    vocabulary lacks it)."""
    family, template, eos, _ = CASES[name]
    tok = tokenizer_with(family, template)
    tok.add_special_tokens({"eos_token": eos})
    return tok


@pytest.mark.parametrize("name", sorted(CASES))
def test_stop_tokens_are_the_templates_end_of_turn_then_eos(name):
    tok = family_tokenizer(name)
    stops = stop_tokens(tok, GenerationConfig(eos_token_id=tok.eos_token_id))
    assert stops.texts == CASES[name][3]
    assert stops.ids == tok.convert_tokens_to_ids(CASES[name][3])


def test_generation_config_eos_ids_are_kept_once_after_the_end_of_turn():
    # Llama 3.1 Instruct's generation_config.json lists <|end_of_text|>, <|eom_id|> and <|eot_id|>
    tok = family_tokenizer("llama3.2")
    eot, end, header = tok.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>", "<|end_header_id|>"])
    stops = stop_tokens(tok, GenerationConfig(eos_token_id=[end, header, eot]))
    assert stops.ids == [eot, end, header]
    assert stops.eos_token_id == [eot, end, header]
    assert stop_tokens(family_tokenizer("smollm2")).eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_a_template_that_cannot_render_an_answer_leaves_eos_alone():
    assert after_answer(lambda messages: 1 / 0) == ""
    tok = family_tokenizer("gemma")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: hidden{% endfor %}"
    assert stop_tokens(tok).texts == ["<eos>"]


# --------------------------------------------------------------------------- behaviour


def says_end_of_turn_first(tok, family: str, marker: str = "<end_of_turn>"):
    """A tiny model whose greedy next token is always `marker`: its LM head is a bias on that token."""
    model = build_model(tok, family).eval()
    head = torch.nn.Linear(model.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.convert_tokens_to_ids(marker)] = 10.0
    model.lm_head = head
    return model


def count_new_tokens(model) -> list[int]:
    """Wraps model.generate to record how many tokens each call added."""
    counts: list[int] = []
    generate = model.generate

    def counting(*args, **kwargs):
        out = generate(*args, **kwargs)
        counts.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    model.generate = counting
    return counts


def test_greedy_answers_stop_at_the_end_of_turn_token():
    """score's and evaluate's greedy answers and dpo's on-policy answers."""
    tok = family_tokenizer("gemma")
    model = says_end_of_turn_first(tok, "gemma")
    assert model.generation_config.eos_token_id == tok.eos_token_id  # <eos> alone, as a base model has it
    counts = count_new_tokens(model)
    question = [[{"role": "user", "content": "How much protein?"}]]
    answers, finished = greedy_answers(model, tok, question, batch_size=1, max_new_tokens=8)
    assert counts == [1] and finished == [True] and answers == [""]


def test_streamed_answers_stop_at_the_end_of_turn_token():
    """`qatune ask` and the chat app."""
    tok = family_tokenizer("llama3.2")
    model = says_end_of_turn_first(tok, "llama", "<|eot_id|>")
    counts = count_new_tokens(model)
    loaded = inference.Loaded(model, tok, "cpu", "float32", "tiny")
    settings = GenerateParams(temperature=0.0, max_new_tokens=8, repetition_penalty=1.0)
    answer = "".join(inference.stream_answer(loaded, inference.build_messages("Q?", None), settings))
    assert counts == [1] and answer == ""


def test_the_published_generation_config_stops_a_plain_generate(tmp_path):
    """merge writes stop_tokens' ids as eos_token_id; push-to-hub keeps them; a user's plain
    `model.generate(**inputs)` then stops at <end_of_turn> too."""
    tok = family_tokenizer("gemma")
    model = says_end_of_turn_first(tok, "gemma")
    model.generation_config.eos_token_id = stop_tokens(tok, model.generation_config).eos_token_id
    model.generation_config.save_pretrained(tmp_path)
    saved = GenerationConfig.from_pretrained(tmp_path)
    assert saved.eos_token_id == tok.convert_tokens_to_ids(["<end_of_turn>", "<eos>"])
    assert hub.generation_config(saved.to_dict(), GenerateParams())["eos_token_id"] == saved.eos_token_id
    model.generation_config = saved
    prompt = tok.apply_chat_template([{"role": "user", "content": "Q?"}], add_generation_prompt=True)
    ids = torch.tensor([prompt["input_ids"] if hasattr(prompt, "keys") else prompt])
    out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] - ids.shape[1] == 1


def test_scored_answers_end_with_the_end_of_turn_token():
    tok = family_tokenizer("gemma")
    row = {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "Yes."}
    ((ids, _),) = scoring.encode_pairs(tok, [row], None, "chosen")
    assert ids[-1] == tok.convert_tokens_to_ids("<end_of_turn>")


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_modelfile_lists_every_stop_text(name):
    tok = family_tokenizer(name)
    template = export.ollama_template(tok, {}, has_system=False)
    stops = stop_tokens(tok, GenerationConfig(eos_token_id=tok.eos_token_id))
    text = export.modelfile("model-q8_0.gguf", template, stops, None, GenerateParams())
    listed = [line for line in text.splitlines() if line.startswith("PARAMETER stop ")]
    assert listed == [f'PARAMETER stop "{stop}"' for stop in CASES[name][3]]


def test_a_plain_format_modelfile_also_stops_at_the_next_user_line():
    """Seed 001's plain text has no end-of-turn token: a model that goes on writes the next "User:" line, which
    the transformers and llama.cpp paths cut (stop strings), and Ollama must too. Ollama's parser takes a quoted
    value's characters as they are, the newline included, as its own `quote()` writes such a stop."""
    tok = use_prompt_format(family_tokenizer("qwen2.5"), "plain")  # seed 001
    stops = stop_tokens(tok, GenerationConfig(eos_token_id=tok.eos_token_id))
    assert stops.strings == ("\nUser:",)
    template = export.ollama_template(tok, {}, has_system=False)
    text = export.modelfile("model-q8_0.gguf", template, stops, None, GenerateParams())
    assert 'PARAMETER stop "\nUser:"\n' in text
    assert f'PARAMETER stop "{tok.eos_token}"' in text


# --------------------------------------------------------------------------- llama.cpp (generate.mode: gguf)


@pytest.fixture(scope="module")
def smollm2_gguf():
    pytest.importorskip("llama_cpp")
    from qatune.base_model import bundled_gguf

    folder, name = bundled_gguf("smollm2-135m-instruct")
    return inference.load_gguf(folder / name, n_ctx=256)


def test_a_gguf_stops_at_its_templates_end_of_turn_and_its_eos(smollm2_gguf):
    """The same rule on the template stored in the file; llama.cpp's own eot for SmolLM2 is <|endoftext|>."""
    llm = smollm2_gguf.model
    assert gguf_stop_tokens(llm).texts == ["<|im_end|>", "<|endoftext|>"]
    template = llm.metadata["tokenizer.chat_template"]
    try:  # a template that ends a turn with another control token puts that one first
        llm.metadata["tokenizer.chat_template"] = (
            "{% for m in messages %}<|im_start|>{{ m['content'] }}<|endoftext|>\n{% endfor %}"
        )
        assert gguf_stop_tokens(llm).texts == ["<|endoftext|>", "<|im_end|>"]
    finally:
        llm.metadata["tokenizer.chat_template"] = template


def test_a_gguf_answers_through_its_own_template_and_stops(smollm2_gguf):
    settings = GenerateParams(temperature=0.0, max_new_tokens=64, repetition_penalty=1.0)
    messages = inference.build_messages("Say hello.", None)
    chunks = smollm2_gguf.model.create_chat_completion(messages, max_tokens=64, temperature=0.0)
    assert chunks["choices"][0]["finish_reason"] == "stop"  # an end-of-turn token, not max_tokens
    answer = "".join(inference.stream_answer(smollm2_gguf, messages, settings))
    assert answer.strip() and "<|im_end|>" not in answer
    assert answer == chunks["choices"][0]["message"]["content"]


# --------------------------------------------------------------------------- the plain format's "User:" line


def plain_tokenizer_with_a_run_on_token():
    """Seed 001's plain format on a tiny tokenizer with one token that writes an answer and the next question's
    opening, "ok\\nUser:": what a model that learnt whole User:/Assistant: texts may go on to write."""
    tok = build_tokenizer(family="qwen2")
    tok.add_tokens(["ok\nUser:"])
    return use_prompt_format(tok, "plain")


def test_the_plain_format_stops_at_eos_and_at_the_next_user_line():
    tok = plain_tokenizer_with_a_run_on_token()
    stops = stop_tokens(tok, GenerationConfig(eos_token_id=tok.eos_token_id))
    assert stops.ids == [tok.eos_token_id] and stops.strings == ("\nUser:",)
    assert stop_tokens(family_tokenizer("qwen2.5")).strings == ()  # chat templates: tokens only


def test_greedy_answers_in_the_plain_format_end_before_the_next_user_line():
    tok = plain_tokenizer_with_a_run_on_token()
    model = says_end_of_turn_first(tok, "qwen2", "ok\nUser:")
    counts = count_new_tokens(model)
    answers, finished = greedy_answers(model, tok, [[{"role": "user", "content": "Q?"}]], 1, max_new_tokens=8)
    assert counts == [1] and answers == ["ok"] and finished == [True]


def test_streamed_answers_in_the_plain_format_end_before_the_next_user_line():
    """`qatune ask`, the chat app and `qatune serve` in the plain format."""
    tok = plain_tokenizer_with_a_run_on_token()
    model = says_end_of_turn_first(tok, "qwen2", "ok\nUser:")
    counts = count_new_tokens(model)
    loaded = inference.Loaded(model, tok, "cpu", "float32", "tiny")
    settings = GenerateParams(temperature=0.0, max_new_tokens=8, repetition_penalty=1.0)
    answer = "".join(inference.stream_answer(loaded, inference.build_messages("Q?", None), settings))
    assert counts == [1] and answer == "ok"


@pytest.mark.parametrize(
    ("pieces", "shown"),
    [
        (
            [" Three", " times", " a week.\nUs", "er: And"],
            ["Three", " times", " a week."],
        ),  # split stop: hidden
        (["Rest\nUse", " a foam roller."], ["Rest", "\nUse a foam roller."]),  # a prefix that was not one
        (["  ", "\n", " Sleep", " well."], ["Sleep", " well."]),  # the space after "Assistant:" dropped
        (["Done.\nU"], ["Done.", "\nU"]),  # the held tail is shown when the stream ends
        (["\nUser: hi"], []),
    ],
)
def test_a_stream_is_cut_before_a_stop_string_that_is_never_shown(pieces, shown):
    assert list(until_stop(iter(pieces), ("\nUser:",))) == shown


def test_scored_plain_answers_are_the_tokens_the_model_learnt():
    """The answer after "Assistant:" keeps its space, as in the trained text, and ends with EOS."""
    tok = use_prompt_format(build_tokenizer(family="qwen2"), "plain")
    row = {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "Yes, daily."}
    ((ids, start),) = scoring.encode_pairs(tok, [row], None, "chosen")
    text = tok.apply_chat_template(
        [*row["prompt"], {"role": "assistant", "content": "Yes, daily."}], tokenize=False
    )
    assert ids == tok(text, add_special_tokens=False)["input_ids"] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[start:]) == " Yes, daily." + tok.eos_token
