"""export: the merged model as GGUF files for llama.cpp, Ollama and LM Studio, each verified by llama.cpp.

    python stages/export.py --params params.yaml --merged models/merged --out models/gguf \
        --metrics metrics/export.json

Reads `export`, `generate` and `train.system_prompt`, `train.enable_thinking`, `train.trust_remote_code`.
Offline. llama.cpp's converter writes the 16-bit file, its quantiser the others (qatune.export). Then each
file is loaded by llama.cpp and scored on the demo questions: the merged model answers greedily in
transformers, and both score the same token ids. Per file metrics/export.json records the size, the mean and
largest |log-prob difference| of the answer tokens, how often the most likely next token agrees, whether
llama.cpp's tokenizer gives the same ids, whether its own greedy answer is the same, and its tokens/s. A file
over `export.tolerance` fails the stage in one line. models/gguf also gets an Ollama Modelfile (the model's
own chat template as a Go TEMPLATE, the system prompt and the `generate` defaults). A model family the
converter does not support is said in one line and leaves a note instead of files; the stage succeeds.
Every answer, in transformers and in llama.cpp, ends at the tokens qatune.generation.stop_tokens finds (the
chat template's end-of-turn token and the eos tokens); the Modelfile lists them as `PARAMETER stop`.
One multi-turn conversation rendered by the training template, the merged tokenizer, the GGUF's own template
(as llama-cpp-python and `qatune serve --mode gguf` apply it) and the Modelfile TEMPLATE must give the same
prompt token ids, each stopping at every end-of-turn token (qatune.prompts); metrics/export.json records it
under `template`, and a mismatch fails the stage in one line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from qatune import export, modeling
from qatune.demo import demo_rows
from qatune.errors import QatuneError, fail_cleanly, require
from qatune.generation import StopTokens, stop_tokens
from qatune.hardware import peak_memory_gb
from qatune.io import write_json
from qatune.llama_cpp import gguf_name, llama_cpp_module, stderr_to
from qatune.params import Params, load_params
from qatune.prompts import check_template
from qatune.templates import conversation, template_kwargs, use_training_template

NOTE = "NOT_EXPORTED.txt"


def reference(params: Params, merged_dir: str):
    """The merged model (float32, CPU) answers the check questions greedily; its log-probabilities of
    those answers, token by token, are what every GGUF is compared with."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = params.export
    model, tokenizer = modeling.load_with_adapters(
        merged_dir, (), "float32", "cpu", params.train.trust_remote_code
    )
    kwargs = template_kwargs(tokenizer.chat_template, params.train.enable_thinking)
    stops = stop_tokens(tokenizer, model.generation_config, kwargs)
    texts, ids, starts, logprobs, top1, answers = [], [], [], [], [], []
    generated = elapsed = 0
    for row in demo_rows(cfg.check_prompts, params.domain.demo_questions):
        messages = conversation(row, params.train.system_prompt)
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=cfg.check_new_tokens,
                do_sample=False,
                eos_token_id=stops.ids,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )[0].tolist()
        elapsed += time.perf_counter() - start
        answer = out[len(prompt_ids) :]
        generated += len(answer)
        with torch.inference_mode():
            logits = model(torch.tensor([out])).logits[0, len(prompt_ids) - 1 : -1].float()
        lp = torch.log_softmax(logits, dim=-1)
        logprobs.append(lp.gather(1, torch.tensor(answer)[:, None])[:, 0].numpy())
        top1.append(lp.argmax(dim=-1).numpy())
        texts.append(prompt)
        ids.append(out)
        starts.append(len(prompt_ids))
        answers.append(answer)
    ref = export.Reference(ids=ids, answer_start=starts, logprobs=logprobs, top1=top1)
    speed = round(generated / elapsed, 1) if elapsed else None
    return ref, tokenizer, kwargs, texts, answers, speed, stops


def check_file(
    path: Path, ref, texts: list[str], answers: list[list[int]], threads: int, stops: StopTokens
) -> dict:
    """Load one GGUF with llama.cpp and measure it against the merged model; llama.cpp's greedy answer
    stops at its end-of-generation tokens or at `stops`' texts, and leaves the stop token out."""
    llama_cpp = llama_cpp_module()
    n_ctx = max(len(ids) for ids in ref.ids) + 16
    with stderr_to(path.parent / "llama.log"):
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=threads, verbose=False, seed=0
        )
    row = {"file": path.name, "bytes": path.stat().st_size}
    row.update(export.compare(llm, ref))
    same_tokens = same_answers = generated = 0
    elapsed = 0.0
    for text, ids, start, answer in zip(texts, ref.ids, ref.answer_start, answers, strict=True):
        same_tokens += llm.tokenize(text.encode(), add_bos=False, special=True) == ids[:start]
        llm.reset()
        began = time.perf_counter()
        out = llm.create_completion(
            ids[:start],
            max_tokens=len(answer) or 1,
            temperature=0.0,
            repeat_penalty=1.0,
            top_k=1,
            stop=stops.texts,
        )
        elapsed += time.perf_counter() - began
        got = llm.tokenize(out["choices"][0]["text"].encode(), add_bos=False, special=True)
        generated += out["usage"]["completion_tokens"]
        same_answers += got == [t for t in answer if t not in stops.ids]
    row["same_tokenization"] = f"{same_tokens}/{len(texts)}"
    row["same_greedy_answer"] = f"{same_answers}/{len(texts)}"
    row["tokens_per_s"] = round(generated / elapsed, 1) if elapsed else None
    llm.close()
    return row


