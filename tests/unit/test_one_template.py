"""One template, everywhere: qatune.prompts.check_template on tiny tokenizers with the real templates of
Gemma, Llama 3, Qwen 2.5/3, Mistral and SmolLM2 (tests/unit/test_stop_tokens.py's cases).

The GGUF side is llama-cpp-python's own Jinja2ChatFormatter over the template as a GGUF file stores it; a
tiny BPE tokenizer has no GGUF (llama.cpp's converter does not know it), so `FileShim` answers the few
llama_cpp.Llama calls the check makes (metadata, tokenize, detokenize, bos/eos/eot) from the tokenizer.
The real GGUF path is tested on SmolLM2's bundled file below and in the export stage's test.
"""

from __future__ import annotations

import copy

import pytest

from qatune import export
from qatune.prompts import CONVERSATION, check_template, go_render, template_ids
from qatune.templates import template_kwargs, use_training_template
from tests.unit.test_stop_tokens import CASES, family_tokenizer


class FileShim:
    """What check_template asks of a llama_cpp.Llama, answered from a transformers tokenizer."""

    def __init__(self, tokenizer, template: str | None = None):
        self.tok = tokenizer
        self.metadata = {"tokenizer.chat_template": template or tokenizer.chat_template}
        self._model = type("Model", (), {"token_eot": staticmethod(lambda: -1)})()

    def token_eos(self) -> int:
        return self.tok.eos_token_id

    def token_bos(self) -> int:
        return -1 if self.tok.bos_token_id is None else self.tok.bos_token_id

    def n_vocab(self) -> int:
        return len(self.tok)

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        ids = self.tok(text.decode(), add_special_tokens=False)["input_ids"]
        return ([self.token_bos()] if add_bos and self.token_bos() >= 0 else []) + ids

    def detokenize(self, ids: list[int], special: bool = False) -> bytes:
        return self.tok.decode(ids, skip_special_tokens=not special).encode()


def models(name: str, enable_thinking: bool = False):
    """(training tokenizer, merged tokenizer, template kwargs) as sft and merge leave them."""
    merged = family_tokenizer(name)
    training = copy.deepcopy(merged)
    use_training_template(training, enable_thinking)
    return training, merged, template_kwargs(merged.chat_template, enable_thinking)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_renderer_gives_the_same_prompt_and_stops_at_every_end_of_turn(name):
    enable_thinking = name == "qwen3"  # llama-cpp-python renders without template kwargs: Qwen3's default
    training, merged, kwargs = models(name, enable_thinking)
    modelfile = export.ollama_template(merged, kwargs, has_system=True)
    record = check_template(
        training, merged, FileShim(merged), kwargs, modelfile_template=modelfile, system_prompt="Be safe."
    )
    assert record["problems"] == [] and record["ok"]
    assert set(record["prompt_tokens"]) == {"training", "merged", "gguf"}
    if (
        name == "qwen3"
    ):  # TRL's training copy keeps earlier answers' empty <think> blocks; the model's own drops them
        assert record["warnings"][0].startswith("training prompt ids differ")
        assert record["warnings"][0].endswith("in earlier turns only; single-turn prompts agree")
        assert record["prompt_tokens"]["gguf"] == record["prompt_tokens"]["merged"]
    else:
        assert record["warnings"] == [] and len(set(record["prompt_tokens"].values())) == 1
    end_of_turn = merged.convert_tokens_to_ids(CASES[name][3][0])
    assert all(ends == [end_of_turn] for ends in record["end_of_turn_ids"].values())
    assert record["modelfile_template"].startswith("same text")


def test_qwen3_without_thinking_renders_differently_in_llama_cpp():
    """enable_thinking: false is a template variable transformers passes and llama-cpp-python's chat handler
    does not: the GGUF prompt lacks the empty <think></think> block. A difference of template variables only
    is a warning (the file's template is the model's own); any other difference fails."""
    training, merged, kwargs = models("qwen3", enable_thinking=False)
    record = check_template(training, merged, FileShim(merged), kwargs)
    assert record["ok"] and record["problems"] == []
    gguf = [w for w in record["warnings"] if w.startswith("gguf prompt ids differ")]
    assert gguf and "without ['enable_thinking']" in gguf[0]
    assert record["prompt_tokens"]["gguf"] < record["prompt_tokens"]["merged"]


def test_a_file_with_another_template_or_a_stop_token_missing_fails():
    training, merged, kwargs = models("gemma")
    other = merged.chat_template.replace("<start_of_turn>", "<start_of_turn> ")
    record = check_template(training, merged, FileShim(merged, other), kwargs)
    assert [p.split(" prompt ids")[0] for p in record["problems"]] == ["gguf"]
    # a template that ends earlier answers with another token than the last one: stop_tokens, which renders
    # one exchange, never sees <|im_end|>, so a model trained on such history would not stop there
    merged.chat_template = (
        "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if m['role'] == 'assistant' and not loop.last %}<|im_end|>{% else %}<end_of_turn>{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    record = check_template(merged, merged, FileShim(merged), {})
    assert not record["ok"] and len(record["problems"]) == 3  # training, merged and gguf each
    im_end = merged.convert_tokens_to_ids("<|im_end|>")
    assert record["problems"][0].startswith(f"merged: end-of-turn token ids [{im_end}] are not stop tokens")


def test_a_modelfile_template_that_drifted_from_its_source_is_caught():
    training, merged, kwargs = models("llama3")
    good = export.ollama_template(merged, kwargs, has_system=True)
    assert check_template(training, merged, None, kwargs, None, good, "Be safe.")["ok"]
    bad = good.replace("<|eot_id|>", "", 1)
    record = check_template(training, merged, None, kwargs, None, bad, "Be safe.")
    assert record["problems"][0].startswith("the Modelfile TEMPLATE renders a different prompt")


def test_go_render_follows_the_system_branch():
    template = "{{ if .System }}S:{{ .System }}|{{ else }}N|{{ end }}U:{{ .Prompt }}|A:{{ .Response }}END"
    assert go_render(template, "sys", "q") == "S:sys|U:q|A:"
    assert go_render(template, None, "q") == "N|U:q|A:"


def test_the_bundled_smollm2_gguf_matches_its_own_tokenizer():
    pytest.importorskip("llama_cpp")
    from qatune.base_model import bundled_gguf, bundled_tokenizer
    from qatune.inference import load_gguf

    folder, name = bundled_gguf("smollm2-135m-instruct")
    llm = load_gguf(folder / name, n_ctx=256).model
    merged = bundled_tokenizer("smollm2-135m-instruct")
    training = copy.deepcopy(merged)
    use_training_template(training, False)
    record = check_template(training, merged, llm)
    assert record["ok"], record["problems"]
    assert record["prompt_tokens"]["gguf"] == len(template_ids(merged, CONVERSATION))
