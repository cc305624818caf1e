"""Answer questions with the trained model: loading, prompting and streamed generation.

Shared by `qatune ask` (stdout) and `qatune chat` (Gradio). Two ways to load the model (seed 001):
`merged` reads models/merged (one plain model, the fast path); `adapter` reads models/base and puts the
final LoRA adapter (models/dpo) on top with peft, as trained. A folder given by hand may also be a Hub repo
id (seed 004's app loads its adapter so), snapshot into the Hugging Face cache. The choices that depend on
the machine (device, dtype, how many new tokens fit in memory) are small pure functions, unit-tested
without a GPU.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from qatune import hardware, modeling
from qatune.base_model import WEIGHT_PATTERNS
from qatune.errors import QatuneError
from qatune.generation import gguf_chat_formatter, gguf_stop_tokens, stop_tokens, until_stop
from qatune.params import GenerateParams
from qatune.templates import conversation, stop_strings, template_kwargs

# Only part of the free memory goes to the KV cache: the forward pass also needs activations and a
# vocabulary-sized logits row per step, and allocators fragment. Half leaves room for all of that.
KV_MEMORY_FRACTION = 0.5
# The model was trained on single-turn questions; the last few exchanges give a follow-up its context
# without letting the prompt (and its cost per token) grow for as long as a chat lasts.
HISTORY_TURNS = 3

MERGED_DIR = "models/merged"
BASE_DIR = "models/base"
ADAPTER_DIR = "models/dpo"
GGUF_DIR = "models/gguf"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")  # owner/name


# --------------------------------------------------------------------------- machine choices (pure)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_element: int) -> int:
    """KV-cache memory one more token costs: a key and a value vector per layer and KV head."""
    return 2 * num_layers * num_kv_heads * head_dim * bytes_per_element


def adaptive_max_new_tokens(
    requested: int,
    prompt_tokens: int,
    free_bytes: int,
    bytes_per_token: int,
    context_length: int | None = None,
    memory_fraction: float = KV_MEMORY_FRACTION,
) -> int:
    """How many new tokens to allow: the request, lowered to what the KV cache can hold in free memory.

    Free memory is GPU memory on a GPU and available RAM on CPU (seed 000's adaptive generation). The
    cache holds prompt and answer, so the prompt's share comes off first; the model's context window is
    a second bound. Raises when not even one new token fits, instead of letting the process be killed.
    """
    budget = int(free_bytes * memory_fraction) // bytes_per_token - prompt_tokens
    if context_length is not None:
        budget = min(budget, context_length - prompt_tokens)
    if budget < 1:
        raise QatuneError(
            f"not enough room to answer: {prompt_tokens} prompt tokens, "
            f"{free_bytes / 2**20:.0f} MiB free, {bytes_per_token / 1024:.1f} KiB of KV cache per token"
            + (f", context window {context_length}" if context_length else "")
        )
    return min(requested, budget)


def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) from a transformers config; multimodal configs nest the text model."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


def serve_dtype(requested: str, device: str, auto: str) -> str:
    """The dtype a served model loads in (`chat.dtype`): `auto` is hardware.placement's (bf16 or fp16 on a
    GPU, float32 on a CPU); float16 on a CPU is refused, as slow where it runs at all."""
    if requested == "auto":
        return auto
    if requested not in ("float32", "bfloat16", "float16"):
        raise QatuneError(f"chat.dtype: unknown dtype '{requested}' (auto, float32, bfloat16, float16)")
    if requested == "float16" and device == "cpu":
        raise QatuneError("chat.dtype: float16 needs a CUDA GPU; use float32 or bfloat16 on the CPU")
    return requested


# --------------------------------------------------------------------------- input and prompt (pure)


def check_question(question: str, max_chars: int) -> str:
    """The question, stripped; an empty or over-long one is refused with a message saying what to do."""
    question = question.strip()
    if not question:
        raise QatuneError("the question is empty")
    if len(question) > max_chars:
        raise QatuneError(
            f"the question is {len(question):,} characters; the limit is {max_chars:,} "
            "(chat.max_input_chars). Please shorten it."
        )
    return question


def build_messages(question: str, system_prompt: str | None, history: list[dict] | None = None) -> list[dict]:
    """The chat messages the model sees: the training system prompt, recent turns, then the question.

    Reuses `chat.conversation` so the prompt at inference is the one the model was trained on.
    """
    recent = [
        {"role": m["role"], "content": m["content"]}
        for m in (history or [])
        if m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
    ][-2 * HISTORY_TURNS :]
    return conversation({"prompt": [*recent, {"role": "user", "content": question}]}, system_prompt)


def generation_settings(base: GenerateParams, **overrides: Any) -> GenerateParams:
    """`base` with the given overrides (None = keep), validated like params.yaml itself."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    try:
        return GenerateParams.model_validate({**base.model_dump(), **changes})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise QatuneError(f"generation settings: {problems}") from None


