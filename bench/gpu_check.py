"""The GPU workstation path in one command, for a person with a CUDA GPU (or two) and no Hub access.

    make gpu-check            # or: python bench/gpu_check.py [--keep DIR] [--out FILE]

On the bundled SmolLM2 with tiny budgets, each scenario in its own scratch project (never this working tree)
runs the stages the way `dvc repro` does:

  pipeline     backend auto (Unsloth when installed) in 4-bit: fetch, clean, split, sft, dpo, the three score
               stages, evaluate, merge, then one answer from `qatune ask`; the DPO step-0 margin (reference =
               the SFT model); per-token log-probs from model(...).logits against TRL's fused LM head in train
               mode on an Unsloth model (the head calls the backbone directly: non-causal attention there shows)
  seed003      transformers + peft, 4-bit nf4, fp16 compute, adamw_8bit (seed 003's shape): sft and dpo train
  seed000      no SFT, DPO straight from the base in 4-bit (seed 000's shape): step-0 margin 0
  ddp-2gpu     sft on 2 GPUs under torchrun (skipped with one GPU)
  fsdp-2gpu    sft on 2 GPUs under accelerate launch with FSDP2, 4-bit (skipped with one GPU)

Each check records pass, fail or skip with its reason in bench/results/gpu_check.json, with the library
versions, the GPUs, and wall time and peak reserved CUDA memory per step. Nothing is installed or fetched
(HF_HUB_OFFLINE=1). Without CUDA it runs nothing, writes every check as skipped, and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "bench" / "results" / "gpu_check.json"
PACKAGES = (
    "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "unsloth", "unsloth_zoo",
)  # fmt: skip

# Tiny budgets: minutes, not hours, on any CUDA GPU. Everything else is params.yaml's or the scenario's value.
BUDGET = {
    "data_samples": 160,
    "sft": {"max_steps": 4, "eval_steps": 4, "save_steps": 4, "eval_rows": 8, "logging_steps": 1},
    "dpo": {"max_steps": 2, "eval_steps": 2, "save_steps": 2, "eval_rows": 4, "logging_steps": 1,
            "on_policy_harm_rows": 4},
    "evaluate": {"rows": 8, "generate_rows": 8, "max_new_tokens": 32},
    "merge": {"dtype": "bfloat16", "check_prompts": 2},
}  # fmt: skip
DATA = [
    ("fetch", ["stages/fetch.py"]),
    ("clean", ["stages/clean.py"]),
    ("split", ["stages/split.py"]),
]
TRAIN = [("sft", ["stages/sft.py"]), ("dpo", ["stages/dpo.py"])]
SCORE_MERGE = [
    ("score@base", ["stages/score.py", "--adapter", "models/base", "--name", "base", "--generate",
                    "--out", "data/scores/base.json"]),
    ("score@sft", ["stages/score.py", "--adapter", "models/sft", "--name", "sft", "--out", "data/scores/sft.json"]),
    ("score@final", ["stages/score.py", "--adapter", "models/dpo", "--name", "final", "--generate",
                     "--out", "data/scores/final.json"]),
    ("evaluate", ["stages/evaluate.py"]),
    ("merge", ["stages/merge.py"]),
]  # fmt: skip
ASK = ["-m", "qatune.cli", "ask", "How much protein do I need a day?", "--max-new-tokens", "32"]
# Mean |log-prob difference| over the answer tokens, fused head vs logits. bf16 rounding alone should stay
# near 0.01 nats (expected, not yet measured on a GPU); a backbone that sees later tokens gives ~1 or more.
FUSED_TOLERANCE = 0.05


@dataclass(frozen=True)
class Scenario:
    name: str
    overlay: dict
    steps: list
    min_gpus: int = 1
    description: str = ""
    ask: bool = False  # then one answer from `qatune ask` on the merged model
    fused_check: bool = False  # then the fused-head check on an Unsloth model (when unsloth is installed)
    data_from: str | None = "pipeline"  # reuse that scenario's models/base and data/ instead of refetching


SEED003 = {
    "train": {"backend": "transformers", "load_in_4bit": True, "precision": "fp16", "activation_checkpointing": True,
              "lora": {"target_modules": ["q_proj", "v_proj"], "dropout": 0.05}},
    "sft": {"optim": "adamw_8bit", "learning_rate": 2.0e-5},
    "dpo": {"optim": "adamw_8bit"},
}  # fmt: skip
SEED000 = {
    "train": {"backend": "auto", "load_in_4bit": True},
    "sft": {"enabled": False},
    "dpo": {"loss_type": ["sigmoid"], "loss_weights": None, "optim": "adamw_8bit"},
}
SCENARIOS = [
    Scenario(
        "pipeline",
        {"train": {"backend": "auto", "load_in_4bit": True, "precision": "auto"}},
        DATA + TRAIN + SCORE_MERGE,
        description="backend auto (Unsloth when installed), 4-bit: every model-loading stage, then qatune ask",
        ask=True,
        fused_check=True,
        data_from=None,
    ),
    Scenario("seed003", SEED003, TRAIN, description="transformers + peft, 4-bit, fp16 compute (seed 003)"),
    Scenario("seed000", SEED000, TRAIN, description="no SFT: DPO straight from the base (seed 000)"),
    Scenario(
        "ddp-2gpu",
        {"train": {"backend": "auto", "load_in_4bit": True, "num_processes": 2}},
        TRAIN[:1],
        min_gpus=2,
        description="sft on 2 GPUs under torchrun (DDP)",
    ),
    Scenario(
        "fsdp-2gpu",
        {
            "train": {
                "backend": "transformers",
                "load_in_4bit": True,
                "num_processes": 2,
                "distributed": "fsdp",
            }
        },
        TRAIN[:1],
        min_gpus=2,
        description="sft on 2 GPUs under accelerate launch, FSDP2, 4-bit weights stored as the compute dtype",
    ),
]


# --------------------------------------------------------------------------- pure parts (unit-tested on CPU)


def merged(base: dict, overlay: dict) -> dict:
    """`overlay` on `base`, nested blocks merged key by key."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = (
            merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def scenario_params(params: dict, scenario: Scenario) -> dict:
    return merged(merged(params, BUDGET), scenario.overlay)


