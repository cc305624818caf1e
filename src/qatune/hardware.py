"""What this machine can do and the choices made from it: device, precision, training backend, the
fused LM head, and the dtype models load in. The choices are small pure functions (unit-tested as tables);
`probe()` reads the machine, `choose()` applies the choices the `train` params block asks for to a machine
(this one, or a card `qatune plan` only describes) and `resolve()` does both; each gives a `Hardware`. `peak_memory_gb()` reads what the machine gave this process: its peak RAM and GPU memory, which
stages record in their metrics.

CUDA-only paths (Unsloth, 4-bit and 8-bit bitsandbytes) are only ever selected, and imported, when CUDA is present.
"""

from __future__ import annotations

import importlib.util
import os
import resource
from dataclasses import dataclass, replace
from pathlib import Path

from qatune.errors import QatuneError

CPUINFO = Path("/proc/cpuinfo")  # where cpu_has_bf16 reads the CPU's flags


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """A machine (probe(), or one only described: qatune.plan.card()) and, once choose() has applied the
    `train` block to it, the training choices made for it. What the machine can do must be said; the
    other fields left out mean unknown, or nothing chosen."""

    cuda: bool  # a CUDA GPU is visible to torch (for a described machine: it has one)
    cuda_bf16: bool  # that GPU has bf16 in hardware, compute capability 8.0 or newer (cuda_has_bf16)
    cpu_bf16: bool  # the CPU has AVX512-BF16 or AMX, so bf16 is fast on it (cpu_has_bf16)
    device: str = ""  # the GPU's name (torch.cuda.get_device_name) or "cpu"; "" where only described
    threads: int | None = None  # torch's intra-op threads (torch.get_num_threads); None where only described
    backend: str | None = None  # the training backend, "transformers" or "unsloth"; None until resolved
    precision: str | None = None  # the training precision, "fp32", "bf16" or "fp16"; None until resolved
    lm_head: str | None = None  # the fused LM head that trains, "qatune" or "trl"; None until resolved
    checkpoint_layers: float | None = None  # share of decoder layers checkpointed; None until resolved
    gpu_gb: float | None = None  # GPU memory in GB (qatune.plan.machine); None: no GPU, or no limit known
    ram_gb: float | None = None  # RAM in GB (qatune.plan.machine); None: no limit known
    unsloth: bool | None = None  # whether the unsloth backend may be chosen; None: look for it when choosing


def select_backend(requested: str, cuda_available: bool, unsloth_importable: bool) -> str:
    """auto -> unsloth only with CUDA and an importable unsloth; otherwise transformers + peft."""
    if requested == "transformers":
        return "transformers"
    if requested == "unsloth":
        if not cuda_available:
            raise QatuneError(
                "train.backend: unsloth needs a CUDA GPU (none found); use auto or transformers"
            )
        if not unsloth_importable:
            raise QatuneError(
                "train.backend: unsloth is not installed; pip install '.[cuda]' or use the CUDA image"
            )
        return "unsloth"
    if requested != "auto":
        raise QatuneError(f"train.backend: unknown backend '{requested}' (auto, transformers, unsloth)")
    return "unsloth" if cuda_available and unsloth_importable else "transformers"


def select_precision(requested: str, cuda_available: bool, cuda_bf16: bool, cpu_bf16: bool) -> str:
    """fp32 | bf16 | fp16. auto: bf16 where the hardware has it, fp16 on older GPUs, else fp32."""
    if requested == "auto":
        if cuda_available:
            return "bf16" if cuda_bf16 else "fp16"
        return "bf16" if cpu_bf16 else "fp32"
    if requested == "fp16" and not cuda_available:
        raise QatuneError("train.precision: fp16 mixed precision needs a CUDA GPU; use fp32 or bf16 on CPU")
    if requested == "bf16" and cuda_available and not cuda_bf16:
        raise QatuneError("train.precision: this GPU has no bf16; use fp16 or auto")
    return requested


def select_lm_head(requested: str, cuda: bool, backend: str) -> str:
    """Which fused LM head trains: "qatune" (qatune.lm_head) or "trl" (TRL's own).

    auto: qatune's on CPU; on CUDA TRL's Triton kernel already scores only the answer tokens, and Unsloth
    brings its own fused loss, so they are left alone.
    """
    if requested not in ("auto", "qatune", "trl"):
        raise QatuneError(f"train.lm_head: unknown value '{requested}' (auto, qatune, trl)")
    if requested == "qatune" and backend == "unsloth":
        raise QatuneError(
            "train.lm_head: qatune's head does not apply to the unsloth backend; use auto or trl"
        )
    if requested == "auto":
        return "trl" if cuda or backend == "unsloth" else "qatune"
    return requested


def check_quantization(load_in_4bit: bool, cuda_available: bool, load_in_8bit: bool = False) -> None:
    if load_in_4bit and not cuda_available:
        raise QatuneError(
            "train.load_in_4bit: 4-bit (QLoRA) loading needs a CUDA GPU and bitsandbytes; "
            "set train.load_in_4bit: false to train in full precision on CPU"
        )
    if load_in_8bit and not cuda_available:
        raise QatuneError(
            "train.load_in_8bit: 8-bit (bitsandbytes LLM.int8) loading needs a CUDA GPU and bitsandbytes; "
            "set train.load_in_8bit: false to train in full precision on CPU"
        )


