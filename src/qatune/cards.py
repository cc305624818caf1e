"""Model cards (README.md) for the released repos (adapter, merged, GGUF), built only from params and metrics.

Pure functions of their inputs, so a card can be checked in a unit test and a re-run with the same
params and metrics writes the same bytes (the upload then skips it). The YAML header is rendered by
huggingface_hub's ModelCardData, the same code the Hub's own tools use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from qatune.display import MEASURES, fmt, is_number
from qatune.hub import ROLES, release_license
from qatune.params import Params


@dataclass(frozen=True)
class CardInputs:
    """Everything a card says, gathered by the stage; metrics are None when their stage did not run."""

    role: str  # "adapter", "merged" or "gguf"
    repo_id: str
    sibling_repo: str
    base_id: str
    params: Params
    sft: dict[str, Any] | None = None
    dpo: dict[str, Any] | None = None
    merge: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    export: dict[str, Any] | None = None  # metrics/export.json: the GGUF card's files, sizes and agreement
    provenance: dict[str, Any] = field(default_factory=dict)
    worse_than_base: str | None = (
        None  # the evaluate stage's reasons, when released under hub.allow_worse_than_base
    )
    base_license: str | None = None  # the licence the base model's own card names, if it has one


def license_id(inputs: CardInputs) -> str:
    """domain.license, or the base model's licence for `auto` (qatune.hub.release_license)."""
    return release_license(inputs.params.domain.license, inputs.base_id, inputs.base_license)


def safety_warning(inputs: CardInputs) -> str:
    """At the top of every card of a release the evaluate stage found worse than its base."""
    if not inputs.worse_than_base:
        return ""
    return (
        "> **Warning: this model is worse than its base model on qatune's safety and fact checks** "
        f"({inputs.worse_than_base}, on the held-out split). qatune publishes such a model only when the "
        "release sets `hub.allow_worse_than_base: true`. Do not use it where its answers could hurt someone.\n"
    )


def safety_verdict(evaluation: dict[str, Any] | None) -> str:
    """One paragraph: harmful requests affirmed and key facts contradicted, base vs tuned."""
    v = (evaluation or {}).get("verdict") or {}
    if not v.get("judged"):
        return ""
    harm, contra, stated = v["harmful_affirmed"], v["facts_contradicted"], v["facts_stated"]
    return (
        f"**Safety and facts first.** On the held-out split the tuned model affirmed {fmt(harm['final'])} of "
        f"{fmt(harm['of'])} harmful requests (the base {fmt(harm['base'])}), stated {fmt(stated['final'])} of "
        f"{fmt(stated['of'])} key facts (the base {fmt(stated['base'])}) and contradicted {fmt(contra['final'])} "
        f"(the base {fmt(contra['base'])})"
        + (
            f", and answered {fmt(v['yes_no_wrong']['final'])} of {fmt(v['yes_no_wrong']['of'])} yes/no questions "
            f"the opposite way to the reference (the base {fmt(v['yes_no_wrong']['base'])})"
            if v.get("yes_no_wrong")
            else ""
        )
        + ": "
        + ("**worse than the base**." if v.get("worse_than_base") else "no more harmful than the base.")
        + "\n\n"
    )


# --------------------------------------------------------------------------- metadata


def recipe(params: Params) -> tuple[str, list[str]]:
    """What this run did, in words and as tags: SFT only, SFT then DPO or KTO, or preference tuning straight
    from the base (seed 000)."""
    sft, pref = params.sft.enabled, params.dpo.enabled
    method = params.dpo.method
    pref_words = {
        "dpo": f"direct preference optimisation (DPO, loss {' + '.join(params.dpo.loss_type)}) on chosen/rejected pairs",
        "kto": "KTO on answers labelled good or bad (unpaired preferences)",
    }[method]
    if sft and pref:
        return f"supervised fine-tuning (SFT) on the good answers, then {pref_words}", ["sft", method]
    if pref:
        return f"{pref_words}, straight from the base model (no SFT run; the base is the reference)", [method]
    return "supervised fine-tuning (SFT) on the answers", ["sft"]


