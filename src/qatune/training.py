"""What the sft and dpo stages share around TRL's trainers: the command line both take, the TrainingArguments
both pass, callbacks, resumable checkpoints and their fingerprint, the run itself (evaluate, train or take over
a finished run, evaluate), the torchrun / accelerate launch relaunch, logging integrations, and the metrics,
curves and provenance both write when a run ends.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qatune import compat, lm_head
from qatune.errors import QatuneError
from qatune.hardware import Hardware, fsdp_launched, peak_memory_gb
from qatune.io import write_json
from qatune.provenance import BASE_RECORD, code_digest, git_commit, sha256_files, write_provenance

FINGERPRINT = "qatune_fingerprint.txt"


# --------------------------------------------------------------------------- command line


def stage_parser(doc: str, stage: str) -> argparse.ArgumentParser:
    """The arguments both training stages take, each defaulting to the path dvc.yaml passes for `stage`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file to read")
    parser.add_argument("--model", default="models/base", help="base model folder from fetch")
    parser.add_argument("--data", default="data/split", help="folder with train/val/test jsonl")
    parser.add_argument("--out", default=f"models/{stage}", help="adapter output folder")
    parser.add_argument("--checkpoints", default=f"models/{stage}-checkpoints", help="resumable checkpoints")
    parser.add_argument("--metrics", default=f"metrics/{stage}.json", help="summary metrics file")
    parser.add_argument("--plots", default=f"metrics/{stage}", help="folder for per-step curves")
    return parser


# --------------------------------------------------------------------------- trainer arguments


def rows_per_run(cfg) -> int:
    """The rows a run of `cfg.max_steps` optimizer steps (> 0) draws over all its processes."""
    return cfg.max_steps * cfg.batch_size * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))


def warmup(cfg) -> float:
    """transformers 5 takes one `warmup_steps`: an int is steps, a float below 1 a ratio of all steps."""
    return int(cfg.warmup_steps) if cfg.warmup_steps > 0 else float(cfg.warmup_ratio)


def report_to(requested: list[str]) -> list[str]:
    """Logging integrations; wandb is offline unless WANDB_API_KEY is set (and then never logs the key)."""
    out = []
    for name in requested:
        if name == "wandb":
            if os.environ.get("WANDB_MODE") == "disabled":
                continue
            os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
        out.append(name)
    return out or ["none"]


def trainer_args(train, cfg, hw: Hardware, seed: int, output_dir: str) -> dict[str, Any]:
    """The TrainingArguments both stages pass: hardware, seeds, logging, and every optimiser, schedule,
    evaluation and checkpoint value of the method's params block (`sft` or `dpo`, both OptimParams)."""
    args: dict[str, Any] = {
        "output_dir": output_dir,
        "seed": seed,
        "data_seed": seed,
        "bf16": hw.precision == "bf16",
        "fp16": hw.precision == "fp16",
        "report_to": report_to(train.report_to),
        compat.checkpointing_key(compat.training_fields()): train.activation_checkpointing,
        "save_only_model": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
        "learning_rate": cfg.learning_rate,
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.eval_batch_size or cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "warmup_steps": warmup(cfg),
        "lr_scheduler_type": cfg.scheduler,
        "weight_decay": cfg.weight_decay,
        "optim": cfg.optim,
        "max_grad_norm": cfg.max_grad_norm,
        "logging_steps": cfg.logging_steps,
        "eval_strategy": "steps",
        "eval_steps": cfg.eval_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "load_best_model_at_end": cfg.load_best_model_at_end,
        "metric_for_best_model": "eval_loss",
        "greater_is_better": False,
        "max_length": cfg.max_length,
    }
    if "tensorboard" in args["report_to"]:
        # TensorBoard's callback takes its folder from here; otherwise the first evaluate() before training
        # opens a writer in ./runs of the project (outside every DVC output) and the whole run logs there.
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(Path(output_dir) / "runs"))
    if not hw.cuda:
        args["use_cpu"] = True
    args.update(distributed_args(train.distributed, hw.cuda, int(os.environ.get("WORLD_SIZE", "1"))))
    return args


# TRL's FSDP2 preset (trl/accelerate_configs/fsdp2.yaml) as TrainingArguments: every decoder layer its own
# shard unit, parameters resharded after the forward pass, weights loaded once on rank 0 and broadcast.
FSDP_CONFIG = {
    "fsdp_version": 2,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "reshard_after_forward": True,
    "cpu_ram_efficient_loading": True,
    "state_dict_type": "FULL_STATE_DICT",
    "activation_checkpointing": False,  # the Trainer's own activation checkpointing applies instead
}