def sampling_kwargs(settings: GenerateParams) -> dict[str, Any]:
    """model.generate() arguments; temperature 0 means greedy (transformers rejects 0 with sampling)."""
    kwargs: dict[str, Any] = {"repetition_penalty": settings.repetition_penalty}
    if settings.temperature > 0:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None)
    return kwargs


# --------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    """A model ready to answer, with what generation needs to know about it."""

    model: Any
    tokenizer: Any
    device: str
    dtype: str
    source: str  # "models/merged" or "models/base + models/dpo", for the banner
    template_kwargs: dict = field(default_factory=dict)  # the chat template's variables (Qwen3 thinking)
    backend: str = "transformers"  # or "llama.cpp" (generate.mode: gguf)


def require_model_files(mode: str, model_dir: str | Path, adapter_dir: str | Path) -> None:
    """Fail before importing torch when the pipeline has not produced the model yet."""
    model_dir, adapter_dir = Path(model_dir), Path(adapter_dir)
    if mode == "gguf":
        if not model_dir.is_file():
            raise QatuneError(f"{model_dir}: no GGUF file found; run `dvc repro export` first")
        return
    if not (model_dir / "config.json").is_file():
        stage = "merge" if mode == "merged" else "fetch"
        raise QatuneError(f"{model_dir}: no model found; run `dvc repro {stage}` first")
    if mode == "adapter" and not (adapter_dir / "adapter_config.json").is_file():
        raise QatuneError(f"{adapter_dir}: no LoRA adapter found; run `dvc repro dpo` first")


def is_hub_id(ref: str) -> bool:
    """An owner/name that names nothing here: a path that exists, or whose first folder exists (models/...
    before the pipeline has written it), is a local folder."""
    return bool(HUB_ID.match(ref)) and not Path(ref).exists() and not Path(ref.split("/")[0]).exists()


def local_folder(ref: str, what: str) -> str:
    """`ref` when it is a local path; for a Hub repo id, its snapshot folder in the Hugging Face cache,
    downloaded once by huggingface_hub (which, under HF_HUB_OFFLINE=1, uses the cached snapshot only)."""
    if not is_hub_id(ref):
        return ref
    from huggingface_hub import snapshot_download

    try:
        # what fetch takes of a base: safetensors weights (never pickles), configs, tokenizer, template
        return snapshot_download(ref, allow_patterns=WEIGHT_PATTERNS)
    except Exception as err:  # offline without a cached copy, missing, gated: name the repo and the reason
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise QatuneError(
            f"{what} '{ref}': no such folder here, and no Hub snapshot of it: {type(err).__name__}: {first}"
        ) from None


def free_memory_bytes(device: str) -> int:
    """Free GPU memory on cuda, available RAM (incl. reclaimable cache) on cpu.

    On cuda, blocks PyTorch's caching allocator holds but no tensor uses count as free: it reuses them.
    """
    if device == "cuda":
        import torch

        cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        return int(torch.cuda.mem_get_info()[0] + cached)
    import psutil

    return int(psutil.virtual_memory().available)


def load_model(
    mode: str,
    model_dir: str | Path,
    adapter_dir: str | Path = ADAPTER_DIR,
    device: str = "auto",
    trust_remote_code: bool = False,
    enable_thinking: bool = False,
    dtype: str = "auto",
    source: str | None = None,
) -> Loaded:
    """Load the merged model, or the base model plus the LoRA adapter, on the chosen device.

    Safetensors only. The tokenizer comes from the folder saved with the trained weights (it carries the
    model's own chat template); an adapter folder without one falls back to the base's. Device and dtype
    follow qatune.hardware.placement("serve"), bf16 or fp16 on a GPU, float32 on a CPU, unless `dtype`
    names one (serve_dtype). `source` names the model in the banner (a Hub id rather than its cache path).
    """
    require_model_files(mode, model_dir, adapter_dir)
    if mode == "gguf":
        return load_gguf(Path(model_dir))
    hw = hardware.probe()
    device = hardware.select_device(device, hw.cuda)
    device, auto = hardware.placement("serve", replace(hw, cuda=device == "cuda"))
    dtype = serve_dtype(dtype, device, auto)
    adapters = [("default", adapter_dir)] if mode == "adapter" else []
    model, tokenizer = modeling.load_with_adapters(model_dir, adapters, dtype, device, trust_remote_code)
    source = source or (f"{model_dir} + {adapter_dir}" if mode == "adapter" else str(model_dir))
    kwargs = template_kwargs(tokenizer.chat_template, enable_thinking)
    return Loaded(model, tokenizer, device, dtype, source, kwargs)