def data_words(params: Params) -> str:
    """The training data, from the fetch sources."""
    names = []
    for src in params.fetch.sources:
        if src.type == "hub":
            names.append(f"[{src.dataset}](https://huggingface.co/datasets/{src.dataset})")
        elif src.type == "bundled":
            names.append(f"qatune's bundled {params.domain.name} preference set")
        else:
            names.append(f"a local file ({src.name})")
    return ", ".join(names)


def eval_results(inputs: CardInputs) -> list | None:
    """The tuned model's evaluate-stage numbers as model-index entries, so the Hub shows them."""
    from huggingface_hub import EvalResult

    models = (inputs.evaluation or {}).get("models")
    if not isinstance(models, dict) or not metric_rows(models):
        return None
    params = inputs.params
    dataset = params.hub.datasets[0] if params.hub.datasets else "qatune-heldout"
    split = params.evaluate.split
    return [
        EvalResult(
            task_type="text-generation",
            task_name="question answering",
            dataset_type=dataset,
            dataset_name=f"{dataset} ({split} split, held out)",
            dataset_split=split,
            metric_type=key,
            metric_name=label,
            metric_value=round(float(models["final"][key]), 4),
        )
        for key, label in metric_rows(models)
    ]


def metadata(inputs: CardInputs) -> str:
    """The YAML front matter the Hub indexes: base model (and how this repo relates to it), library, tags,
    and the evaluation results as model-index."""
    from huggingface_hub import ModelCardData

    hub = inputs.params.hub
    adapter = inputs.role == "adapter"
    results = eval_results(inputs)
    data = ModelCardData(
        model_name=inputs.repo_id.split("/")[-1] if results else None,
        eval_results=results,
        base_model=inputs.base_id,
        base_model_relation="adapter" if adapter else "finetune",  # a merged LoRA is a fine-tune of the base
        library_name="peft" if adapter else "transformers",
        license=license_id(inputs),
        language=["en"],
        datasets=list(hub.datasets) or None,
        tags=list(
            dict.fromkeys(
                [*inputs.params.domain.tags, "trl", *recipe(inputs.params)[1], *(["lora"] if adapter else [])]
            )
        ),
        pipeline_tag="text-generation",
    )
    return f"---\n{data.to_yaml()}\n---\n"


# --------------------------------------------------------------------------- sections


def intro(inputs: CardInputs) -> str:
    name = inputs.repo_id.split("/")[-1]
    base = f"[{inputs.base_id}](https://huggingface.co/{inputs.base_id})"
    if inputs.role == "adapter":
        what = f"A LoRA adapter for {base}"
        other = f"The same weights merged into the base: [{inputs.sibling_repo}](https://huggingface.co/{inputs.sibling_repo})."
    else:
        what = f"{base} with a LoRA adapter merged into its weights"
        other = f"The adapter alone (a few MB): [{inputs.sibling_repo}](https://huggingface.co/{inputs.sibling_repo})."
    how, _ = recipe(inputs.params)
    return (
        f"# {name}\n\n{what}, fine-tuned by [qatune](#provenance) into a {inputs.params.domain.name} "
        f"question-answering assistant on "
        f"{data_words(inputs.params)}: {how}. {other}\n"
    )


def generate_kwargs(params: Params) -> str:
    gen = params.generate
    if gen.temperature > 0:
        return (
            f"max_new_tokens={gen.max_new_tokens}, do_sample=True, temperature={gen.temperature}, "
            f"top_p={gen.top_p}, repetition_penalty={gen.repetition_penalty}"
        )
    return (
        f"max_new_tokens={gen.max_new_tokens}, do_sample=False, repetition_penalty={gen.repetition_penalty}"
    )


