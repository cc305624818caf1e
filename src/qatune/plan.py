"""Memory plan: each model-loading stage's peak memory, predicted from the base model's config.json before
anything loads, and where score and merge run.

    qatune plan                                           # this machine, params.yaml
    qatune plan --profile profiles/seed003-mistral-qlora.yaml --gpu-gb 24

The arithmetic, per stage (GB = 1e9 bytes; a card's "24 GB" is taken as 24e9, a little under its real size):
  weights      parameters (counted from config.json: embeddings, attention, MLP, norms) x bytes per parameter:
               4 in float32, 2 in bf16/fp16; 4-bit nf4 0.5 byte + its constants (8-bit int8: 1 byte) on the
               decoder's linear layers
  adapter      LoRA parameters (r x (in + out) per targeted module and layer) in float32, with their gradient and
               AdamW's two states while training
  activations  what backward keeps per token and layer (only each layer's input under activation checkpointing,
               plus one layer recomputed), or one layer's working set when nothing is trained
  lm head      training's fused heads hold fp32 tiles, never the whole batch x seq x vocab logits; merge's
               check does hold whole logits, in float32
  kv cache     greedy answers of the score stage: batch x (prompt + new tokens) x layers x 2 x kv width
  runtime      on a GPU the CUDA context and cuBLAS workspace (~0.5 GB, outside PyTorch's allocator); on a CPU
               the process itself (~1 GB: Python, torch, transformers, TRL, the tokenizer)
A plan fits when its peak is at most 90% of the device (the allocator's fragmentation takes the rest).
score and merge run on the GPU in the dtype they work in when that fits, else on the CPU in float32
(qatune.hardware.placement); a stage with no place that fits stops in one line before loading anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from qatune import hardware
from qatune.errors import QatuneError
from qatune.hardware import Hardware
from qatune.provenance import BASE_RECORD

GB = 1e9
HEADROOM = 0.9  # share of a device a plan may fill: fragmentation and stray buffers take the rest
CUDA_CONTEXT_GB = 0.5  # CUDA context + cuBLAS workspace, outside torch's allocator (~0.3-0.5 GB)
# A CPU process itself: 0.53 GiB RSS after importing torch, transformers, TRL, peft and datasets (measured
# 2026-12-06), then its tokenizer, data and allocator.
RUNTIME_GB = 1.0
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# nf4: 4 bits per weight + one absmax per 64-weight block: fp32 (4/64 = 0.0625 byte/param) or, with double
# quantisation, 8-bit absmaxes (1/64) plus one fp32 constant per 256 of them (4/(64*256)): ~0.4 bit saved.
NF4_BYTES = 0.5 + 4 / 64
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# LLM.int8: one byte per weight plus a float32 scale per output row (4 / in_features: < 0.005 byte at 896 inputs).
INT8_BYTES = 1.0
# Trainable LoRA parameters: float32 weight, gradient and AdamW's two moments (4+4+8); adamw_8bit keeps the
# moments in one byte each (4+4+2).
LORA_TRAIN_BYTES = {"adamw": 16, "adamw_8bit": 10}
# Fused LM heads: the loss never holds batch x seq x vocab logits, only fp32 tiles of tokens x words (forward and
# backward each): TRL's 4096 x 32768 (trl/kernels/chunked_logprob.py; Unsloth's chunked loss is no larger),
# qatune's 128 tokens x the whole vocabulary (qatune.lm_head.TOKEN_TILE).
HEAD_TILES = {"trl": (4096, 32768), "qatune": (128, None)}
MERGE_CHECK_TOKENS = (
    256  # per merge.check_prompts prompt: the system prompt and a demo question, with room to spare
)


@dataclass(frozen=True)
class Arch:
    """The numbers of a decoder-only model's config.json that decide its size."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool  # the LM head shares the embedding matrix
    qkv_bias: bool = False  # Qwen2: biases on q, k and v
    qk_norm: bool = False  # Qwen3: an RMSNorm over each query and key head