def skip_reason(scenario: Scenario, cuda: bool, gpus: int) -> str | None:
    """Why a scenario cannot run on this machine, or None when it can (the checks that need Unsloth skip
    themselves when it is missing)."""
    if not cuda:
        return "no CUDA GPU visible"
    if gpus < scenario.min_gpus:
        return f"needs {scenario.min_gpus} GPUs, {gpus} visible"
    return None


def passed(ok: bool, reason: str) -> dict:
    return {"status": "pass" if ok else "fail", "reason": reason}


def skipped(reason: str) -> dict:
    return {"status": "skip", "reason": reason}


def read(work: Path, rel: str) -> dict:
    path = work / rel
    return json.loads(path.read_text()) if path.is_file() else {}


def on_gpu(device: str | None) -> bool:
    """A stage's recorded device: sft/dpo record the GPU's name, the others 'cuda'; 'cpu' is a failure."""
    return bool(device) and device != "cpu"


def ran(steps: dict, name: str) -> dict | None:
    """A failed or missing step's verdict, None when it ran cleanly."""
    if name not in steps:
        return passed(False, f"{name} did not run (an earlier step failed)")
    if steps[name]["rc"]:
        return passed(False, f"{name} exited {steps[name]['rc']}: {steps[name]['error']}")
    return None


def trained_on_gpu(work: Path, steps: dict, stage: str) -> dict:
    metrics = read(work, f"metrics/{stage}.json")
    failed = ran(steps, stage)
    if failed:
        return failed
    device = metrics.get("device")
    return passed(
        on_gpu(device) and "peak_cuda_reserved_gb" in metrics,
        f"{stage}: backend {metrics.get('backend')}, {metrics.get('precision')}, on {device}, "
        f"{metrics.get('steps')} steps, peak reserved {metrics.get('peak_cuda_reserved_gb')} GB",
    )


def step0_margin(work: Path, steps: dict, reference: str) -> dict:
    failed = ran(steps, "dpo")
    if failed:
        return failed
    margin = (read(work, "metrics/dpo.json").get("eval_before") or {}).get("rewards/margins")
    return passed(
        margin is not None and abs(margin) < 1e-3,
        f"rewards/margins before training {margin} (policy = reference = the {reference})",
    )


def pipeline_checks(work: Path, steps: dict, banner: str, unsloth: bool, fused: dict | None) -> dict:
    """Checks of the pipeline scenario, from what its stages wrote (pure given the files)."""
    out = {"sft on GPU": trained_on_gpu(work, steps, "sft"), "dpo on GPU": trained_on_gpu(work, steps, "dpo")}
    backends = {read(work, f"metrics/{s}.json").get("backend") for s in ("sft", "dpo")}
    if not unsloth:
        out["unsloth sft then dpo"] = skipped(
            "unsloth is not installed: sft and dpo ran on transformers + peft"
        )
    else:
        out["unsloth sft then dpo"] = passed(
            backends == {"unsloth"}, f"backends: {sorted(map(str, backends))}"
        )
    out["dpo step-0 margin 0"] = step0_margin(work, steps, "SFT model")
    for name in ("base", "sft", "final"):
        failed = ran(steps, f"score@{name}")
        scores = read(work, f"data/scores/{name}.json")
        out[f"score@{name} on GPU"] = failed or passed(
            scores.get("device") == "cuda",
            f"on {scores.get('device')}, scored in {scores.get('score_dtype')}",
        )
    merge = read(work, "metrics/merge.json")
    out["merge on GPU"] = ran(steps, "merge") or passed(
        merge.get("device") == "cuda", f"on {merge.get('device')}, saved as {merge.get('dtype')}"
    )
    out["qatune ask on GPU"] = ran(steps, "qatune ask") or passed(
        " on cuda " in banner, banner or "no banner"
    )
    out["fused LM head = logits (unsloth, train mode)"] = fused_verdict(fused, unsloth, steps)
    return out