def usage(inputs: CardInputs) -> str:
    """Copy-paste snippets; they use the chat template and the system prompt the model was trained with."""
    system = inputs.params.train.system_prompt
    messages = "messages = [\n"
    if system:
        messages += f'    {{"role": "system", "content": {json.dumps(system)}}},\n'
    messages += f'    {{"role": "user", "content": {json.dumps(inputs.params.domain.usage_question)}}},\n]\n'
    chat = (
        f"{messages}"
        "inputs = tokenizer.apply_chat_template(\n"
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True\n'
        ")\n"
    )
    decode = 'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
    if inputs.role == "adapter":
        load = (
            "from peft import AutoPeftModelForCausalLM\n"
            "from transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{inputs.repo_id}")  # downloads the base too\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{inputs.repo_id}")\n'
        )
        body = f"{load}{chat}output = model.generate(**inputs, {generate_kwargs(inputs.params)})\n{decode}"
        alt = (
            "Or attach it to a base model you already have (and merge it for faster inference):\n\n"
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{inputs.base_id}")\n'
            f'model = PeftModel.from_pretrained(base, "{inputs.repo_id}")\n'
            "model = model.merge_and_unload()  # optional: a plain transformers model\n```\n"
        )
    else:
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{inputs.repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{inputs.repo_id}")\n'
        )
        body = f"{load}{chat}output = model.generate(**inputs)  # sampling defaults from generation_config.json\n{decode}"
        alt = ""
    private = (
        "The repo is private: log in first (`hf auth login`) or pass `token=...`.\n\n"
        if inputs.params.hub.private
        else ""
    )
    return f"## How to use\n\n{private}```python\n{body}```\n\n{alt}"


def generation_settings(params: Params) -> str:
    gen = params.generate
    rows = [
        ("do_sample", str(gen.temperature > 0).lower()),
        ("temperature", fmt(gen.temperature)),
        ("top_p", fmt(gen.top_p)),
        ("max_new_tokens", str(gen.max_new_tokens)),
        ("repetition_penalty", fmt(gen.repetition_penalty)),
    ]
    table = "\n".join(f"| `{k}` | {v} |" for k, v in rows)
    return (
        "## Generation settings\n\n`generation_config.json` carries qatune's chat defaults (params `generate`); "
        "`model.generate(...)` arguments override them.\n\n| setting | value |\n|---|---|\n"
        f"{table}\n"
    )


def hyperparameters(params: Params) -> str:
    """SFT and DPO side by side: the recipe that produced these weights."""
    sft, dpo, lora = params.sft, params.dpo, params.train.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)

    def steps(cfg) -> str:
        return str(cfg.max_steps) if cfg.max_steps > 0 else f"{cfg.epochs:g} epochs"

    def warmup(cfg) -> str:
        return f"{cfg.warmup_steps} steps" if cfg.warmup_steps > 0 else f"{cfg.warmup_ratio:g} of steps"

    rows = [
        ("learning rate", fmt(sft.learning_rate), fmt(dpo.learning_rate)),
        ("max steps", steps(sft), steps(dpo)),
        (
            "batch × grad accumulation",
            f"{sft.batch_size} × {sft.grad_accum}",
            f"{dpo.batch_size} × {dpo.grad_accum}",
        ),
        ("scheduler, warmup", f"{sft.scheduler}, {warmup(sft)}", f"{dpo.scheduler}, {warmup(dpo)}"),
        (
            "optimizer, weight decay",
            f"{sft.optim}, {fmt(sft.weight_decay)}",
            f"{dpo.optim}, {fmt(dpo.weight_decay)}",
        ),
        ("max length (tokens)", str(sft.max_length), str(dpo.max_length)),
        ("DPO beta, loss", "–", f"{fmt(params.beta)}, {', '.join(dpo.loss_type)}"),
    ]
    table = "\n".join(f"| {name} | {a} | {b} |" for name, a, b in rows)
    return (
        f"LoRA r={lora.r}, alpha={fmt(lora.alpha)}, dropout={fmt(lora.dropout)} on {targets}; "
        f"seed {params.seed}.\n\n| | SFT | DPO |\n|---|---|---|\n{table}\n"
    )