# Public config.json numbers of the seed profiles' bases (huggingface.co/<id>/blob/main/config.json), used when
# the config is not on this machine: `qatune plan --profile ...` before the fetch stage has downloaded it.
# Checked against the published sizes: 134.5M (the exact count fetch records), 596M, 494M, 2.51B, 7.24B, 3.21B.
_SMOLLM2 = Arch(49152, 576, 1536, 30, 9, 3, 64, tied=True)
_QWEN3_06B = Arch(151936, 1024, 3072, 28, 16, 8, 128, tied=True, qk_norm=True)
_QWEN25_05B = Arch(151936, 896, 4864, 24, 14, 2, 64, tied=True, qkv_bias=True)
_GEMMA_2B = Arch(256000, 2048, 16384, 18, 8, 1, 256, tied=True)
_MISTRAL_7B = Arch(32000, 4096, 14336, 32, 32, 8, 128, tied=False)
_LLAMA32_3B = Arch(128256, 3072, 8192, 28, 24, 8, 128, tied=True)
KNOWN: dict[str, Arch] = {
    "bundled:smollm2-135m-instruct": _SMOLLM2,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2,
    "unsloth/Qwen3-0.6B": _QWEN3_06B,
    "Qwen/Qwen3-0.6B": _QWEN3_06B,
    "Qwen/Qwen2.5-0.5B-Instruct": _QWEN25_05B,
    "google/gemma-2b-it": _GEMMA_2B,
    "google/gemma-2b": _GEMMA_2B,
    "mistralai/Mistral-7B-Instruct-v0.1": _MISTRAL_7B,
    "mistralai/Mistral-7B-v0.1": _MISTRAL_7B,
    "unsloth/Llama-3.2-3B-Instruct": _LLAMA32_3B,
    "meta-llama/Llama-3.2-3B-Instruct": _LLAMA32_3B,
}


def arch_from_config(config: dict[str, Any]) -> Arch:
    """An Arch from config.json (its text_config where a multimodal wrapper nests one)."""
    c = config.get("text_config") or config
    heads = c["num_attention_heads"]
    return Arch(
        vocab=c["vocab_size"],
        hidden=c["hidden_size"],
        intermediate=c["intermediate_size"],
        layers=c["num_hidden_layers"],
        heads=heads,
        kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        tied=bool(c.get("tie_word_embeddings", True)),
        qkv_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")),
        qk_norm=c.get("model_type") in ("qwen3", "qwen3_moe"),
    )


def load_arch(model_dir: str | Path | None, source: str | None = None) -> Arch:
    """The base's architecture: the fetched model_dir's config.json (unless its record names another source:
    models/base may hold another profile's base), a local source folder's, else the table above by Hub id."""
    folders = [Path(source)] if source else []
    record = Path(model_dir or "") / BASE_RECORD
    if model_dir and not (
        source and record.is_file() and json.loads(record.read_text(encoding="utf-8"))["source"] != source
    ):
        folders.insert(0, Path(model_dir))
    for config in (folder / "config.json" for folder in folders):
        if config.is_file():
            return arch_from_config(json.loads(config.read_text(encoding="utf-8")))
    if source in KNOWN:
        return KNOWN[source]
    raise QatuneError(
        f"plan: no config.json for '{source or model_dir}' here and no table entry (qatune.plan.KNOWN); "
        "run the fetch stage first (dvc repro fetch)"
    )


def module_shapes(a: Arch) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer in one decoder layer, by peft's target-module name."""
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    return {
        "q_proj": (a.hidden, q),
        "k_proj": (a.hidden, kv),
        "v_proj": (a.hidden, kv),
        "o_proj": (q, a.hidden),
        "gate_proj": (a.hidden, a.intermediate),
        "up_proj": (a.hidden, a.intermediate),
        "down_proj": (a.intermediate, a.hidden),
    }


def linear_parameters(a: Arch) -> int:
    """Weights of the decoder's linear layers: what bitsandbytes quantises (embeddings and head stay 16-bit)."""
    return a.layers * sum(i * o for i, o in module_shapes(a).values())


def parameters(a: Arch) -> int:
    """Every parameter: embeddings (+ an untied head), linear layers, their biases and the RMSNorm scales."""
    bias = a.heads * a.head_dim + 2 * a.kv_heads * a.head_dim if a.qkv_bias else 0
    norms = 2 * a.hidden + (2 * a.head_dim if a.qk_norm else 0)
    embeddings = a.vocab * a.hidden * (1 if a.tied else 2)
    return embeddings + linear_parameters(a) + a.layers * (bias + norms) + a.hidden


def lora_parameters(a: Arch, r: int, targets: list[str] | str) -> int:
    """r x (in + out) per targeted module and layer; all-linear = every linear layer of the decoder."""
    shapes = module_shapes(a)
    names = list(shapes) if targets == "all-linear" else [t for t in targets if t in shapes]
    return a.layers * sum(r * sum(shapes[n]) for n in names)