def distributed_args(strategy: str, cuda: bool, world_size: int) -> dict[str, Any]:
    """TrainingArguments for several processes: DDP (gloo on CPU, NCCL on GPUs) or FSDP2 (GPUs only).

    accelerate 1.15 turns FSDP on only for multi-GPU runs (AcceleratorState keeps DistributedType.MULTI_CPU
    for CPU processes and never switches it to FSDP), so on CPU a silent DDP run is refused instead.
    """
    if world_size <= 1:
        return {}
    if strategy == "fsdp":
        if not cuda:
            raise QatuneError(
                "train.distributed: fsdp needs CUDA GPUs (accelerate shards only across GPUs); use ddp on CPU"
            )
        return {"fsdp": "full_shard auto_wrap", "fsdp_config": dict(FSDP_CONFIG)}
    return {"ddp_backend": "nccl" if cuda else "gloo", "ddp_find_unused_parameters": False}


def callbacks(train, cfg, block: str, hw: Hardware) -> list:
    """Partial activation checkpointing when the share of checkpointed layers (`train.checkpoint_layers`,
    resolved in hw by qatune.hardware) is below 1, and early stopping when `<block>.early_stopping_patience`
    > 0 (it needs the best checkpoint kept)."""
    out: list = []
    share = hw.checkpoint_layers
    if train.activation_checkpointing and share < 1:
        if hw.backend == "unsloth":  # said, not refused: a profile may keep the CPU-tuned share
            print(
                f"train.checkpoint_layers: {share} does not apply to the unsloth backend, "
                "which checkpoints every layer its own way",
                flush=True,
            )
        else:
            out.append(partial_checkpointing(share))
    if cfg.early_stopping_patience:  # with load_best_model_at_end: qatune.params checks it before any work
        from transformers import EarlyStoppingCallback

        out.append(EarlyStoppingCallback(cfg.early_stopping_patience))
    return out