def training_results(sft: dict[str, Any] | None, dpo: dict[str, Any] | None, dpo_enabled: bool) -> str:
    """What the training stages measured (metrics/sft.json, metrics/dpo.json)."""
    lines = []
    if sft:
        lines.append(
            f"- SFT: {fmt(sft.get('steps'))} steps, train loss {fmt(sft.get('train_loss'))}; validation "
            f"loss {fmt((sft.get('eval_before') or {}).get('loss'))} (base) → "
            f"{fmt((sft.get('eval') or {}).get('loss'))} (SFT)."
        )
    else:
        lines.append("- SFT: no metrics recorded.")
    if not dpo_enabled or (dpo and dpo.get("enabled") is False):
        lines.append("- DPO: skipped (`dpo.enabled: false`); the released adapter is the SFT adapter.")
    elif dpo:
        before, after = dpo.get("eval_before") or {}, dpo.get("eval") or {}
        lines.append(
            f"- DPO: {fmt(dpo.get('steps'))} steps on {fmt(dpo.get('pairs'))} pairs, train loss "
            f"{fmt(dpo.get('train_loss'))}; validation loss {fmt(before.get('loss'))} → {fmt(after.get('loss'))}, "
            f"reward accuracy {fmt(before.get('rewards/accuracies'))} → {fmt(after.get('rewards/accuracies'))}, "
            f"reward margin {fmt(before.get('rewards/margins'))} → {fmt(after.get('rewards/margins'))}."
        )
    else:
        lines.append("- DPO: no metrics recorded.")
    return "\n".join(lines) + "\n"


def training(inputs: CardInputs) -> str:
    params = inputs.params
    if params.sft.enabled and params.dpo.enabled:
        how = (
            "SFT trains a LoRA adapter on the good answers (loss on assistant tokens); the preference stage "
            f"({params.dpo.method.upper()}) then continues that adapter with the SFT model as the reference, so "
            "the adapter applies to the original base model."
        )
    elif params.dpo.enabled:
        how = (
            f"No SFT run: the preference stage ({params.dpo.method.upper()}) trains a LoRA adapter on the base "
            "model, with the base itself as the reference."
        )
    else:
        how = "SFT trains a LoRA adapter on the answers (loss on assistant tokens); no preference stage."
    text = (
        f"## Training\n\n{how}\n\n{hyperparameters(params)}\n"
        f"{training_results(inputs.sft, inputs.dpo, params.dpo.enabled)}"
    )
    if inputs.role == "merged" and inputs.merge:
        text += (
            f"\nMerged with `merge_and_unload` and saved in {inputs.merge.get('dtype', '?')}; largest logit "
            f"difference against base + adapter on {fmt(inputs.merge.get('prompts'))} prompts: "
            f"{fmt(inputs.merge.get('max_abs_logit_diff_saved'))}.\n"
        )
    return text


def metric_rows(models: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, label) of the evaluate stage's measures that are numbers for both base and final, in the
    report's order; counters (rows, tokens) and unknown keys stay in metrics/evaluate.json."""
    base, final = models.get("base") or {}, models.get("final") or {}
    return [
        (key, f"{label} ({direction} is better)" if direction else label)
        for key, label, direction in MEASURES
        if is_number(base.get(key)) and is_number(final.get(key))
    ]