def adapter_parameters(a: Arch, adapter_dir: str | Path) -> int:
    """LoRA parameters of a saved adapter, from its adapter_config.json (0 where the folder has none)."""
    config = Path(adapter_dir) / "adapter_config.json"
    if not config.is_file():
        return 0
    c = json.loads(config.read_text(encoding="utf-8"))
    targets = c["target_modules"]
    return lora_parameters(a, c["r"], targets if isinstance(targets, str) else list(targets))


def _train_act_per_token(a: Arch) -> int:
    """Elements backward keeps per token and decoder layer: the two norms' inputs and outputs, q, k, v and the
    attention output (memory-efficient attention keeps no seq x seq matrix), and the MLP's gate, up, their
    product and down's input."""
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    return 4 * a.hidden + 2 * q + 2 * kv + 4 * a.intermediate


def _infer_act_per_token(a: Arch) -> int:
    """Elements alive per token inside one layer without gradients: the residual, its norm, gate, up and
    their product (the MLP's peak; attention's is smaller)."""
    return 2 * a.hidden + 3 * a.intermediate


@dataclass(frozen=True)
class StagePlan:
    """Where one stage's model goes and its predicted peak on that device; device "" = nothing fits."""

    stage: str
    device: str
    dtype: str
    need_gb: float
    have_gb: float | None  # the device's memory; None = unknown (RAM when planning for another machine)
    parts: dict[str, float] = field(default_factory=dict)
    advice: str = ""
    batch: int = 0  # score: the batch it runs at (lowered on a GPU until it fits); 0 = not batched

    def line(self) -> str:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.parts.items() if v >= 0.05)
        have = f" of {self.have_gb:.0f} GB" if self.have_gb else ""
        peak = f"~{self.need_gb:.1f} GB{have} ({parts})"
        if not self.device:
            return f"memory plan: {self.stage} does not fit: {peak}; {self.advice}"
        batch = f", batch {self.batch}" if self.batch else ""
        return f"memory plan: {self.stage} on {self.device} in {self.dtype}{batch}, {peak}"

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "line": self.line()}

    def require(self) -> StagePlan:
        """The plan, printed; a one-line error before anything loads when nothing fits."""
        if not self.device:
            raise QatuneError(self.line())
        print(self.line(), flush=True)
        return self


def fits(need_gb: float, have_gb: float | None) -> bool:
    return have_gb is None or need_gb <= HEADROOM * have_gb


def _total(parts: dict[str, float]) -> float:
    return round(sum(parts.values()), 2)


def _runtime(cuda: bool) -> float:
    return CUDA_CONTEXT_GB if cuda else RUNTIME_GB


def _gb(n: float) -> float:
    return round(n / GB, 3)


def training(stage: str, a: Arch, train, cfg, hw: Hardware, ref_adapter: bool = False) -> StagePlan:
    """sft or dpo (cfg: its params block) on the resolved machine `hw` (hardware.resolve plus gpu_gb and
    ram_gb). DPO puts chosen and rejected in one forward pass (twice the batch); its reference is the policy
    with the adapter off, or log-probs precomputed before training, so it costs no weights, only, when DPO
    continues an SFT adapter, TRL's frozen `ref` copy of that adapter (ref_adapter)."""
    cuda, half = hw.cuda, hw.precision in ("bf16", "fp16")
    n = parameters(a)
    if train.load_in_4bit or train.load_in_8bit:  # peft upcasts what is not quantised to float32
        q = linear_parameters(a)
        per = NF4_DOUBLE_QUANT_BYTES if train.bnb_4bit_use_double_quant else NF4_BYTES
        per = per if train.load_in_4bit else INT8_BYTES
        weights = q * per + (n - q) * (2 if hw.backend == "unsloth" else 4)
    else:
        weights = n * (2 if cuda and half else 4)  # hardware.training_dtype: CPU weights stay float32
    lora = lora_parameters(a, train.lora.r, train.lora.target_modules)
    adapter = (
        lora * LORA_TRAIN_BYTES["adamw_8bit" if "8bit" in cfg.optim else "adamw"] + ref_adapter * lora * 4
    )
    shards = train.num_processes if train.distributed == "fsdp" else 1
    tokens = cfg.batch_size * (2 if stage == "dpo" else 1) * cfg.max_length
    act = 2 if cuda and half else 4  # autocast on a CPU leaves the norms and residuals in float32
    full = tokens * _train_act_per_token(a) * act
    if train.activation_checkpointing:
        kept = round(a.layers * hw.checkpoint_layers)
        activations = kept * tokens * a.hidden * act + (a.layers - kept) * full + full  # + one recomputed
    else:
        activations = a.layers * full
    rows, words = HEAD_TILES[hw.lm_head]
    head = min(tokens, rows) * min(a.vocab, words or a.vocab) * 4 * 2 + tokens * a.hidden * 4
    parts = {
        "weights": _gb(weights / shards),
        "adapter": _gb(adapter / shards),
        "activations": _gb(activations),
        "lm head": _gb(head),
        "runtime": _runtime(cuda),
    }
    device, have = ("cuda", hw.gpu_gb) if cuda else ("cpu", hw.ram_gb)
    dtype = hardware.training_dtype(hw.precision) if cuda else "float32"
    dtype = "nf4" if train.load_in_4bit else "int8" if train.load_in_8bit else dtype
    need = _total(parts)
    advice = f"lower {stage}.batch_size or {stage}.max_length, turn on train.activation_checkpointing" + (
        "" if train.load_in_4bit else " or train.load_in_4bit"
    )
    return StagePlan(stage, device if fits(need, have) else "", dtype, need, have, parts, advice)