def select_device(requested: str, cuda_available: bool) -> str:
    """auto -> cuda when a GPU is visible, else cpu; an explicit cuda without a GPU is an error."""
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    if requested == "cuda" and not cuda_available:
        raise QatuneError("--device cuda: no CUDA GPU is visible; use --device auto or cpu")
    if requested not in ("cpu", "cuda"):
        raise QatuneError(f"--device: unknown device '{requested}' (auto, cpu, cuda)")
    return requested


# Where a model goes and in which dtype, by what it is loaded for (tests/unit/test_hardware.py has the table):
#   purpose    CPU          CPU with bf16   CUDA with bf16   CUDA fp16 only (T4)
#   score      cpu fp32     cpu fp32        cuda W           cuda W           (W: the dtype it works in,
#   merge      cpu fp32     cpu fp32        cuda W           cuda W            cpu fp32 if W does not fit)
#   generate   cpu fp32     cpu bf16        cuda bf16        cuda fp16
#   serve      cpu fp32     cpu fp32        cuda bf16        cuda fp16
# On a CPU scoring and merging load float32 and cast afterwards: score to score_dtype (bf16 on CPUs fast at it
# with `evaluate.score_precision: auto`, the default; float32 with fp32), merge to merge.dtype, whose check
# compares logits to 1e-3.
# On a GPU a 7B model in float32 is 29 GB, so they load straight in the dtype they work in (score_dtype,
# merge.dtype) when qatune.plan finds that it fits the card, else on the CPU. Greedy answers for the report
# run in bf16 where it is fast (about twice float32's tokens/s on AMX/AVX512-BF16 CPUs); interactive chat on
# a CPU keeps float32, and on GPUs half precision halves the memory.
PURPOSES = ("score", "merge", "generate", "serve")


def placement(purpose: str, hw: Hardware, work: str = "float32", fits_gpu=True) -> tuple[str, str]:
    """(device, dtype name) for a model loaded for `purpose` on the machine `hw` (probe()). Score and merge
    take the dtype they work in (`work`) and whether qatune.plan found that it fits the GPU."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r} (one of {PURPOSES})")
    if purpose in ("score", "merge"):
        return ("cuda", work) if hw.cuda and fits_gpu else ("cpu", "float32")
    if hw.cuda:
        return "cuda", "bfloat16" if hw.cuda_bf16 else "float16"
    return "cpu", "bfloat16" if purpose == "generate" and hw.cpu_bf16 else "float32"


def score_dtype(requested: str, hw: Hardware) -> str:
    """The dtype the score stage computes likelihoods in (`evaluate.score_precision`): float32, or for
    `auto` bfloat16 where the device is fast at it (a bf16 GPU, an AVX512-BF16/AMX CPU). Never fp16: its
    range is too narrow for summed log-probabilities. The model loads and merges its adapter in float32
    first (placement("score")), so only the forward passes round."""
    if requested == "fp32":
        return "float32"
    if requested != "auto":
        raise QatuneError(f"evaluate.score_precision: unknown value '{requested}' (auto, fp32)")
    fast = hw.cuda_bf16 if hw.cuda else hw.cpu_bf16
    return "bfloat16" if fast else "float32"


def training_dtype(precision: str) -> str:
    """The dtype a base model loads in on CUDA for training: that of the mixed precision (bf16, fp16), so a
    T4 never gets bf16 weights; float32 for fp32 training."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 autocast is fast; without it, it is slower than fp32."""
    try:
        flags = CPUINFO.read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def unsloth_importable() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def cuda_has_bf16(capability: tuple[int, int]) -> bool:
    """bf16 in hardware: Ampere (compute capability 8.0) and newer. torch 2.14's is_bf16_supported() also says
    True on Turing and Volta (T4, V100, RTX 20xx) because it counts emulation, which is slow there, and
    Unsloth, deciding from the capability, then refuses bf16 on the float16 model it loaded."""
    return capability >= (8, 0)


def probe() -> Hardware:
    """What this machine has: CUDA (and bf16 on it), bf16 on the CPU, the device name, torch threads."""
    import torch

    cuda = torch.cuda.is_available()
    return Hardware(
        cuda=cuda,
        cuda_bf16=bool(cuda and cuda_has_bf16(tuple(torch.cuda.get_device_capability(0)))),
        cpu_bf16=cpu_has_bf16(),
        device=torch.cuda.get_device_name(0) if cuda else "cpu",
        threads=torch.get_num_threads(),
    )


# train.checkpoint_layers: auto on a CPU training in bf16. Measured in the sft stage (30 steps, 2-core
# AVX512-BF16, bench/RESULTS.md 8): every layer 169 tok/s at 2.84 GB peak RSS, 8 of 30 layers 231 tok/s at
# 3.67 GB, none 245 tok/s at 4.07 GB. fp32 activations take twice the memory, so fp32 keeps every layer.
CPU_BF16_CHECKPOINT_SHARE = 0.25