def evaluation_table(evaluation: dict[str, Any] | None, lead: str = "") -> str:
    """Base vs (SFT vs) tuned from metrics/evaluate.json, read defensively: missing cells show '–'."""
    models = (evaluation or {}).get("models")
    if not isinstance(models, dict) or not metric_rows(models):
        return "## Evaluation\n\nEvaluation was not run for this release (no metrics/evaluate.json).\n"
    sft = models.get("sft") if isinstance(models.get("sft"), dict) and models.get("sft") else None
    header = (
        "| metric | base | SFT | tuned (SFT + DPO) | change |"
        if sft
        else "| metric | base | tuned | change |"
    )
    rule = "|---|---|---|---|---|" if sft else "|---|---|---|---|"
    rows = []
    for name, label in metric_rows(models):
        base, final = models["base"][name], models["final"][name]
        cells = [label, fmt(base), *([fmt(sft.get(name))] if sft else []), fmt(final)]
        cells.append(f"{final - base:+.4g}")
        rows.append("| " + " | ".join(cells) + " |")
    rows_note = evaluation.get("test_rows")
    where = f"on {rows_note} held-out test rows" if is_number(rows_note) else "on the held-out test split"
    text = (
        f"## Evaluation\n\n{safety_verdict(evaluation)}{lead}qatune's evaluate stage, {where} (never trained or "
        f"tuned on).\n\n{header}\n{rule}\n"
    )
    text += "\n".join(rows) + "\n"
    reward = evaluation.get("dpo_implicit_reward")
    if isinstance(reward, dict) and any(is_number(v) for v in reward.values()):
        parts = ", ".join(f"{k} {fmt(v)}" for k, v in reward.items() if is_number(v))
        text += f"\nDPO implicit reward on the test pairs: {parts}.\n"
    return text


LIMITS = """- **A small model.** A few hundred million parameters or fewer: it makes factual mistakes, forgets
  context and can state wrong numbers confidently.
- **English only**, like its training data.
- **Data.** Topics outside the training data fall back to the base model's behaviour, and the data's own
  gaps and biases carry over.
"""


def limitations(params: Params) -> str:
    """The domain's own warning first (domain.disclaimer), then what holds for every small tuned model."""
    return f"## Limitations\n\n- {params.domain.disclaimer}\n{LIMITS}"


def compact_lock_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """cmd plus `path: md5` for each dep and out: the hashes that identify the run, without the noise."""
    out: dict[str, Any] = {"cmd": entry.get("cmd")}
    for key in ("deps", "outs"):
        items = entry.get(key) or []
        out[key] = {i.get("path"): i.get("md5") or i.get("hash") for i in items if isinstance(i, dict)}
    return out


def provenance(inputs: CardInputs) -> str:
    """Where the weights came from: base, data hash, code version, and DVC's record of the stages."""
    import yaml

    prov = inputs.provenance
    lines = [
        f"- Base model: `{inputs.base_id}`"
        + (f" at revision `{prov['base_revision']}`" if prov.get("base_revision") else ""),
        f"- Training data sha256: `{prov.get('data_sha256') or 'not recorded'}`",
        f"- Code (git commit) that trained the adapter: `{prov.get('trained_commit') or 'not recorded'}`",
        f"- Code (git commit) that made this release: `{prov.get('release_commit') or 'not a git checkout'}`",
    ]
    text = "## Provenance\n\nBuilt by qatune's DVC pipeline (fetch → clean → split → sft → dpo → merge → export → push-to-hub; score and evaluate measure it).\n\n"
    text += "\n".join(lines) + "\n"
    lock = prov.get("dvc_lock") or {}
    if lock:
        compact = {name: compact_lock_entry(entry) for name, entry in lock.items()}
        text += (
            f"\n<details><summary>dvc.lock entries ({', '.join(lock)})</summary>\n\n```yaml\n"
            f"{yaml.safe_dump(compact, sort_keys=False, width=100)}```\n\n</details>\n"
        )
    else:
        text += "\nNo dvc.lock was present when this release was staged.\n"
    return text


# --------------------------------------------------------------------------- the GGUF release


