"""dpo: preference optimisation of the SFT adapter, or of a new adapter on the base when sft.enabled is false:
TRL's DPOTrainer on pairs or KTOTrainer on unpaired answers (`dpo.method`); the reference model is the model
training starts from (the SFT model, or the base). "The SFT model" below means that starting model.

    python stages/dpo.py --params params.yaml --model models/base --sft models/sft --data data/split \
        --out models/dpo --checkpoints models/dpo-checkpoints --metrics metrics/dpo.json --plots metrics/dpo

Reads `seed`, `beta`, `train`, `dpo` and `sft.enabled`. The SFT adapter is loaded trainable on the base
model with no peft_config, so TRL keeps a frozen copy of it as the reference (step 0: margins 0, loss
ln 2) and the final adapter stays relative to the original base. With `sft.enabled: false` (seed 000) a
new LoRA adapter is trained straight from the base, and the reference is the base itself.
`dpo.method: dpo` trains chosen/rejected pairs with TRL's DPO losses (`loss_type`, several combined by
`loss_weights`); `kto` trains every answer on its own, chosen ones as desirable and rejected ones (and
lone bad answers of unpaired data) as undesirable. Validation rows are measured before and after
training. With `dpo.enabled: false` the SFT adapter is copied to --out unchanged, so downstream stages
always read --out. Killed mid-run, it resumes like sft; run again after it finished, it trains no further step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qatune import compat, hardware, modeling, plan, training
from qatune.errors import QatuneError, fail_cleanly, require
from qatune.facts import check
from qatune.focus import fact_rows, focus_first, harmful_requests
from qatune.generation import on_policy_rejected
from qatune.io import read_jsonl, write_json
from qatune.params import load_params
from qatune.provenance import sha256_files
from qatune.stance import stance
from qatune.templates import dpo_example, kto_examples, use_training_template

CURVES = {
    "loss": ["loss", "eval_loss"],
    "rewards": ["rewards/chosen", "rewards/rejected", "rewards/margins"],
    "accuracies": ["rewards/accuracies", "eval_rewards/accuracies"],
    "logps": ["logps/chosen", "logps/rejected"],
    "logits": ["logits/chosen", "logits/rejected"],
    "learning_rate": ["learning_rate"],
    "grad_norm": ["grad_norm"],
}
# Seed 000's metrics table, logged by TRL at every logging step.
TABLE = [
    "loss",
    "grad_norm",
    "learning_rate",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "epoch",
]


def pass_through(args) -> None:
    """DPO switched off: the SFT adapter is the final adapter, and the metrics say so."""
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(args.sft, out)
    write_json(args.metrics, {"method": "sft", "enabled": False, "adapter": "sft"})
    training.write_history([], Path(args.plots), CURVES)
    print("dpo: disabled (dpo.enabled: false); the SFT adapter is the final adapter")


def own_answer_pairs(
    model,
    tokenizer,
    rows: list[dict],
    harm_rows: int,
    fact_rows_limit: int,
    system_prompt: str | None,
    max_new_tokens: int,
    batch_size: int,
    template_kwargs: dict | None = None,
) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """On-policy pairs from the model's own mistakes: it answers the first `harm_rows` harmful requests
    (`expected: decline`) and the first `fact_rows_limit` key-fact rows of `rows`, in one batch. An answer to a
    harmful request that affirms or evades (qatune.stance; an empty one evades) and an answer that
    contradicts the row's key fact (qatune.facts: a number outside the accepted range) each become a new
    pair, the row's own answer as chosen and the model's as rejected. Returns (pairs, what was seen)."""
    harm = harmful_requests(rows)[:harm_rows]
    # only a row whose own answer states the fact can correct a wrong number
    facts = [(r, f) for r, f in fact_rows(rows) if check(f, r["chosen"])["states"]][:fact_rows_limit]
    asked = [{**r, "rejected": None, "_fact": None} for r in harm] + [
        {**r, "rejected": None, "_fact": f} for r, f in facts
    ]
    # one pass; an answer equal to the chosen one is left out, an empty one comes back as "(no answer)"
    answered = on_policy_rejected(
        model, tokenizer, asked, system_prompt, max_new_tokens, batch_size, template_kwargs
    )
    seen: dict[str, dict[str, int]] = {"harm": {}, "facts": {}}
    pairs = []
    for row in answered:
        fact, answer = row.pop("_fact"), row["rejected"]
        if fact:
            verdict = check(fact, answer)
            kind, wrong = "facts", verdict["contradicts"]
            taken = "contradicts" if wrong else "states" if verdict["states"] else "neither"
        else:
            kind, taken = "harm", "evades" if answer == "(no answer)" else stance(answer)
            wrong = taken in ("affirms", "evades")
        seen[kind][taken] = seen[kind].get(taken, 0) + 1
        if wrong:
            pairs.append({**row, "id": f"{row.get('id')}-on-policy"})
    return pairs, seen


def training_examples(
    model, tokenizer, data: Path, train, cfg, kwargs: dict | None
) -> tuple[dict[str, list[dict]], dict]:
    """The train and val examples: pairs (dpo), or single answers labelled good or bad (kto), val capped by
    eval_rows (the splits are already shuffled); rows without a rejected answer get the SFT model's own
    (on_policy_pairs); the pairs that teach safety and correctness first (focus_pairs), after those made of
    the SFT model's own mistakes (on_policy_harm_rows, on_policy_fact_rows); with max_steps only the rows the
    run draws, as the reference log-probs are precomputed for all. Returns them and, when the SFT model
    answered, what it was asked and how many pairs it made (metrics)."""
    rows = {s: read_jsonl(require(data / f"{s}.jsonl", f"{s} split")) for s in ("train", "val")}
    rows["val"] = rows["val"][: cfg.eval_rows or None]
    # how the SFT model answers, for the rows that lack a rejected answer and for its own mistakes
    asking = (train.system_prompt, cfg.on_policy_max_new_tokens, cfg.on_policy_batch_size, kwargs)
    if cfg.on_policy_pairs:
        rows = {s: on_policy_rejected(model, tokenizer, rs, *asking) for s, rs in rows.items()}
    rows["train"] = focus_first(rows["train"], cfg.focus_pairs, wrong_rejected=True)
    on_policy = {}
    if cfg.on_policy_harm_rows or cfg.on_policy_fact_rows:  # the SFT model's own mistakes, pushed down first
        extra, seen = own_answer_pairs(
            model, tokenizer, rows["train"], cfg.on_policy_harm_rows, cfg.on_policy_fact_rows, *asking
        )
        rows["train"], on_policy = extra + rows["train"], {"on_policy": seen, "on_policy_made": len(extra)}
        print(f"dpo: {len(extra)} on-policy pairs from the starting model's own answers: {seen}")
    if cfg.method == "kto":  # every answer on its own: chosen = desirable, rejected = undesirable
        examples = {
            s: [e for r in rs for e in kto_examples(r, train.system_prompt, kwargs)] for s, rs in rows.items()
        }
    else:  # pairs: a lone bad answer (no chosen) of unpaired data has no partner to compare with
        examples = {
            s: [dpo_example(r, train.system_prompt, kwargs) for r in rs if r["chosen"] and r.get("rejected")]
            for s, rs in rows.items()
        }
    if cfg.max_steps > 0:
        examples["train"] = examples["train"][: training.rows_per_run(cfg)]
    if not examples["train"]:
        raise QatuneError(
            f"{data / 'train.jsonl'}: no rows with a rejected answer; set dpo.on_policy_pairs: true "
            "to make pairs from the SFT model's own answers, or dpo.enabled: false"
        )
    if cfg.method == "kto" and len({e["label"] for e in examples["train"]}) < 2:
        raise QatuneError(
            f"{data / 'train.jsonl'}: KTO needs both desirable and undesirable answers among the "
            f"{len(examples['train'])} training rows it uses; these have only one kind"
        )
    return examples, on_policy


def policy(model, sft: str, params, hw: hardware.Hardware):
    """(the model DPO trains, the peft_config TRL gets): the trainable SFT adapter and none, so TRL keeps a
    frozen copy of the adapter as the reference and the final adapter stays relative to the original base;
    without SFT (seed 000) a new adapter, whose reference is the base."""
    if params.sft.enabled:
        return modeling.load_trainable_adapter(model, sft, params.train, hw.backend), None
    if hw.backend == "unsloth":  # a new adapter (B = 0): TRL's copy of it as reference IS the base
        return modeling.unsloth_peft(model, params.train, params.seed), None
    # TRL wraps the base in a new adapter and scores the reference with the adapter disabled
    return model, modeling.lora_config(params.train)


def preference_config(cfg, common: dict):
    """TRL's config for dpo.method over the arguments both share: DPO's losses on pairs (several, weighted),
    or KTO's one loss on single answers weighted by kind."""
    from trl import DPOConfig, KTOConfig  # main imported TRL after the backend

    if cfg.method == "kto":
        return KTOConfig(
            **common,
            loss_type=cfg.loss_type[0],
            desirable_weight=cfg.desirable_weight,
            undesirable_weight=cfg.undesirable_weight,
        )
    return DPOConfig(
        **common,
        loss_type=list(cfg.loss_type),
        loss_weights=list(cfg.loss_weights) if cfg.loss_weights else None,
        truncation_mode="keep_start",
    )