def fused_verdict(fused: dict | None, unsloth: bool, steps: dict) -> dict:
    if not unsloth:
        return skipped("unsloth is not installed")
    failed = ran(steps, "fused check")
    if failed:
        return failed
    return passed(
        fused["mean_abs_diff"] < FUSED_TOLERANCE,
        f"mean |diff| {fused['mean_abs_diff']:.4f}, max {fused['max_abs_diff']:.4f} nats over {fused['tokens']} "
        f"tokens (tolerance {FUSED_TOLERANCE})",
    )


def scenario_checks(scenario: Scenario, work: Path, steps: dict) -> dict:
    """Checks of the training-only scenarios."""
    if scenario.name == "seed003":
        out = {s: trained_on_gpu(work, steps, s) for s in ("sft", "dpo")}
        for stage in ("sft", "dpo"):
            precision = read(work, f"metrics/{stage}.json").get("precision")
            if out[stage]["status"] == "pass" and precision != "fp16":
                out[stage] = passed(False, f"{stage} trained in {precision}, not fp16")
        return {f"transformers 4-bit fp16 {s}": v for s, v in out.items()}
    if scenario.name == "seed000":
        return {
            "dpo from the base on GPU": trained_on_gpu(work, steps, "dpo"),
            "dpo from the base: step-0 margin 0": step0_margin(work, steps, "base model"),
        }
    check = trained_on_gpu(work, steps, "sft")
    world = read(work, "metrics/sft.json").get("world_size")
    if check["status"] == "pass" and world != 2:
        check = passed(False, f"world size {world}, not 2")
    return {f"sft {scenario.name}": check}


def skipped_checks(scenario: Scenario, reason: str) -> dict:
    """The checks a scenario would have made, each skipped for `reason`."""
    names = {
        "pipeline": ["sft on GPU", "dpo on GPU", "unsloth sft then dpo", "dpo step-0 margin 0", "score@base on GPU",
                     "score@sft on GPU", "score@final on GPU", "merge on GPU", "qatune ask on GPU",
                     "fused LM head = logits (unsloth, train mode)"],
        "seed003": ["transformers 4-bit fp16 sft", "transformers 4-bit fp16 dpo"],
        "seed000": ["dpo from the base on GPU", "dpo from the base: step-0 margin 0"],
    }.get(scenario.name, [f"sft {scenario.name}"])  # fmt: skip
    return {name: skipped(reason) for name in names}


