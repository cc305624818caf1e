"""Tiny random models with small trained tokenizers, for tests and smoke runs (seconds on a CPU).

    python -m tests.tiny OUT_DIR [--family llama|qwen2|qwen3|gemma|mistral]

The tokenizer is a byte-level BPE trained in-process on a few KB of domain text (vocabulary ~400),
with a ChatML chat template; the model is a random 2-layer config of the chosen family.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma's turn format (no system role): exercises the prompt/completion loss path.
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# ChatML (SmolLM2, Qwen), Gemma and Llama 3 turn markers, so each family's real template tokenizes as it does
# for the real model (tests give a tiny model that family's template).
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
# Mistral's <s> / </s> exist only in its family's tokenizer (adding them to every family would change the
# other tiny vocabularies that tests already rely on).
MISTRAL_SPECIALS = ["<s>", "</s>"]
FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "mistral": "mistral"}
# The throwaway tokenizer's training text: a few sentences of the bundled dataset's kind (no trailing newline).
CORPUS = (Path(__file__).parent / "fixtures" / "tiny_corpus.txt").read_text(encoding="utf-8")


def build_tokenizer(vocab_size: int = 400, family: str = "llama"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIALS + (MISTRAL_SPECIALS if family == "mistral" else [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CORPUS] * 20, trainer=trainer)
    if family == "gemma":
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<bos>",
            eos_token="<end_of_turn>",
            pad_token="<|endoftext|>",
            unk_token=None,
        )
        fast.chat_template = GEMMA
        return fast
    if family == "mistral":  # [INST] turns, no system role (tests give it Mistral Instruct's own template)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<|endoftext|>", unk_token=None
        )
        fast.chat_template = MISTRAL
        return fast
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token=None
    )
    fast.chat_template = CHATML
    return fast


def build_model(tokenizer, family: str = "llama", seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        FAMILIES[family],
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny(out: str | Path, family: str = "llama", seed: int = 0) -> Path:
    out = Path(out)
    tokenizer = build_tokenizer(family=family)
    model = build_model(tokenizer, family, seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", help="folder to write the model and tokenizer to")
    parser.add_argument(
        "--family",
        default="llama",
        choices=sorted(FAMILIES),
        help="architecture family of the random config",
    )
    args = parser.parse_args(argv)
    print(save_tiny(args.out, args.family))


if __name__ == "__main__":
    main()