def checkpointed_layers(count: int, share: float) -> list[int]:
    """Which of `count` decoder layers recompute their activations: round(share x count) of them (at least
    one), evenly spaced from the first."""
    keep = min(count, max(1, round(share * count)))
    return sorted({i * count // keep for i in range(keep)})


def partial_checkpointing(share: float):
    """A callback that, once the Trainer has turned activation checkpointing on for every decoder layer,
    leaves it on for an evenly spaced `share` of them. The other layers keep their activations: each one
    skips the second forward pass in the backward pass, for the memory of its activations."""
    from transformers import TrainerCallback
    from transformers.modeling_layers import GradientCheckpointingLayer

    class PartialCheckpointing(TrainerCallback):
        def __init__(self):
            self.layers: list[int] = []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
            if not any(layer.gradient_checkpointing for layer in layers):
                return  # checkpointing is off, or the model has its own (not transformers' layers)
            self.layers = checkpointed_layers(len(layers), share)
            keep = set(self.layers)
            for i, layer in enumerate(layers):
                layer.gradient_checkpointing = i in keep
            print(f"activation checkpointing: {len(keep)} of {len(layers)} layers", flush=True)

    return PartialCheckpointing()


def build_trainer(
    trainer_class, config, model, tokenizer, peft_config, sets: dict, block: str, train, cfg, hw, **extra
):
    """A TRL trainer as the sft and dpo stages build it: their train and val sets, the stage's callbacks, this
    machine's LM head patched in while TRL builds it (lm_head.in_trl_trainers), and the LoRA weights kept in
    float32 after it (TRL casts a quantised model's LoRA weights to bf16)."""
    with lm_head.in_trl_trainers(hw.lm_head):
        trainer = trainer_class(
            model=model,
            args=config,
            train_dataset=sets["train"],
            eval_dataset=sets["val"],
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks(train, cfg, block, hw),
            **extra,
        )
    trainable_to_float32(trainer.model)
    return trainer


def trainable_to_float32(model) -> int:
    """Cast every trainable parameter to float32; returns how many were not.

    TRL 1.15 and 1.16 cast the LoRA weights of a quantised model to bf16 in the SFT, DPO and KTO trainers'
    __init__ (trl/trainer/sft_trainer.py 877-880 in 1.15), whatever the precision: with fp16 the GradScaler
    then fails at the first step (no bf16 unscale kernel), and under bf16 updates of lr x grad below bf16's
    step at the weight (~6e-5 at 0.01) are lost. Mixed precision keeps the trainable weights in float32 and
    computes in 16 bits. Call it after the trainer is built and before train() creates the optimiser."""
    import torch

    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


# --------------------------------------------------------------------------- checkpoints and resume


def fingerprint(params_blocks: dict[str, Any], *inputs: str) -> str:
    """What a run's checkpoints belong to: the params blocks the stage reads, its input digests, the code.

    Editing a key no training stage reads (domain.tags, chat.port) leaves the checkpoints usable.
    """
    return json.dumps({"params": params_blocks, "inputs": inputs, "code": code_digest()}, sort_keys=True)


@dataclass(frozen=True)
class RunInputs:
    """What a training run is made of besides the code: the params blocks its stage reads, the base model's
    record (fetch's qatune_base.json), one digest of the split files, and any other input's digest (dpo: the
    SFT adapter's). The checkpoints' fingerprint names them all; the adapter's provenance records them."""

    blocks: dict[str, Any]
    base_model: dict[str, Any]
    data_sha256: str
    more: tuple[str, ...] = ()

    @classmethod
    def read(cls, blocks: dict[str, Any], model_dir: Path, data: Path, *more: str) -> RunInputs:
        base = json.loads((model_dir / BASE_RECORD).read_text())
        return cls(blocks, base, sha256_files([data / f"{s}.jsonl" for s in ("train", "val", "test")]), more)

    def fingerprint(self) -> str:
        return fingerprint(
            self.blocks, self.data_sha256, json.dumps(self.base_model, sort_keys=True), *self.more
        )

    def record(self) -> dict[str, Any]:
        """Their entries in the adapter's provenance."""
        return {"params": self.blocks, "base_model": self.base_model, "data_sha256": self.data_sha256}


def world_rank() -> int:
    """This process's rank among all of the run's processes (torchrun and accelerate set RANK); 0 alone."""
    return int(os.environ.get("RANK", "0"))


def prepare_checkpoints(folder: Path, stamp_text: str) -> bool:
    """Keep checkpoints only if they belong to this exact run; True when there is one to resume from.

    Only rank 0 changes the folder (every rank removing and recreating it at once races); the others
    return False here and learn the answer from agreed_resume once the trainer exists."""
    if world_rank() != 0:
        return False
    stamp = folder / FINGERPRINT
    if folder.exists() and (not stamp.is_file() or stamp.read_text().strip() != stamp_text.strip()):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(stamp_text.strip() + "\n")
    complete = False
    for checkpoint in sorted(p for p in folder.glob("checkpoint-*") if p.is_dir()):
        if checkpoint_complete(checkpoint):
            complete = True
        else:  # killed while saving: Trainer would pick it as the latest and fail to load it
            print(f"qatune: {checkpoint}: incomplete checkpoint (killed while saving), removed", flush=True)
            shutil.rmtree(checkpoint)
    return complete


def agreed_resume(trainer, folder: Path, prepared: bool) -> bool:
    """Whether this rank resumes, the same on every rank: all wait until rank 0 has prepared the folder
    (prepare_checkpoints ran before the trainer, whose process group this barrier uses), then the other
    ranks read what it left."""
    trainer.accelerator.wait_for_everyone()
    return prepared if world_rank() == 0 else resume_step(folder) > 0


def checkpoint_complete(checkpoint: Path) -> bool:
    """Trainer writes trainer_state.json last: a checkpoint without a readable one was cut short."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def resume_step(folder: Path) -> int:
    """The step Trainer resumes from: the latest complete checkpoint's, 0 when there is none."""
    steps = [int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if checkpoint_complete(p)]
    return max(steps, default=0)


def run_finished(checkpoint: Path) -> bool:
    """Whether a complete checkpoint is the end of its run: its step reached the run's max_steps (the params'
    max_steps, or the steps `epochs` came to), both as its trainer_state.json records them."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["global_step"] >= state["max_steps"] > 0


def logged_loss(log_history: list[dict], upto_step: int) -> tuple[float, int]:
    """The training losses Trainer logged up to `upto_step`, one per logging interval and rounded by Trainer
    to 4 digits: (their sum weighted by the steps each covers, the last step logged)."""
    total, previous = 0.0, 0
    for entry in log_history:
        if "loss" in entry and entry["step"] <= upto_step:
            total += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    return total, previous


def whole_run_loss(
    log_history: list[dict], start_step: int, run_loss: float, global_step: int, per_run_mean: bool = True
) -> float:
    """Mean training loss over every step of the run, resumed or not.

    After a resume, Trainer's `training_loss` covers only the steps this process ran: transformers 5.23
    averages over them (`per_run_mean`), older releases divide their sum by all steps. The steps before
    `start_step` come back from the logged per-interval losses (logged_loss).
    """
    if start_step <= 0 or global_step <= start_step:
        return run_loss
    before, _ = logged_loss(log_history, start_step)
    this_run = run_loss * ((global_step - start_step) if per_run_mean else global_step)
    return (this_run + before) / global_step


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Run:
    """A training run as the stages report it: the validation metrics before and after, Trainer's TrainOutput,
    the seconds train() took (0 for a finished run taken over) and the step the run went on from."""

    before: dict[str, float]
    after: dict[str, float]
    result: Any
    runtime: float
    start_step: int


def evaluate_train_evaluate(trainer, checkpoints: Path, prepared: bool) -> Run:
    """Everything between building the trainer and saving the result. Every rank learns whether the run goes
    on from a checkpoint (rank 0 `prepared` the folder before the trainer existed), the validation rows are
    scored, the run trains, and the validation metrics of the weights it ends with are read (final_eval).

    A run whose latest checkpoint is its end (run_finished: DVC reran the stage with the same inputs) is taken
    over as it is instead: Trainer resumed there still trains a step past max_steps whenever max_steps is not
    a whole number of epochs (transformers 5.23 skips the epoch's trained batches and steps once before it
    checks max_steps)."""
    resume = agreed_resume(trainer, checkpoints, prepared)
    start_step = resume_step(checkpoints) if resume else 0
    load_top_level_adapter_too(trainer)
    trainable, total = parameter_counts(trainer.model)  # printed as PEFT prints them (seed 003)
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )
    # under FSDP this first evaluation shards the model, as train() does before it loads a checkpoint
    before = trainer.evaluate()
    last = checkpoints / f"checkpoint-{start_step}"
    if start_step and run_finished(last):
        print(f"qatune: {last} ends a finished run: taken over as it is, no step trained", flush=True)
        result, runtime = take_over(trainer, last), 0.0
    else:
        start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=True if resume else None)
        runtime = time.perf_counter() - start
    return Run(before, final_eval(trainer), result, runtime, start_step)


def load_top_level_adapter_too(trainer) -> None:
    """Make the trainer's checkpoint loading (a resume, or take_over) restore the adapter that trains.

    TRL 1.15's DPOTrainer (the CUDA image's) saves the policy's adapter at the checkpoint's top level and its
    reference copy in `ref/`. transformers' Trainer._load_from_checkpoint, given a PEFT checkpoint with adapter
    subfolders, loads only the subfolders (5.17 and 5.23 alike): the policy would go on from the weights it
    started with while the optimiser and step count come back. So after Trainer's own loading, a top-level
    adapter next to adapter subfolders is loaded into the active adapter as well."""
    original = trainer._load_from_checkpoint

    def load(resume_from_checkpoint, model=None):
        original(resume_from_checkpoint, model)
        peft_model = model if model is not None else trainer.model
        folder = Path(resume_from_checkpoint)
        subfolders = [d for d in folder.iterdir() if d.is_dir() and (d / "adapter_config.json").is_file()]
        if subfolders and (folder / "adapter_config.json").is_file() and hasattr(peft_model, "load_adapter"):
            active = peft_model.active_adapters[0]
            peft_model.load_adapter(str(folder), active, is_trainable=True)
            peft_model.set_adapter(active)

    trainer._load_from_checkpoint = load


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, all) parameters: PEFT's own count (4-bit weights counted as the parameters they stand
    for), else the tensors' sizes."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def take_over(trainer, checkpoint: Path):
    """Put the trainer where train() left it when the run that `checkpoint` ends finished, without a step.
    Each part the way transformers 5.23's Trainer does it (trainer.py): the checkpoint's trainable weights
    (the adapter, and dpo's frozen reference copy in its own folder) as train() loads a checkpoint it resumes
    from (_load_from_checkpoint); the checkpoint's state, with its steps, epoch, log history and best
    checkpoint (_init_training_state, which forgets a best checkpoint removed since); and under
    load_best_model_at_end the best checkpoint's weights, as a run's end loads them (_finalize_training ->
    _load_best_model). Returns what train() returns, a TrainOutput; its loss is the mean of the logged ones
    (logged_loss: steps after the last logging step have none; NaN when none was logged)."""
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    trainer._load_from_checkpoint(str(checkpoint))
    state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    if state.best_model_checkpoint is not None and not os.path.isdir(state.best_model_checkpoint):
        state.best_model_checkpoint = None
    trainer.state = state
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint is not None:
        trainer._load_best_model()
    total, steps = logged_loss(state.log_history, state.global_step)
    return TrainOutput(state.global_step, total / steps if steps else math.nan, {})


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Nodes:
    """Where this machine sits in a run over several machines. Read from the variables torchrun itself reads
    (PET_NNODES, PET_NODE_RANK, PET_RDZV_ENDPOINT, PET_RDZV_ID, PET_RDZV_BACKEND), not from params.yaml: the
    node rank differs per machine, and neither it nor the address may change the stage's params or its
    checkpoints' fingerprint."""

    count: int = 1
    rank: int = 0
    endpoint: str | None = None  # host:port of the rendezvous on node 0, the same on every node
    run_id: str = "qatune"  # the same on every node of one run
    backend: str = "c10d"  # torchrun's rendezvous for several machines; "static" takes --node-rank as given


def nodes_from_env(env: Mapping[str, str]) -> Nodes:
    """The Nodes the environment asks for; a single machine when PET_NNODES is unset or 1."""
    try:
        count, rank = int(env.get("PET_NNODES", "1")), int(env.get("PET_NODE_RANK", "0"))
    except ValueError:  # torchrun also takes elastic ranges (1:4), which qatune's launchers do not
        raise QatuneError(
            f"PET_NNODES={env.get('PET_NNODES')!r} PET_NODE_RANK={env.get('PET_NODE_RANK')!r}: "
            "qatune needs whole numbers (a fixed number of machines)"
        ) from None
    if count <= 1:
        return Nodes()
    endpoint = env.get("PET_RDZV_ENDPOINT")
    if not endpoint or ":" not in endpoint or not 0 <= rank < count:
        raise QatuneError(
            f"PET_NNODES={count}: set PET_RDZV_ENDPOINT=host:port (node 0's address, the same on every node) "
            f"and PET_NODE_RANK to 0..{count - 1} on each machine (now {rank})"
        )
    return Nodes(count, rank, endpoint, env.get("PET_RDZV_ID", "qatune"), env.get("PET_RDZV_BACKEND", "c10d"))


# accelerate launch's FSDP flags (accelerate 1.15), the choices of FSDP_CONFIG: launched this way, accelerate
# sets ACCELERATE_USE_FSDP and FSDP_CPU_RAM_EFFICIENT_LOADING before the stage starts, and transformers then
# loads the base's weights on rank 0 only (the other ranks get placeholders, filled when FSDP shards the
# model, sync_module_states broadcasting rank 0's). Under plain torchrun every rank loaded the whole model.
FSDP_LAUNCH = {
    "--fsdp_version": "2",
    "--fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "--fsdp_reshard_after_forward": "true",
    "--fsdp_cpu_ram_efficient_loading": "true",
    "--fsdp_sync_module_states": "true",
    "--fsdp_state_dict_type": "FULL_STATE_DICT",  # the adapter is gathered whole on rank 0 to be saved
    "--fsdp_activation_checkpointing": "false",  # the Trainer's own activation checkpointing applies
}


def python_command(
    module_or_script: str,
    num_processes: int,
    args: list[str],
    distributed: str = "ddp",
    nodes: Nodes = Nodes(),
) -> list[str]:
    """The command that runs a stage: as it is for one process; DDP under torchrun; FSDP under accelerate
    launch. `num_processes` is per machine, `nodes` the machines (one unless PET_NNODES says more)."""
    if num_processes * nodes.count <= 1:
        return [sys.executable, module_or_script, *args]
    if distributed == "fsdp":
        return accelerate_command(module_or_script, num_processes, args, nodes)
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nodes.count == 1:  # a free port on this machine, nothing to meet
        cmd += ["--standalone", f"--nproc_per_node={num_processes}"]
    else:
        cmd += [
            f"--nproc_per_node={num_processes}",
            f"--nnodes={nodes.count}",
            f"--node-rank={nodes.rank}",
            f"--rdzv-backend={nodes.backend}",
            f"--rdzv-endpoint={nodes.endpoint}",
            f"--rdzv-id={nodes.run_id}",
        ]
    return [*cmd, module_or_script, *args]


def accelerate_command(script: str, num_processes: int, args: list[str], nodes: Nodes) -> list[str]:
    """`accelerate launch` with FSDP_LAUNCH (it starts torchrun itself). Its --num_processes counts every
    machine's processes; several machines meet at node 0's address."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp"]
    cmd += [f"--num_processes={num_processes * nodes.count}", f"--num_machines={nodes.count}"]
    if nodes.count == 1:
        cmd.append("--main_process_port=0")  # a free port, as torchrun --standalone picks
    else:
        host, _, port = nodes.endpoint.rpartition(":")
        cmd += [
            f"--machine_rank={nodes.rank}",
            f"--main_process_ip={host}",
            f"--main_process_port={port}",
            f"--rdzv_backend={nodes.backend}",
        ]
    cmd += [f"{flag}={value}" for flag, value in FSDP_LAUNCH.items()]
    return [*cmd, script, *args]


def relaunch_distributed(train) -> None:
    """Re-run this script under torchrun (ddp) or accelerate launch (fsdp) when `train.num_processes` or
    PET_NNODES asks for several processes (and we are not one yet); FSDP without GPUs is refused here,
    before any process starts. In a process FSDP started, the process group opens now, before the model
    loads: transformers loads the weights on rank 0 only when it is already open."""
    if "LOCAL_RANK" in os.environ:
        if train.distributed == "fsdp" and fsdp_launched():
            from accelerate import PartialState

            PartialState()
        return
    nodes = nodes_from_env(os.environ)
    num_processes = train.num_processes
    if num_processes * nodes.count <= 1:
        return
    if train.distributed == "fsdp":
        import torch

        distributed_args("fsdp", torch.cuda.is_available(), num_processes * nodes.count)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = python_command(sys.argv[0], num_processes, sys.argv[1:], train.distributed, nodes)
    total = num_processes * nodes.count
    where = f" ({num_processes} on node {nodes.rank} of {nodes.count})" if nodes.count > 1 else ""
    print(f"qatune: launching {total} processes{where}: {' '.join(cmd)}", flush=True)
    raise SystemExit(subprocess.call(cmd, env=env))


def stable_adapter_config(folder: Path) -> None:
    """peft writes LoraConfig.target_modules, a set, in the order this process's string hashing gives it, so
    the same adapter trained twice gets two different adapter_config.json files: a new DVC hash for every
    stage after training, and a new upload to the Hub. Sorted, it is the same file every run."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")  # peft's own layout


def save_on_every_rank(trainer, out: Path) -> None:
    """What a rank other than 0 does when the run ends: under FSDP it takes part in gathering the adapter
    (FULL_STATE_DICT is a collective; rank 0 writes it in save_run), otherwise nothing."""
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.save_model(str(out))


# --------------------------------------------------------------------------- results


def count_real_tokens(dataset) -> int:
    """Non-padding tokens per epoch in a tokenized dataset (what tokens/s is measured in)."""
    return int(sum(len(ids) for ids in dataset["input_ids"]))


def final_eval(trainer) -> dict[str, float]:
    """Validation metrics of the model the run ends with. The trainer's own evaluation at that step is
    reused where there is one (the best checkpoint's under load_best_model_at_end, else the last step's):
    same weights, same rows, so a second pass would repeat it to the digit. Otherwise a new pass."""
    state = trainer.state
    step = state.global_step
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint:
        step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[-1])
    for entry in reversed(state.log_history):
        if entry.get("step") == step and "eval_loss" in entry:
            return dict(entry)
    return trainer.evaluate()


