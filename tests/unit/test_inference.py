"""Pure inference choices: adaptive answer length, device and dtype, input cap, prompt, sampling."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from qatune import hardware, inference
from qatune.errors import QatuneError
from qatune.params import GenerateParams

GIB = 2**30


# --------------------------------------------------------------------------- KV cache and adaptive length


def test_kv_bytes_per_token_counts_keys_and_values():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 dims; float32 = 4 bytes -> 45 KiB per token.
    assert inference.kv_bytes_per_token(30, 3, 64, 4) == 2 * 30 * 3 * 64 * 4 == 46080
    assert inference.kv_bytes_per_token(30, 3, 64, 2) == 46080 // 2  # bf16 halves it


def test_plenty_of_memory_keeps_the_request():
    assert inference.adaptive_max_new_tokens(512, 100, 24 * GIB, 46080, context_length=8192) == 512


def test_short_memory_lowers_the_request():
    # 10 MiB free, half of it for the cache: 5 MiB / 10 KiB = 512 tokens, minus a 100-token prompt.
    per_token = 10 * 1024
    assert inference.adaptive_max_new_tokens(4096, 100, 10 * 2**20, per_token) == 512 - 100


def test_memory_fraction_is_a_parameter():
    per_token = 1024
    full = inference.adaptive_max_new_tokens(10**6, 0, 2**20, per_token, memory_fraction=1.0)
    half = inference.adaptive_max_new_tokens(10**6, 0, 2**20, per_token, memory_fraction=0.5)
    assert (full, half) == (1024, 512)


def test_context_window_bounds_the_answer():
    assert inference.adaptive_max_new_tokens(512, 2000, 24 * GIB, 46080, context_length=2048) == 48


def test_nothing_fits_is_a_clear_error():
    with pytest.raises(QatuneError, match="not enough room to answer: 100 prompt tokens"):
        inference.adaptive_max_new_tokens(512, 100, 2**20, 46080)
    with pytest.raises(QatuneError, match="context window 100"):
        inference.adaptive_max_new_tokens(512, 100, 24 * GIB, 46080, context_length=100)


def test_kv_geometry_reads_plain_and_grouped_query_configs():
    llama = SimpleNamespace(
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576
    )
    assert inference.kv_geometry(llama) == (30, 3, 64)  # head_dim from hidden / heads
    gpt_like = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64)
    assert inference.kv_geometry(gpt_like) == (2, 4, 16)  # no GQA: one KV head per head
    qwen3 = SimpleNamespace(
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_size=1024
    )
    assert inference.kv_geometry(qwen3) == (28, 8, 128)  # explicit head_dim wins


def test_kv_geometry_of_a_real_transformers_config():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    assert inference.kv_geometry(config) == (2, 2, 16)


def test_free_memory_on_cpu_is_available_ram():
    assert inference.free_memory_bytes("cpu") > 100 * 2**20


# --------------------------------------------------------------------------- device and dtype


@pytest.mark.parametrize(
    ("requested", "cuda", "expected"),
    [("auto", True, "cuda"), ("auto", False, "cpu"), ("cpu", True, "cpu"), ("cuda", True, "cuda")],
)
def test_select_device(requested, cuda, expected):
    assert hardware.select_device(requested, cuda) == expected


def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(QatuneError, match="no CUDA GPU"):
        hardware.select_device("cuda", False)


@pytest.mark.parametrize(
    ("requested", "device", "expected"),
    [
        ("auto", "cpu", "float32"),  # placement("serve") on a CPU
        ("auto", "cuda", "bfloat16"),  # ... on a bf16 GPU
        ("float32", "cpu", "float32"),  # seed 004's app: the base in float32 on the CPU
        ("float32", "cuda", "float32"),
        ("bfloat16", "cpu", "bfloat16"),
        ("float16", "cuda", "float16"),
    ],
)
def test_serve_dtype(requested, device, expected):
    machine = hardware.Hardware(cuda=device == "cuda", cuda_bf16=True, cpu_bf16=True)
    auto = hardware.placement("serve", machine)[1]
    assert inference.serve_dtype(requested, device, auto) == expected


def test_float16_on_the_cpu_is_refused():
    with pytest.raises(QatuneError, match=r"^chat.dtype: float16 needs a CUDA GPU"):
        inference.serve_dtype("float16", "cpu", "float32")


# --------------------------------------------------------------------------- a model or adapter by Hub id


def cached_snapshot(cache: Path, repo_id: str, files: dict[str, str]) -> Path:
    """A Hub repo as huggingface_hub's cache holds it after a download: refs/main names the commit, whose
    snapshot folder has the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty working folder and a Hugging Face cache, with the Hub unreachable (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "cache"


def test_a_local_folder_is_used_as_it_is(offline_cache):
    Path("someone/lora").mkdir(parents=True)
    assert inference.local_folder("someone/lora", "adapter") == "someone/lora"
    Path("models").mkdir()  # the pipeline's output folder, before the dpo stage wrote into it
    assert not inference.is_hub_id("models/dpo")
    assert inference.local_folder("models/dpo", "adapter") == "models/dpo"  # loading then says what to run
    assert not inference.is_hub_id("nowhere") and not inference.is_hub_id("./a/b")


def test_a_hub_id_is_its_snapshot_in_the_cache_when_offline(offline_cache):
    snapshot = cached_snapshot(offline_cache, "someone/tiny-lora", {"adapter_config.json": "{}"})
    assert inference.is_hub_id("someone/tiny-lora")
    assert Path(inference.local_folder("someone/tiny-lora", "adapter")).resolve() == snapshot.resolve()


def test_a_hub_id_that_is_not_cached_offline_is_a_one_line_error(offline_cache):
    with pytest.raises(QatuneError) as err:
        inference.local_folder("someone/missing-lora", "adapter")
    message = str(err.value)
    assert message.startswith(
        "adapter 'someone/missing-lora': no such folder here, and no Hub snapshot of it: "
    )
    assert "HF_HUB_OFFLINE=0" in message and "\n" not in message


# --------------------------------------------------------------------------- input cap and prompt


def test_question_is_stripped_and_kept_within_the_cap():
    assert inference.check_question("  How much protein?\n", 2000) == "How much protein?"
    assert inference.check_question("x" * 20, 20) == "x" * 20


def test_an_over_long_question_gets_a_message_naming_the_limit():
    with pytest.raises(QatuneError, match=r"2,001 characters; the limit is 2,000 \(chat.max_input_chars\)"):
        inference.check_question("x" * 2001, 2000)


def test_an_empty_question_is_refused():
    with pytest.raises(QatuneError, match="empty"):
        inference.check_question("   ", 2000)


def test_messages_start_with_the_training_system_prompt():
    assert inference.build_messages("Is creatine safe?", "Be safe.") == [
        {"role": "system", "content": "Be safe."},
        {"role": "user", "content": "Is creatine safe?"},
    ]
    assert inference.build_messages("Q?", None) == [{"role": "user", "content": "Q?"}]


def test_history_keeps_only_the_last_turns():
    history = []
    for i in range(inference.HISTORY_TURNS + 2):
        history += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    messages = inference.build_messages("now?", "S", history)
    assert messages[0] == {"role": "system", "content": "S"}
    assert messages[-1] == {"role": "user", "content": "now?"}
    kept = messages[1:-1]
    assert len(kept) == 2 * inference.HISTORY_TURNS
    assert kept[0]["content"] == "q2"  # the two oldest exchanges are gone


def test_the_prompt_renders_with_the_chat_template():
    from tests.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    text = tokenizer.apply_chat_template(
        inference.build_messages("Q?", "S"), tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------- sampling settings


def test_overrides_replace_only_what_is_given():
    base = GenerateParams()
    merged = inference.generation_settings(base, temperature=0.7, top_p=None, max_new_tokens=64)
    assert (merged.temperature, merged.top_p, merged.max_new_tokens) == (0.7, 0.9, 64)
    assert inference.generation_settings(base, mode="adapter").mode == "adapter"


def test_out_of_range_overrides_are_one_line_errors():
    with pytest.raises(QatuneError, match="top_p"):
        inference.generation_settings(GenerateParams(), top_p=1.5)
    with pytest.raises(QatuneError, match="max_new_tokens"):
        inference.generation_settings(GenerateParams(), max_new_tokens=0)


def test_temperature_zero_is_greedy():
    greedy = inference.sampling_kwargs(GenerateParams(temperature=0))
    assert greedy["do_sample"] is False and greedy["temperature"] is None
    sampled = inference.sampling_kwargs(GenerateParams())  # seed 001: 0.2 / 0.9
    assert sampled == {"do_sample": True, "temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}


def test_free_gpu_memory_counts_the_allocators_unused_cache(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (3 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 5 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 4 * GIB)
    assert inference.free_memory_bytes("cuda") == 4 * GIB