def _placed(purpose: str, hw: Hardware, work: str, parts, advice: str, batch: int = 0) -> StagePlan:
    """Score or merge where hardware.placement puts it: on the GPU in `work`, at the largest batch of batch,
    batch/2, ..., 1 that fits the card (score's rows are independent: the batch changes no number that
    matters), else on the CPU at the full batch; `parts(device, dtype, batch)` is the peak there. Marked as
    not fitting when the CPU's RAM is short too."""
    batches = [batch >> i for i in range(batch.bit_length())] or [0]
    for fits_gpu in (True, False):
        device, dtype = hardware.placement(purpose, hw, work, fits_gpu)
        have = hw.gpu_gb if device == "cuda" else hw.ram_gb
        for b in batches if device == "cuda" else batches[:1]:
            need = parts(device, dtype, b)
            if fits(_total(need), have):
                return StagePlan(purpose, device, dtype, _total(need), have, need, batch=b)
    return StagePlan(purpose, "", dtype, _total(need), have, need, advice, batch)


def score(
    a: Arch,
    hw: Hardware,
    precision: str,
    batch_size: int,
    max_length: int,
    adapter_params: int = 0,
    generate: tuple[int, int] | None = None,
) -> StagePlan:
    """The score stage: likelihoods of batch_size x max_length-token rows, then (generate = (prompt tokens,
    new tokens)) greedy answers. On the GPU the model loads straight in the dtype it scores in
    (hardware.score_dtype: bf16 where the card has it, float32 when asked or on fp16-only cards); on a CPU
    it loads in float32, merges the adapter, then casts, as it always has."""

    def parts(device: str, load: str, batch: int) -> dict[str, float]:
        view = replace(hw, cuda=device == "cuda")
        run = hardware.score_dtype(precision, view)
        answer = hardware.placement("generate", view)[1]
        kv = 0
        if generate:
            kv = batch * sum(generate) * a.layers * 2 * a.kv_heads * a.head_dim * BYTES[answer]
        activations = batch * max_length * (_infer_act_per_token(a) + a.hidden) * BYTES[run]
        return {
            "weights": _gb(parameters(a) * max(BYTES[load], BYTES[run], BYTES[answer])),
            "adapter": _gb(adapter_params * 4),
            "activations": _gb(max(activations, kv)),
            "runtime": _runtime(device == "cuda"),
        }

    work = hardware.score_dtype(precision, hw)
    advice = "lower evaluate.batch_size or clean.max_length, or score on a machine with more RAM"
    return _placed("score", hw, work, parts, advice, batch_size)


def merge(a: Arch, hw: Hardware, dtype: str, adapter_params: int, check_prompts: int) -> StagePlan:
    """The merge stage: the base in `dtype` (merge.dtype: the dtype it is saved in, so the GPU never holds a
    float32 copy of a 16-bit model), never 4-bit whatever the adapter trained on, the adapter merged in
    place, the reloaded copy only after the first is freed; the logits check holds the adapter model's and
    the merged model's logits in float32. On a CPU it merges in float32 and casts, as it always has."""
    tokens = check_prompts * MERGE_CHECK_TOKENS

    def parts(device: str, load: str, batch: int) -> dict[str, float]:
        return {
            "weights": _gb(parameters(a) * BYTES[load]),
            "adapter": _gb(adapter_params * 4),
            "activations": _gb(tokens * _infer_act_per_token(a) * BYTES[load]),
            "logits": _gb(tokens * a.vocab * (BYTES[load] + 4 + 4)),
            "runtime": _runtime(device == "cuda"),
        }

    return _placed("merge", hw, dtype, parts, "merge on a machine with more RAM or set merge.dtype: bfloat16")