def load_gguf(path: Path, n_ctx: int = 4096) -> Loaded:
    """A GGUF file in llama.cpp (generate.mode: gguf), the way llama.cpp, Ollama and LM Studio run it: its own
    tokenizer and the chat template stored in the file."""
    import os

    from qatune.llama_cpp import gguf_quant, llama_cpp_module, stderr_to

    llama_cpp = llama_cpp_module()
    with stderr_to(Path(os.devnull)):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=os.cpu_count(), verbose=False)
    # the file's own chat template, as llama-cpp-python uses it, stopping at every end-of-turn token too
    # (llama.cpp itself stops only at the tokens its vocabulary marks as end of generation)
    llm.chat_handler = None
    formatter = gguf_chat_formatter(llm, stop_token_ids=gguf_stop_tokens(llm).ids)
    if formatter is not None:
        llm.chat_handler = formatter.to_chat_handler()
    quant = gguf_quant(path)
    return Loaded(llm, None, "cpu", f"llama.cpp {quant}", str(path), backend="llama.cpp")


def stream_gguf(loaded: Loaded, messages: list[dict], settings: GenerateParams, on_cap: Any) -> Iterator[str]:
    llm = loaded.model
    prompt_tokens = sum(len(llm.tokenize(m["content"].encode(), add_bos=False)) for m in messages) + 16
    allowed = max(1, min(settings.max_new_tokens, llm.n_ctx() - prompt_tokens))
    if allowed < settings.max_new_tokens and on_cap:
        on_cap(settings.max_new_tokens, allowed)
    strings = tuple(stop_strings(llm.metadata.get("tokenizer.chat_template")))
    chunks = llm.create_chat_completion(
        messages,
        stream=True,
        max_tokens=allowed,
        temperature=settings.temperature,
        top_p=settings.top_p,
        repeat_penalty=settings.repetition_penalty,
        seed=0,
        stop=list(strings),
    )
    pieces = (p for p in (chunk["choices"][0]["delta"].get("content") for chunk in chunks) if p)
    yield from until_stop(pieces, strings) if strings else pieces


# --------------------------------------------------------------------------- generation


def prompt_inputs(loaded: Loaded, messages: list[dict]):
    """Token ids of the chat-templated prompt, on the model's device."""
    text = loaded.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **loaded.template_kwargs
    )
    enc = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return enc.to(loaded.device)


def max_new_tokens_for(loaded: Loaded, requested: int, prompt_tokens: int) -> int:
    """The adaptive cap for this model on this machine right now."""
    import torch

    config = loaded.model.config
    layers, kv_heads, head_dim = kv_geometry(config)
    element = torch.finfo(getattr(torch, loaded.dtype)).bits // 8
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return adaptive_max_new_tokens(
        requested,
        prompt_tokens,
        free_memory_bytes(loaded.device),
        kv_bytes_per_token(layers, kv_heads, head_dim, element),
        getattr(text, "max_position_embeddings", None),
    )


def stream_answer(
    loaded: Loaded, messages: list[dict], settings: GenerateParams, on_cap: Any = None
) -> Iterator[str]:
    """Yield the answer in pieces as it is generated (generate runs in a thread, the streamer feeds us).

    `on_cap(requested, allowed)` is called when free memory lowers max_new_tokens, so callers can say so.
    An exception inside generate() ends the stream and is re-raised here, not lost in the thread. When
    the caller stops early (Gradio's stop button closes the generator), generation stops at the next
    token instead of running on and holding a queue slot.
    """
    if loaded.backend == "llama.cpp":
        yield from stream_gguf(loaded, messages, settings, on_cap)
        return
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    class StopWhenSet(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    inputs = prompt_inputs(loaded, messages)
    allowed = max_new_tokens_for(loaded, settings.max_new_tokens, inputs["input_ids"].shape[1])
    if allowed < settings.max_new_tokens and on_cap:
        on_cap(settings.max_new_tokens, allowed)
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    failure: list[BaseException] = []
    pad_id = loaded.tokenizer.pad_token_id
    pad_id = loaded.tokenizer.eos_token_id if pad_id is None else pad_id
    # the template's end-of-turn token (Gemma's <end_of_turn>, not only its <eos>) ends the answer, and in
    # the plain format the next "User:" line, which is cut from what streams
    stops = stop_tokens(loaded.tokenizer, loaded.model.generation_config, loaded.template_kwargs)
    strings = {"stop_strings": list(stops.strings), "tokenizer": loaded.tokenizer} if stops.strings else {}

    def run() -> None:
        try:
            with torch.inference_mode():
                loaded.model.generate(
                    **inputs,
                    streamer=streamer,
                    max_new_tokens=allowed,
                    eos_token_id=stops.ids,
                    pad_token_id=pad_id,
                    stopping_criteria=StoppingCriteriaList([StopWhenSet()]),
                    **strings,
                    **sampling_kwargs(settings),
                )
        except BaseException as err:  # handed to the caller's thread below
            failure.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        pieces = (piece for piece in streamer if piece)
        yield from until_stop(pieces, stops.strings) if stops.strings else pieces
    finally:
        stop.set()
        thread.join()
    if failure:
        raise failure[0]