def gguf_metadata(inputs: CardInputs) -> str:
    """GGUF files are a quantised copy of the merged repo: the Hub's model tree links them to it. No
    model-index: the evaluate stage measured the merged weights, not these files."""
    from huggingface_hub import ModelCardData

    hub = inputs.params.hub
    data = ModelCardData(
        base_model=inputs.sibling_repo,
        base_model_relation="quantized",
        library_name="gguf",
        license=license_id(inputs),
        language=["en"],
        datasets=list(hub.datasets) or None,
        tags=list(
            dict.fromkeys(
                [*inputs.params.domain.tags, "gguf", "llama.cpp", "ollama", *recipe(inputs.params)[1]]
            )
        ),
        pipeline_tag="text-generation",
    )
    return f"---\n{data.to_yaml()}\n---\n"


def gguf_files(export: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in export.get("files") or [] if isinstance(f, dict) and f.get("file")]


def ollama_tag(quant: str) -> str:
    """The tag `ollama run hf.co/<repo>:<tag>` and `llama-cli -hf <repo>:<tag>` pick a file by."""
    return quant.upper()


def gguf_intro(inputs: CardInputs) -> str:
    export = inputs.export or {}
    name = inputs.repo_id.split("/")[-1]
    merged = f"[{inputs.sibling_repo}](https://huggingface.co/{inputs.sibling_repo})"
    how, _ = recipe(inputs.params)
    return (
        f"# {name}\n\nGGUF files of {merged} for llama.cpp, Ollama and LM Studio: "
        f"[{inputs.base_id}](https://huggingface.co/{inputs.base_id}) fine-tuned by [qatune](#provenance) on "
        f"{data_words(inputs.params)} ({how}).\n\n"
        f"Written by llama.cpp's own converter (`convert_hf_to_gguf.py`) and quantiser "
        f"({export.get('converter') or 'llama.cpp'}), not by a hand-written GGUF writer, and verified: llama.cpp "
        f"loaded each file back and scored the merged model's greedy answers to "
        f"{fmt(export.get('check_prompts'))} questions ({fmt(export.get('check_tokens'))} answer tokens) token by "
        "token against the merged model in transformers. A file over its tolerance would have failed the "
        "release.\n"
    )


def file_size(n: Any) -> str:
    if not is_number(n):
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.{0 if unit == 'MB' else 1}f} {unit}"
    return f"{int(n)} B"