def eval_summary(metrics: dict[str, float], perplexity: bool = False) -> dict[str, float]:
    """An `evaluate()` result without its prefix and timing entries: loss and the method's own measures, and
    with `perplexity` (SFT, whose eval loss is the mean answer-token NLL) exp(loss), as seed 002 reports it."""
    out = {k.removeprefix("eval_"): v for k, v in metrics.items() if k == "eval_loss" or "/" in k}
    if perplexity and "loss" in out:
        out["perplexity"] = round(math.exp(out["loss"]), 4)
    return out


def run_metrics(trainer, run: Run, hw: Hardware) -> dict[str, Any]:
    """What both stages report about the run itself, whatever the method."""
    state = trainer.state
    return {
        "backend": hw.backend,
        "precision": hw.precision,
        "lm_head": lm_head.trained_with(trainer.model),  # not hw's choice: what the trainer really ran
        "device": hw.device,
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 3),
        "train_loss": round(
            whole_run_loss(
                state.log_history,
                run.start_step,
                run.result.training_loss,
                state.global_step,
                per_run_mean=compat.resumed_loss_is_per_run_mean(trainer),
            ),
            4,
        ),
        "train_runtime_s": round(run.runtime, 1),
        "resumed_from_step": run.start_step,
        "world_size": trainer.args.world_size,  # processes that trained, over every machine
        "best_eval_loss": state.best_metric,
        "best_checkpoint": state.best_model_checkpoint,
    }