def export(a: Arch, hw: Hardware, check_prompts: int, new_tokens: int) -> StagePlan:
    """The export stage's reference answers: the merged model in float32 on the CPU (stages/export.py)."""
    tokens = MERGE_CHECK_TOKENS + new_tokens  # one prompt at a time, its whole logits in float32 twice

    parts = {
        "weights": _gb(parameters(a) * 4),
        "activations": _gb(tokens * (_infer_act_per_token(a) * 4 + a.vocab * 8)),
        "runtime": RUNTIME_GB,
    }
    need, have = _total(parts), hw.ram_gb
    ok = fits(need, have)
    return StagePlan(
        "export", "cpu" if ok else "", "float32", need, have, parts, "" if ok else "needs more RAM"
    )


def device_memory() -> tuple[float | None, float | None]:
    """(GPU memory, RAM) of this machine in GB; None where there is no GPU."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    import torch

    gpu = torch.cuda.get_device_properties(0).total_memory / GB if torch.cuda.is_available() else None
    return gpu, round(ram, 1)


def machine(hw: Hardware) -> Hardware:
    """hardware.probe()/resolve() plus this machine's GPU memory and RAM."""
    gpu, ram = device_memory()
    return replace(hw, gpu_gb=gpu, ram_gb=ram)


def card(gpu_gb: float, bf16: bool = True, ram_gb: float | None = None) -> Hardware:
    """A machine with one CUDA card of gpu_gb GB (bf16 on Ampere and newer), to plan for. It trains on the
    transformers backend: under 4-bit, peft keeps embeddings and head in float32 where Unsloth keeps 16-bit,
    so the plan is the larger of the two."""
    return Hardware(cuda=True, cuda_bf16=bf16, cpu_bf16=False, gpu_gb=gpu_gb, ram_gb=ram_gb, unsloth=False)


def whole_run(
    a: Arch, hw: Hardware, train, sft, dpo, clean, evaluate, merge_cfg, export_cfg
) -> list[StagePlan]:
    """Every model-loading stage of a run, in pipeline order, from the params blocks (`qatune plan`)."""
    plans = []
    try:
        resolved = hardware.choose(train, hw)
    except QatuneError as err:
        resolved, plans = None, [StagePlan(s, "", "", 0.0, None, {}, str(err)) for s in ("sft", "dpo")]
    if resolved is not None:
        if sft.enabled:
            plans.append(training("sft", a, train, sft, resolved))
        if dpo.enabled:
            plans.append(training("dpo", a, train, dpo, resolved, ref_adapter=sft.enabled))
    lora = lora_parameters(a, train.lora.r, train.lora.target_modules)
    prompt = (clean.max_prompt_length, evaluate.max_new_tokens)
    plans.append(score(a, hw, evaluate.score_precision, evaluate.batch_size, clean.max_length, lora, prompt))
    plans.append(merge(a, hw, merge_cfg.dtype, lora, merge_cfg.check_prompts))
    if export_cfg.enabled:
        plans.append(export(a, hw, export_cfg.check_prompts, export_cfg.check_new_tokens))
    return plans


STAGES = ("sft", "dpo", "score", "merge", "export")


def cell(p: StagePlan | None) -> str:
    """One stage in a table: `cuda bf16 16.1` (GB; score adds its batch), `STOP 31.2` where nothing fits,
    `-` where it does not run."""
    if p is None:
        return "-"
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(p.dtype, p.dtype)
    batch = f" (batch {p.batch})" if p.batch else ""
    return f"{p.device} {short} {p.need_gb:.1f}{batch}" if p.device else f"STOP {p.need_gb:.1f}"


def table(rows: list[tuple[str, str, list[StagePlan]]]) -> str:
    """A markdown table: one row per (profile, machine), each stage's device, dtype and peak GB."""
    lines = ["| profile | machine | " + " | ".join(STAGES) + " |", "|---" * (2 + len(STAGES)) + "|"]
    for profile, where, plans in rows:
        by_stage = {p.stage: p for p in plans}
        lines.append(f"| {profile} | {where} | " + " | ".join(cell(by_stage.get(s)) for s in STAGES) + " |")
    return "\n".join(lines)