def summary(checks: dict[str, dict]) -> dict:
    """Counts per status; the run passes when nothing failed and something passed."""
    counts = {s: sum(c["status"] == s for c in checks.values()) for s in ("pass", "fail", "skip")}
    return {**counts, "passed": counts["fail"] == 0 and counts["pass"] > 0}


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def fused_vs_logits(model, input_ids, attention_mask) -> dict:
    """Per-token log-probabilities of the answer tokens two ways, in train mode: from `model(...).logits`, and
    through TRL's fused LM head (`add_fused_lm_head`, what TRL's DPO and KTO trainers score with), which calls
    the model's backbone directly instead of its causal-LM forward. They agree unless the two calls attend
    differently (issue 25, finding 6: Unsloth builds its causal mask in the causal-LM forward)."""
    import torch
    from trl.trainer.utils import add_fused_lm_head

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model.train()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        add_fused_lm_head(base)
        fused = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    plain = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = labels[:, 1:] != -100
    diff = (fused.log_probs.float() - plain)[mask].abs()
    return {"mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()), "tokens": int(mask.sum())}


# --------------------------------------------------------------------------- on the GPU


FUSED_SCRIPT = """
import unsloth  # first, before transformers/trl/peft, as in the stages
import json, sys, torch
from unsloth import FastLanguageModel
sys.path.insert(0, sys.argv[1])
from gpu_check import fused_vs_logits
model, tok = FastLanguageModel.from_pretrained("models/base", max_seq_length=256, load_in_4bit=True, dtype=None)
model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_gradient_checkpointing="unsloth")
texts = ["<|im_start|>user\\nHow much protein?<|im_end|>\\n<|im_start|>assistant\\nAbout 1.6 g per kg a day.<|im_end|>",
         "<|im_start|>user\\nIs creatine safe?<|im_end|>\\n<|im_start|>assistant\\nYes, 3 to 5 g a day.<|im_end|>"]
batch = tok(texts, return_tensors="pt", padding=True).to("cuda")
print(json.dumps(fused_vs_logits(model, batch["input_ids"], batch["attention_mask"])))
"""  # fmt: skip


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def run_step(name: str, cmd: list[str], work: Path, env: dict, log) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    log.write(f"==== {name}: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    print(
        f"gpu-check: {work.name}: {name}: rc {proc.returncode} in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    return {
        "rc": proc.returncode,
        "wall_s": round(time.perf_counter() - start, 1),
        "error": last if proc.returncode else None,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
    }


def prepare(work: Path, params: dict, scenario: Scenario, root: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "stages", work / "stages", dirs_exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(scenario_params(params, scenario), sort_keys=False))
    if scenario.data_from:  # the same bundled base and split as the pipeline scenario: no second fetch
        for rel in ("models/base", "data/raw", "data/clean", "data/split"):
            if (root / scenario.data_from / rel).exists():
                shutil.copytree(root / scenario.data_from / rel, work / rel, dirs_exist_ok=True)


def run_scenario(scenario: Scenario, work: Path, env: dict, unsloth: bool) -> tuple[dict, dict]:
    """(steps, checks) of one scenario, run in `work`."""
    steps: dict[str, dict] = {}
    fused, banner = None, ""
    todo = scenario.steps
    if not (work / "data/split/train.jsonl").is_file():  # the pipeline scenario did not run first: fetch here
        todo = DATA + [s for s in scenario.steps if s not in DATA]
    with open(work / "gpu_check.log", "w") as log:
        for name, cmd in todo:
            steps[name] = run_step(name, [sys.executable, *cmd], work, env, log)
            if steps[name]["rc"]:
                break
        if scenario.ask and (work / "models/merged/config.json").is_file():
            steps["qatune ask"] = run_step("qatune ask", [sys.executable, *ASK], work, env, log)
            banner = next(
                (ln for ln in steps["qatune ask"]["stderr"].splitlines() if ln.startswith("qatune: ")), ""
            )
        if scenario.fused_check and unsloth and (work / "models/base/config.json").is_file():
            cmd = [sys.executable, "-c", FUSED_SCRIPT, str(ROOT / "bench")]
            steps["fused check"] = run_step("fused check", cmd, work, env, log)
            if steps["fused check"]["rc"] == 0:
                fused = json.loads(steps["fused check"]["stdout"].strip().splitlines()[-1])
    for name in ("sft", "dpo"):
        if name in steps:
            steps[name]["peak_cuda_reserved_gb"] = read(work, f"metrics/{name}.json").get(
                "peak_cuda_reserved_gb"
            )
    if scenario.name == "pipeline":
        checks = pipeline_checks(work, steps, banner, unsloth, fused)
    else:
        checks = scenario_checks(scenario, work, steps)
    for step in steps.values():
        step.pop("stdout"), step.pop("stderr")
    return steps, checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary one, removed)")
    parser.add_argument("--out", default=str(RESULT), help="result file")
    parser.add_argument(
        "--only",
        action="append",
        choices=[s.name for s in SCENARIOS],
        help="run only these scenarios (repeatable)",
    )
    args = parser.parse_args(argv)
    import torch

    info = versions()
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    unsloth = info["unsloth"] is not None
    result: dict = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "versions": info,
        "scenarios": {},
        "checks": {},
    }
    if cuda:
        result["gpus"] = [
            {
                "name": p.name,
                "memory_gb": round(p.total_memory / 1024**3, 1),
                "capability": f"{p.major}.{p.minor}",
            }
            for p in map(torch.cuda.get_device_properties, range(gpus))
        ]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qatune-gpu-check-"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = str(ROOT / "src")
    started = time.perf_counter()
    for scenario in SCENARIOS:
        reason = skip_reason(scenario, cuda, gpus)
        if args.only and scenario.name not in args.only:
            reason = "not asked for (--only)"
        if reason:
            result["scenarios"][scenario.name] = {"description": scenario.description, "skipped": reason}
            result["checks"].update(skipped_checks(scenario, reason))
            continue
        work = root / scenario.name
        prepare(work, params, scenario, root)
        steps, checks = run_scenario(scenario, work, env, unsloth)
        result["scenarios"][scenario.name] = {"description": scenario.description, "steps": steps}
        result["checks"].update(checks)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result.update(summary(result["checks"]))
    write_result(Path(args.out), result)
    for name, check in result["checks"].items():
        print(f"  {check['status']:4}  {name}: {check['reason']}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    if not cuda:
        print(f"gpu-check: no CUDA GPU visible: nothing was run -> {args.out}")
        return 2
    print(f"gpu-check: {'PASSED' if result['passed'] else 'FAILED'} in {result['wall_s']} s -> {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