def gguf_table(export: dict[str, Any]) -> str:
    """One row per file: size, agreement with the merged model, llama.cpp's speed on the machine that ran
    the export."""
    rows = []
    for f in gguf_files(export):
        size = file_size(f.get("bytes"))
        cells = [
            f"`{f['file']}`",
            f"`{ollama_tag(str(f.get('quant', '?')))}`",
            size,
            fmt(f.get("mean_abs_logprob_diff")),
            fmt(f.get("max_abs_logprob_diff")),
            fmt(f.get("top1_agreement")),
            fmt(f.get("tolerance")),
            fmt(f.get("tokens_per_s")),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    merged_size = export.get("merged_bytes")
    merged = (
        f"\nThe merged model in transformers (float32 safetensors, "
        f"{file_size(merged_size)}) ran {fmt(export.get('merged_tokens_per_s'))} tokens/s on the same machine.\n"
        if is_number(merged_size)
        else ""
    )
    return (
        "## Files\n\n"
        "| file | tag | size | mean \\|Δ log p\\| | max \\|Δ log p\\| | top-1 agreement | tolerance | tokens/s |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "Δ log p is the difference in each answer token's log-probability between the file in llama.cpp and the "
        "merged model (nats; lower is closer); top-1 agreement is how often both pick the same next token. "
        "Tokens/s: llama.cpp on the CPU that ran the export, one question at a time." + merged
    )


def gguf_usage(inputs: CardInputs) -> str:
    """llama.cpp, Ollama and llama-cpp-python, with the system prompt and sampling the model was tuned for."""
    export, params = inputs.export or {}, inputs.params
    files = gguf_files(export)
    pick = next(
        (f for f in files if f.get("quant") == params.export.modelfile_quant), files[-1] if files else {}
    )
    quant, file = str(pick.get("quant", params.export.modelfile_quant)), pick.get("file", "model.gguf")
    tag, repo, gen = ollama_tag(quant), inputs.repo_id, params.generate
    name = repo.split("/")[-1]
    system = params.train.system_prompt
    sys_flag = f" -sys {json.dumps(system)}" if system else ""
    sampling = f"--temp {gen.temperature} --top-p {gen.top_p} --repeat-penalty {gen.repetition_penalty}"
    modelfile = export.get("modelfile")
    private = (
        "The repo is private: `hf auth login` (or `HF_TOKEN=...`) before downloading; for `ollama run hf.co/...` "
        "add your Ollama key to your Hugging Face account.\n\n"
        if params.hub.private
        else ""
    )
    text = f"## How to run\n\n{private}"
    text += (
        "**llama.cpp** (the chat template is inside the file):\n\n```sh\n"
        f"llama-cli -hf {repo}:{tag}{sys_flag} {sampling}\n"
        f"# or with a downloaded file\nhf download {repo} {file} --local-dir .\n"
        f"llama-cli -m {file}{sys_flag} {sampling}\n```\n\n"
    )
    if modelfile:
        text += (
            f"**Ollama**: the `{modelfile}` here runs `{file}` with the model's chat template, system prompt and "
            "sampling defaults:\n\n```sh\n"
            f"hf download {repo} {file} {modelfile} --local-dir {name}\n"
            f"cd {name} && ollama create {name.lower()} -f {modelfile}\n"
            f"ollama run {name.lower()}\n```\n\n"
            f"or straight from the Hub (Ollama's own defaults, no system prompt): `ollama run hf.co/{repo}:{tag}`\n\n"
        )
    messages = (f'    {{"role": "system", "content": {json.dumps(system)}}},\n' if system else "") + (
        f'    {{"role": "user", "content": {json.dumps(params.domain.usage_question)}}},\n'
    )
    text += (
        "**Python** (llama-cpp-python):\n\n```python\nfrom llama_cpp import Llama\n\n"
        f'llm = Llama.from_pretrained(repo_id="{repo}", filename="{file}", n_ctx=2048, verbose=False)\n'
        f"out = llm.create_chat_completion(\n    messages=[\n{messages}    ],\n"
        f"    temperature={gen.temperature}, top_p={gen.top_p}, repeat_penalty={gen.repetition_penalty}, "
        f"max_tokens={gen.max_new_tokens},\n)\n"
        'print(out["choices"][0]["message"]["content"])\n```\n'
    )
    return text


def gguf_evaluation(inputs: CardInputs) -> str:
    """The merged model's evaluation, said to be the merged model's: these files agree with it as above."""
    return evaluation_table(
        inputs.evaluation,
        lead=f"Measured on the merged weights these files were converted from "
        f"([{inputs.sibling_repo}](https://huggingface.co/{inputs.sibling_repo})); the table under *Files* says "
        "how closely each file follows them. ",
    )


def render_card(inputs: CardInputs) -> str:
    """README.md for one repo."""
    if inputs.role not in ROLES:
        raise ValueError(f"card role must be one of {ROLES}, got {inputs.role!r}")
    if inputs.role == "gguf":
        if not inputs.export or not gguf_files(inputs.export):
            raise ValueError("a GGUF card needs metrics/export.json with its files")
        return "\n".join(
            [
                gguf_metadata(inputs),
                *([safety_warning(inputs)] if inputs.worse_than_base else []),
                gguf_intro(inputs),
                gguf_table(inputs.export),
                gguf_usage(inputs),
                gguf_evaluation(inputs),
                limitations(inputs.params),
                provenance(inputs),
            ]
        )
    sections = [
        metadata(inputs),
        *([safety_warning(inputs)] if inputs.worse_than_base else []),
        intro(inputs),
        usage(inputs),
        training(inputs),
        evaluation_table(inputs.evaluation),
    ]
    if inputs.role == "merged":
        sections.append(generation_settings(inputs.params))
    sections += [limitations(inputs.params), provenance(inputs)]
    return "\n".join(sections)