def build_trainer(params, hw: hardware.Hardware, model, tokenizer, peft_config, sets: dict, checkpoints: str):
    """TRL's DPOTrainer (KTOTrainer for dpo.method kto) with the run's config, training with the LM head chosen
    for this machine, and the LoRA weights kept in float32."""
    from trl import DPOTrainer, KTOTrainer

    cfg = params.dpo
    common = {
        **training.trainer_args(params.train, cfg, hw, params.seed, checkpoints),
        "beta": params.beta,
        "precompute_ref_log_probs": cfg.precompute_ref_log_probs,
        "precompute_ref_batch_size": cfg.precompute_ref_batch_size,
    }
    Trainer = KTOTrainer if cfg.method == "kto" else DPOTrainer
    config = preference_config(cfg, common)
    return training.build_trainer(
        Trainer, config, model, tokenizer, peft_config, sets, "dpo", params.train, cfg, hw, ref_model=None
    )


def stage_metrics(
    trainer, run: training.Run, params, hw: hardware.Hardware, memory, examples: dict, on_policy: dict
):
    """metrics/dpo.json: the method and reference, the run and its memory plan, the data's sizes, the last
    logged rewards and the validation pairs scored before and after."""
    cfg = params.dpo
    logged = [e for e in trainer.state.log_history if "rewards/margins" in e]
    return {
        "method": cfg.method,
        "enabled": True,
        "loss_type": list(cfg.loss_type),
        "loss_weights": cfg.loss_weights,
        "reference": "sft" if params.sft.enabled else "base",
        **training.run_metrics(trainer, run, hw),
        "memory_plan": memory.record(),
        "beta": params.beta,
        # pairs (dpo) or single labelled answers (kto) trained on, and scored on val
        ("pairs" if cfg.method == "dpo" else "answers"): len(examples["train"]),
        ("val_pairs" if cfg.method == "dpo" else "val_answers"): len(examples["val"]),
        **on_policy,
        "train": {k: (logged[-1] if logged else {}).get(k) for k in TABLE},
        "eval_before": training.eval_summary(run.before),
        "eval": training.eval_summary(run.after),
    }


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = training.stage_parser(__doc__, "dpo")
    parser.add_argument("--sft", default="models/sft", help="SFT adapter folder")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    train, cfg = params.train, params.dpo
    require(args.sft, "SFT adapter" if params.sft.enabled else "sft stage output")
    if not cfg.enabled:
        return pass_through(args)
    if params.sft.enabled and not modeling.is_adapter(args.sft):
        raise QatuneError(f"{args.sft}: no LoRA adapter (adapter_config.json) although sft.enabled is true")
    training.relaunch_distributed(train)

    import torch

    # ---- model: the backend first (Unsloth must be imported before TRL), then the training template
    torch.manual_seed(params.seed)
    hw = hardware.resolve(train)
    arch = plan.load_arch(args.model)  # its peak memory on this machine, or a one-line stop before loading
    memory = plan.training("dpo", arch, train, cfg, plan.machine(hw), params.sft.enabled).require()
    if cfg.method == "kto" and (blocker := compat.installed_kto_blocker(hw.cuda)):
        raise QatuneError(f"{args.params}: dpo.method kto: {blocker}")
    modeling.import_backend(hw.backend)
    from datasets import Dataset

    model, tokenizer = modeling.load_base(str(require(args.model, "base model")), train, hw, cfg.max_length)
    # the tokenizer gets the training template; `published`, the model's own, goes out with the adapter
    published, kwargs, _ = use_training_template(tokenizer, train.enable_thinking)
    model, peft_config = policy(model, args.sft, params, hw)

    # ---- data
    data = Path(args.data)
    examples, on_policy = training_examples(model, tokenizer, data, train, cfg, kwargs)
    sets = {s: Dataset.from_list(es) for s, es in examples.items()}

    # ---- checkpoints: resumed only when they belong to these params blocks, data, base, SFT and code
    blocks = params.model_dump(include={"seed", "beta", "train", "dpo"})
    blocks["sft_enabled"] = params.sft.enabled
    sft_hash = sha256_files([Path(args.sft) / "adapter_model.safetensors"]) if params.sft.enabled else "none"
    inputs = training.RunInputs.read(blocks, Path(args.model), data, sft_hash)
    resume = training.prepare_checkpoints(Path(args.checkpoints), inputs.fingerprint())

    # ---- trainer
    trainer = build_trainer(params, hw, model, tokenizer, peft_config, sets, args.checkpoints)

    # ---- train, with the same validation pairs scored before (policy = reference) and after (a finished run:
    # taken over as it is)
    run = training.evaluate_train_evaluate(trainer, Path(args.checkpoints), resume)
    if not trainer.is_world_process_zero():
        return training.save_on_every_rank(trainer, Path(args.out))  # FSDP gathers the adapter

    # ---- outputs
    metrics = stage_metrics(trainer, run, params, hw, memory, examples, on_policy)
    record = {"stage": "dpo", **inputs.record(), "sft_adapter": args.sft if params.sft.enabled else None}
    record["quantization"] = modeling.quantization_record(model, train, hw.backend)
    training.save_run(trainer, tokenizer, args, metrics, curves=CURVES, template=published, record=record)
    print(
        f"dpo: train loss {metrics['train_loss']}, val margins {metrics['eval_before'].get('rewards/margins')} "
        f"-> {metrics['eval'].get('rewards/margins')}, accuracy {metrics['eval'].get('rewards/accuracies')}"
    )


if __name__ == "__main__":
    main()