def write_history(log_history: list[dict], plots_dir: Path, keys: dict[str, list[str]]) -> None:
    """Per-step curves as DVC plot files (one JSON list per plot) plus one CSV of everything (seed 002).

    Trainer logs train and eval values as separate entries; DVC draws a file only when every row has the
    same fields, so rows are merged by step and a value missing at a step is null (vega skips it).
    """
    plots_dir.mkdir(parents=True, exist_ok=True)
    for name, metric_keys in keys.items():
        by_step: dict[int, dict] = {}
        for entry in log_history:
            for key in metric_keys:
                if key in entry:
                    by_step.setdefault(entry["step"], {})[key.replace("/", "_")] = entry[key]
        fields = [k.replace("/", "_") for k in metric_keys]
        rows = [
            {"step": step, **{f: values.get(f) for f in fields}} for step, values in sorted(by_step.items())
        ]
        write_json(plots_dir / f"{name}.json", rows, indent=1, ensure_ascii=True)
    columns = sorted({k for e in log_history for k in e})
    with open(plots_dir / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(log_history)


def drop_other_adapters(model, out: Path) -> list[str]:
    """Remove the folders peft's save_pretrained writes for adapters other than the trained one: the dpo
    stage's `ref/`, TRL's frozen copy of the SFT adapter used as the reference, is not part of the result
    (merge, score and the Hub release read the top-level adapter). Returns the names removed."""
    configs = getattr(model, "peft_config", None) or {}
    active = getattr(model, "active_adapter", None)
    removed = []
    for name in configs:
        if name != active and (out / name / "adapter_config.json").is_file():
            shutil.rmtree(out / name)
            removed.append(name)
    return removed


def training_report(method: str, metrics: dict) -> str:
    """One line at the end of a training stage: time, final train and validation loss, peak memory."""
    minutes = metrics.get("train_runtime_s", 0.0) / 60
    parts = [f"{method}: {metrics.get('steps')} steps in {minutes:.2f} min"]
    if metrics.get("train_loss") is not None:
        parts.append(f"train loss {metrics['train_loss']:.4f}")
    val = (metrics.get("eval") or {}).get("loss")
    if val is not None:
        parts.append(f"validation loss {val:.4f}")
    if "peak_cuda_reserved_gb" in metrics:
        parts.append(
            f"peak reserved memory {metrics['peak_cuda_reserved_gb']:.3f} GB "
            f"({metrics['peak_cuda_reserved_pct']:.3f}% of {metrics['cuda_device_memory_gb']:.3f} GB)"
        )
    parts.append(f"peak RSS {metrics.get('peak_rss_gb', 0.0):.2f} GB")
    return ", ".join(parts)


def save_run(
    trainer,
    tokenizer,
    args: argparse.Namespace,
    metrics: dict,
    *,
    curves: dict,
    template: str | None,
    record: dict,
) -> None:
    """Write what a training stage declares, where its command line (stage_parser) says: the adapter with its
    tokenizer in --out (carrying the model's own chat `template`, never the training copy), the --metrics file
    (peak memory added), the per-step `curves` in --plots, and the provenance `record` next to the adapter."""
    out = Path(args.out)
    trainer.save_model(str(out))
    drop_other_adapters(trainer.model, out)
    stable_adapter_config(out)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    metrics.update(peak_memory_gb())
    write_json(args.metrics, metrics)
    print(training_report(metrics.get("method", "train"), metrics), flush=True)
    write_history(trainer.state.log_history, Path(args.plots), curves)
    write_provenance(out, {**record, "git_commit": git_commit(), "metrics": metrics})