def template_check(params: Params, merged_dir: str, gguf: Path, modelfile_template: str) -> dict:
    """One multi-turn conversation through the training template, the merged tokenizer, the GGUF's own
    template in llama-cpp-python and the Modelfile TEMPLATE: the same prompt ids and stop tokens
    (qatune.prompts.check_template), so the model is asked the way it was trained wherever it runs."""
    import copy

    from transformers import AutoTokenizer, GenerationConfig

    merged = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=params.train.trust_remote_code)
    training = copy.deepcopy(merged)
    use_training_template(training, params.train.enable_thinking)
    kwargs = template_kwargs(merged.chat_template, params.train.enable_thinking)
    try:
        config = GenerationConfig.from_pretrained(merged_dir)
    except OSError:  # no generation_config.json: the tokenizer's eos alone
        config = None
    with stderr_to(gguf.parent / "llama.log"):
        llm = llama_cpp_module().Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    system = params.train.system_prompt
    record = check_template(training, merged, llm, kwargs, config, modelfile_template, system)
    llm.close()
    return {"gguf": gguf.name, **record}


def skip(out: Path, metrics_file: str, reason: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / NOTE).write_text(f"No GGUF files: {reason}\n", encoding="utf-8")
    write_json(metrics_file, {"enabled": False, "skipped": reason, "files": []})
    print(f"export: skipped, {reason}")


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml", help="params file to read")
    parser.add_argument("--merged", default="models/merged", help="merged model folder from the merge stage")
    parser.add_argument("--out", default="models/gguf", help="GGUF files and the Ollama Modelfile")
    parser.add_argument(
        "--metrics", default="metrics/export.json", help="sizes, agreement and speed per file"
    )
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = params.export
    require(args.merged, "merged model")
    began = time.perf_counter()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    if not cfg.enabled:
        return skip(out, args.metrics, "export.enabled is false")
    out.mkdir(parents=True)
    threads = cfg.threads or os.cpu_count() or 1
    source_type = export.source_type(cfg.quantizations)
    source = out / gguf_name(source_type)
    try:
        export.convert(Path(args.merged), source, source_type, out / "convert.log")
    except export.Unsupported as err:
        source.unlink(missing_ok=True)
        return skip(out, args.metrics, f"llama.cpp's converter does not support this model: {err}")
    for quant in cfg.quantizations:
        if quant not in export.CONVERTER_TYPES:
            export.quantize(source, out / gguf_name(quant), quant, threads, out / "quantize.log")
    if source_type not in cfg.quantizations:
        source.unlink()  # only the working file for the quantiser

    ref, tokenizer, kwargs, texts, answers, merged_speed, stops = reference(params, args.merged)
    files, failures = [], []
    for quant in cfg.quantizations:
        checked = check_file(out / gguf_name(quant), ref, texts, answers, threads, stops)
        row = {"quant": quant, **checked}
        row["tolerance"] = cfg.tolerance[quant]
        files.append(row)
        if row["mean_abs_logprob_diff"] > cfg.tolerance[quant]:
            failures.append(
                f"{row['file']}: mean |log-prob diff| {row['mean_abs_logprob_diff']:.4f} vs the merged model "
                f"is over export.tolerance.{quant} = {cfg.tolerance[quant]}"
            )

    system = params.train.system_prompt
    template = export.ollama_template(tokenizer, kwargs, has_system=bool(system))
    (out / "Modelfile").write_text(
        export.modelfile(gguf_name(cfg.modelfile_quant), template, stops, system, params.generate),
        encoding="utf-8",
    )
    checked = template_check(params, args.merged, out / gguf_name(cfg.modelfile_quant), template)
    if not checked["ok"]:
        failures.append("chat template: " + "; ".join(checked["problems"]))
    merged_bytes = sum(p.stat().st_size for p in Path(args.merged).glob("*.safetensors"))
    metrics = {
        "enabled": True,
        "skipped": None,
        "converter": f"llama.cpp via llama-cpp-python {llama_cpp_module().__version__}",
        "check_prompts": len(texts),
        "check_tokens": sum(len(a) for a in answers),
        "merged_bytes": merged_bytes,
        "merged_tokens_per_s": merged_speed,  # transformers, float32, same greedy answers
        "files": files,
        "modelfile": "Modelfile",
        "template": checked,
        "wall_s": round(time.perf_counter() - began, 1),
        **peak_memory_gb(),
    }
    write_json(args.metrics, metrics)
    if failures:
        raise QatuneError("export: " + "; ".join(failures))
    summary = ", ".join(
        f"{r['quant']} {r['bytes'] / 1e6:.0f} MB |dlogp| {r['mean_abs_logprob_diff']:.3f} "
        f"top1 {r['top1_agreement']:.2f} {r['tokens_per_s']} tok/s"
        for r in files
    )
    print(f"export: {summary} (merged: {merged_bytes / 1e6:.0f} MB, {merged_speed} tok/s) -> {out}")


if __name__ == "__main__":
    main()