def select_checkpoint_layers(requested: float | str, precision: str, cuda: bool) -> float:
    """The share of decoder layers checkpointed when train.activation_checkpointing is on. `auto`: a
    quarter on a CPU training in bf16 (faster for the memory it has to spare), every layer elsewhere: in
    fp32 the same share would pass 4 GB, and on a GPU memory is the constraint checkpointing is for."""
    if requested != "auto":
        return float(requested)
    return CPU_BF16_CHECKPOINT_SHARE if not cuda and precision == "bf16" else 1.0


def check_cuda_required(require_cuda: bool, cuda_available: bool) -> None:
    """A GPU profile (`train.require_cuda`) stops here rather than train for days on the CPU: a CUDA 13 image on
    an older driver or an unsupported card sees no GPU, and every non-4-bit choice would fall back silently."""
    if require_cuda and not cuda_available:
        raise QatuneError(
            "train.require_cuda: this profile trains on a CUDA GPU and torch sees none (check nvidia-smi, "
            "the driver (CUDA 13 needs >= 580) and the container's GPU flags); set it false to train on the CPU"
        )


def one_gpu_visible(visible: str | None, gpu_count: int) -> str | None:
    """The CUDA_VISIBLE_DEVICES that leaves one process one GPU, or None when it already has at most one.

    Trainer wraps a model in nn.DataParallel when one process sees several GPUs, and TRL 1.15/1.16 refuse
    that (`args.n_gpu > 1`), so a single process gets the first GPU it would otherwise see. `visible` is
    the current CUDA_VISIBLE_DEVICES (indices, UUIDs or MIG ids), `gpu_count` the GPUs seen without it."""
    if visible is not None:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        return entries[0] if len(entries) > 1 else None
    return "0" if gpu_count > 1 else None


def nvml_gpu_count() -> int:
    """GPUs on this machine, counted through NVML, which does not start CUDA: CUDA reads
    CUDA_VISIBLE_DEVICES once, when it starts, so it must still be unstarted when that is set."""
    import torch

    count = getattr(torch.cuda, "_device_count_nvml", lambda: -1)()  # -1: no NVML (no driver)
    return max(count, 0)


def pin_one_gpu(num_processes: int) -> None:
    """One training process on a machine with several GPUs trains on the first (see one_gpu_visible);
    processes that torchrun or accelerate started (WORLD_SIZE) keep their own GPU each."""
    if num_processes > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    pinned = one_gpu_visible(visible, 0 if visible is not None else nvml_gpu_count())
    if pinned is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = pinned
        print(
            f"qatune: train.num_processes is 1: training on GPU {pinned} only "
            "(set train.num_processes to the number of GPUs to train on all of them)",
            flush=True,
        )


def choose(train, hw: Hardware) -> Hardware:
    """The choices the `train` block asks for on the machine `hw`: backend, precision, LM head, the share of
    checkpointed layers. One rule for the machine a stage runs on (resolve) and for a card `qatune plan`
    only describes (hw.unsloth says whether Unsloth may be chosen there; None: look for it here)."""
    check_quantization(train.load_in_4bit, hw.cuda, train.load_in_8bit)
    unsloth = hw.unsloth if hw.unsloth is not None else hw.cuda and unsloth_importable()
    backend = select_backend(train.backend, hw.cuda, unsloth)
    precision = select_precision(train.precision, hw.cuda, hw.cuda_bf16, hw.cpu_bf16)
    head = select_lm_head(train.lm_head, hw.cuda, backend)
    share = select_checkpoint_layers(train.checkpoint_layers, precision, hw.cuda)
    return replace(hw, backend=backend, precision=precision, lm_head=head, checkpoint_layers=share)


def resolve(train) -> Hardware:
    """This machine and the choices the `train` block asks for on it (choose). A single process is pinned
    to one GPU first, before anything starts CUDA."""
    pin_one_gpu(train.num_processes)
    hw = probe()
    check_cuda_required(train.require_cuda, hw.cuda)
    return choose(train, hw)


def fsdp_launched() -> bool:
    """True in a process accelerate launch started with FSDP (it sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def peak_memory_gb() -> dict[str, float]:
    """Peak CPU RSS of this process and, on a GPU, the CUDA peak reserved memory with its share of the
    device's memory (what seed 004's notebook prints after training)."""
    import torch

    out = {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)}
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(device).total_memory
        out.update(cuda_memory(torch.cuda.max_memory_reserved(device), total))
    return out


def cuda_memory(peak_reserved_bytes: int, device_total_bytes: int) -> dict[str, float]:
    """Peak reserved GPU memory, the device's total, and the peak as a percentage of it."""
    return {
        "peak_cuda_reserved_gb": round(peak_reserved_bytes / 1024**3, 3),
        "cuda_device_memory_gb": round(device_total_bytes / 1024**3, 3),
        "peak_cuda_reserved_pct": round(100 * peak_reserved_bytes / device_total_bytes, 3),
    }
