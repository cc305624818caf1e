"""merge: fold the final LoRA adapter into the base model and prove the result answers the same.

    python stages/merge.py --params params.yaml --model models/base --adapter models/dpo \
        --out models/merged --metrics metrics/merge.json

Reads `train.system_prompt`, `train.enable_thinking`, `train.trust_remote_code` and `merge`. Runs on the
GPU in `merge.dtype` where qatune.plan finds that it fits the card (never a float32 copy of a 16-bit model,
never the 4-bit base an adapter may have trained on), else on the CPU in float32. Writes a plain safetensors
model in `merge.dtype` with tokenizer, chat template and generation config, plus qatune_provenance.json. The
generation config's eos_token_id lists every token that ends an answer (qatune.generation.stop_tokens: the
template's end-of-turn token first, such as Gemma's <end_of_turn>, then the eos ids), so a plain
`model.generate` of the published model stops where the chat template ends a turn.
Verified: logits of the merged model (in memory, and reloaded from disk in the saved dtype) against the
adapter model on sample prompts; the largest difference is recorded, and over tolerance is an error.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

from qatune import hardware, modeling, plan
from qatune.demo import demo_rows
from qatune.errors import QatuneError, fail_cleanly, require
from qatune.generation import stop_tokens
from qatune.io import write_json
from qatune.params import load_params
from qatune.provenance import PROVENANCE_FILE, git_commit, write_provenance
from qatune.templates import conversation, template_kwargs


def logits(model, tokenizer, prompts: list[str]):
    """Logits at every real (non-padding) token of the prompts, in float32."""
    import torch

    tokenizer.padding_side = "right"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.no_grad():
        out = model(**enc).logits.float()
    return out[enc["attention_mask"].bool()]


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml", help="params file to read")
    parser.add_argument("--model", default="models/base", help="base model folder from fetch")
    parser.add_argument("--adapter", default="models/dpo", help="final LoRA adapter")
    parser.add_argument("--out", default="models/merged", help="merged model output folder")
    parser.add_argument("--metrics", default="metrics/merge.json", help="verification numbers")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = params.merge
    require(args.model, "base model")
    require(args.adapter, "adapter")

    import torch

    remote = params.train.trust_remote_code
    arch, hw = plan.load_arch(args.model), plan.machine(hardware.probe())
    lora = plan.adapter_parameters(arch, args.adapter)
    memory = plan.merge(arch, hw, cfg.dtype, lora, cfg.check_prompts).require()
    device, dtype = memory.device, memory.dtype
    # merged in 16-bit on a GPU, the in-memory check has the 16-bit bound too
    bound, tolerance = (
        ("merge.tolerance", cfg.tolerance)
        if dtype == "float32"
        else ("merge.low_precision_tolerance", cfg.low_precision_tolerance)
    )
    model, tokenizer = modeling.load_with_adapters(
        args.model, [("default", args.adapter)], dtype, device, remote
    )
    kwargs = template_kwargs(tokenizer.chat_template, params.train.enable_thinking)
    prompts = [
        tokenizer.apply_chat_template(
            conversation(row, params.train.system_prompt),
            tokenize=False,
            add_generation_prompt=True,
            **kwargs,
        )
        for row in demo_rows(cfg.check_prompts, params.domain.demo_questions)
    ]
    reference = logits(model, tokenizer, prompts)

    merged = model.merge_and_unload().eval()
    in_memory = float((logits(merged, tokenizer, prompts) - reference).abs().max())
    if in_memory > tolerance:
        raise QatuneError(
            f"merge: merged logits differ from the adapter's by {in_memory:.2e} ({bound}={tolerance})"
        )

    out = Path(args.out)
    merged = merged.to(getattr(torch, cfg.dtype))
    stops = stop_tokens(tokenizer, merged.generation_config, kwargs)
    merged.generation_config.eos_token_id = stops.eos_token_id
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model, merged  # one copy at a time: the reload below is the second
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    reloaded, _ = modeling.load_with_adapters(out, (), dtype, device, remote)
    on_disk = float((logits(reloaded, tokenizer, prompts) - reference).abs().max())
    # A bf16/fp16 copy rounds every weight: its bound is the dtype's, not float32's.
    disk_tolerance = cfg.tolerance if cfg.dtype == "float32" else cfg.low_precision_tolerance
    if on_disk > disk_tolerance:
        raise QatuneError(
            f"merge: the saved {cfg.dtype} model's logits differ from the adapter's by {on_disk:.2e} "
            f"(tolerance {disk_tolerance})"
        )
    metrics = {
        "device": device,
        "dtype": cfg.dtype,
        "prompts": len(prompts),
        "tokens": int(reference.shape[0]),
        "max_abs_logit_diff_in_memory": in_memory,
        "max_abs_logit_diff_saved": on_disk,
        "tolerance": tolerance,
        "saved_tolerance": disk_tolerance,
        "size_mb": round(sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e6, 1),
        "memory_plan": memory.record(),
        **hardware.peak_memory_gb(),  # beside the plan: what it really took
    }
    write_json(args.metrics, metrics)
    adapter_prov = Path(args.adapter) / PROVENANCE_FILE
    write_provenance(
        out,
        {
            "stage": "merge",
            "params": params.model_dump(include={"merge"}),
            "adapter": args.adapter,
            "adapter_provenance": json.loads(adapter_prov.read_text()) if adapter_prov.is_file() else None,
            "git_commit": git_commit(),
            "metrics": metrics,
        },
    )
    print(f"merge: {cfg.dtype}, max |logit diff| {in_memory:.2e} in memory, {on_disk:.2e} saved -> {out}")


if __name__ == "__main__":
    main()
