"""`qatune`: talk to the fine-tuned model.

    qatune ask "How much water should I drink a day?"         # streams the answer to stdout
    qatune ask --mode adapter --temperature 0 "Is it safe to skip breakfast?"
    qatune ask --mode gguf "How long should I rest between sets?"   # the GGUF export, in llama.cpp
    echo "What should I eat before a run?" | qatune ask -
    qatune ask --questions profiles/seed001-questions.txt --output answers.jsonl   # a list, one model load
    qatune chat                                                # Gradio app on http://127.0.0.1:7860
    qatune chat --compare                                      # base vs final side by side; votes -> chat.votes
    qatune serve                                               # OpenAI-compatible API, http://127.0.0.1:8000/v1
    qatune compare                                             # rank DVC experiments on the evaluation's measures
    qatune plan --profile profiles/seed003-mistral-qlora.yaml --gpu-gb 16 24   # each stage's memory plan

Defaults come from params.yaml: `generate` (sampling, merged or adapter mode), `chat` (bind address,
port, input cap, queue, and the device, dtype and adapter every command serves with), `serve` (the API's
address, key variable, queue and size limits) and `train.system_prompt` (the prompt the model was trained
with). Flags override them for one run. `merged` serves models/merged (run `dvc repro merge` first);
`adapter` serves models/base with the LoRA adapter models/dpo on top (or `chat.adapter`: another folder or a
Hub repo id); `gguf` serves the export stage's GGUF in llama.cpp (models/gguf/model-<export.modelfile_quant>.gguf,
as Ollama would; run `dvc repro export` first).

    qatune chat --mode adapter --adapter-dir your-name/your-lora --device cpu --dtype float32   # seed 004's app
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from qatune import inference
from qatune.errors import QatuneError, fail_cleanly
from qatune.io import write_jsonl
from qatune.llama_cpp import gguf_name
from qatune.params import Params, load_params

if TYPE_CHECKING:
    from qatune.hardware import Hardware


def params_run(arch, hw: Hardware, params: Params) -> list:
    """qatune.plan.whole_run for a resolved Params: the blocks each model-loading stage reads."""
    from qatune import plan

    blocks = (
        params.train,
        params.sft,
        params.dpo,
        params.clean,
        params.evaluate,
        params.merge,
        params.export,
    )
    return plan.whole_run(arch, hw, *blocks)


def common_options() -> argparse.ArgumentParser:
    """Options both subcommands take: where the model is and how to sample from it."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file to read (default: params.yaml)")
    common.add_argument(
        "--mode",
        choices=["merged", "adapter", "gguf"],
        help="merged: one merged model folder; adapter: base model + LoRA adapter; gguf: the exported GGUF in "
        "llama.cpp (default: generate.mode)",
    )
    common.add_argument(
        "--model-dir",
        help=f"merged mode: the merged model (default {inference.MERGED_DIR}); "
        f"adapter mode: the base model (default {inference.BASE_DIR}); either a folder or a Hub repo id; "
        "gguf mode: the .gguf file (default models/gguf/model-<export.modelfile_quant>.gguf)",
    )
    common.add_argument(
        "--adapter-dir",
        help="adapter mode: the LoRA adapter, a folder or a Hub repo id (owner/name; HF_HUB_OFFLINE=1: the "
        f"cached snapshot only) (default: chat.adapter, else {inference.ADAPTER_DIR})",
    )
    common.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="auto: cuda when a GPU is visible (default: chat.device)",
    )
    common.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the weights' dtype; auto: bf16 or fp16 on a GPU, float32 on a CPU (default: chat.dtype)",
    )
    common.add_argument("--temperature", type=float, help="0 = greedy (default: generate.temperature)")
    common.add_argument("--top-p", type=float, help="nucleus sampling mass (default: generate.top_p)")
    common.add_argument(
        "--max-new-tokens",
        type=int,
        help="upper bound on answer tokens, lowered if free memory is short (default: generate.max_new_tokens)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qatune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = common_options()
    ask = sub.add_parser("ask", parents=[common], help="answer one question, streamed to stdout")
    ask.add_argument("question", nargs="?", help="the question; '-' reads it from stdin")
    ask.add_argument(
        "--questions",
        help="a file of questions answered in turn: one per line (# comments, blank lines skipped), "
        "a JSON list, or JSON lines with a `question` field",
    )
    ask.add_argument("--output", help="also write {question, answer} JSON lines here")
    chat = sub.add_parser("chat", parents=[common], help="start the Gradio chat app")
    chat.add_argument("--host", help="bind address (default: chat.host, 127.0.0.1 = this machine only)")
    chat.add_argument("--port", type=int, help="port (default: chat.port)")
    chat.add_argument(
        "--share",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a public gradio.live link (default: chat.share, off)",
    )
    chat.add_argument(
        "--compare",
        nargs="*",
        metavar="MODEL",
        help="side by side: two models answer each question on random sides and you vote for the better "
        "answer; none given = the base vs the final model (generate.mode), else two of: a model folder "
        "(merged or base), a LoRA adapter folder (on --model-dir, default models/base), a .gguf file",
    )
    chat.add_argument(
        "--votes", help="--compare: the JSON lines file votes are appended to (default: chat.votes)"
    )
    serve = sub.add_parser(
        "serve", parents=[common], help="serve the model over an OpenAI-compatible HTTP API (qatune.serve)"
    )
    serve.add_argument("--host", help="bind address (default: serve.host, 127.0.0.1 = this machine only)")
    serve.add_argument("--port", type=int, help="port (default: serve.port)")
    compare = sub.add_parser(
        "compare", help="rank DVC experiments on the evaluation's measures, with bootstrap intervals"
    )
    compare.add_argument(
        "exp_show_json", nargs="?", help="a saved `dvc exp show --json` (default: run it in --repo)"
    )
    compare.add_argument(
        "--by",
        default="harmful_affirm_rate",
        help="the measure to rank on, its better direction first: harmful_affirm_rate (default), "
        "safe_stance_rate, fact_contradicted_rate, fact_stated_rate, yes_no_wrong_rate",
    )
    compare.add_argument("--repo", default=".", help="the DVC repository to ask (default: here)")
    compare.add_argument(
        "--exp-show",
        action="store_true",
        help="instead of ranking, run `dvc exp show` led by these measures, then only the params that differ",
    )
    compare.add_argument(
        "--dvc-args", default="", help="--exp-show: more `dvc exp show` options, e.g. --dvc-args=--csv"
    )
    plan = sub.add_parser("plan", help="each model-loading stage's predicted peak memory and device")
    plan.add_argument("--params", default="params.yaml", help="params file to read (default: params.yaml)")
    plan.add_argument(
        "--profile",
        nargs="+",
        default=[],
        help="plan for these profiles (profiles/X.yaml) applied to --params",
    )
    plan.add_argument(
        "--gpu-gb",
        nargs="+",
        type=float,
        default=[],
        help="plan for CUDA cards of these sizes (16 24 40 80) instead of this machine",
    )
    plan.add_argument("--model", default="models/base", help="the fetched base, whose config.json is read")
    return parser


def show_plan(args: argparse.Namespace) -> None:
    """`qatune plan`: the plan of every model-loading stage for each profile on each card (or this machine),
    from the base's config.json, or qatune.plan's table of the seeds' bases before they are fetched."""
    from qatune import hardware, plan, profiles

    runs = [(Path(args.params).stem, load_params(args.params))]
    if args.profile:
        runs = [
            (Path(p).stem, profiles.merged(Path(p).stem, args.params, Path(p).parent)[1])
            for p in args.profile
        ]
    machines = [(f"{gb:g} GB GPU", plan.card(gb)) for gb in args.gpu_gb]
    if not machines:
        hw = plan.machine(hardware.probe())
        gpu = f"{hw.gpu_gb:.0f} GB GPU" if hw.gpu_gb else "no GPU"
        machines = [(f"{hw.device}, {gpu}, {hw.ram_gb:.0f} GB RAM", hw)]
    rows = []
    for name, params in runs:
        arch = plan.load_arch(args.model, params.base_model.source)
        for where, hw in machines:
            plans = params_run(arch, hw, params)
            rows.append((name, where, plans))
            for p in plans if len(runs) * len(machines) == 1 else ():
                print(p.line())
    print(plan.table(rows))


def settings_from(args: argparse.Namespace, params: Params):
    return inference.generation_settings(
        params.generate,
        mode=args.mode,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
    )


def quiet_libraries() -> None:
    """Loading prints progress bars, deprecation notices and (bitsandbytes, imported by peft) a note about
    optional 4-bit kernels that inference never uses: noise around a streamed answer. Errors still show."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def adapter_ref(args: argparse.Namespace, params: Params) -> str:
    """The adapter adapter mode serves: --adapter-dir, else chat.adapter, else this pipeline's."""
    return args.adapter_dir or params.chat.adapter or inference.ADAPTER_DIR


def load(args: argparse.Namespace, params: Params, mode: str) -> inference.Loaded:
    quiet_libraries()
    default_dir = {
        "merged": inference.MERGED_DIR,
        "adapter": inference.BASE_DIR,
        "gguf": f"{inference.GGUF_DIR}/{gguf_name(params.export.modelfile_quant)}",
    }[mode]
    # Folders named by hand may be Hub repo ids; the pipeline's own outputs are always local.
    model_ref, adapter = args.model_dir or default_dir, adapter_ref(args, params)
    model_dir = inference.local_folder(model_ref, "model") if args.model_dir and mode != "gguf" else model_ref
    given = adapter != inference.ADAPTER_DIR and mode == "adapter"
    adapter_dir = inference.local_folder(adapter, "adapter") if given else adapter
    loaded = inference.load_model(
        mode,
        model_dir,
        adapter_dir,
        device=args.device or params.chat.device,
        trust_remote_code=params.train.trust_remote_code,
        enable_thinking=params.train.enable_thinking,
        dtype=args.dtype or params.chat.dtype,
        source=(f"{model_ref} + {adapter}" if mode == "adapter" else model_ref),
    )
    print(f"qatune: {loaded.source} on {loaded.device} ({loaded.dtype})", file=sys.stderr)
    return loaded


def note_cap(requested: int, allowed: int) -> None:
    print(f"qatune: max_new_tokens {requested} -> {allowed} (free memory / context)", file=sys.stderr)


def ask(args: argparse.Namespace, params: Params) -> None:
    """Check the questions before loading anything, then stream each answer as it is generated."""
    if (args.question is None) == (args.questions is None):
        raise QatuneError("ask: give one question, or --questions FILE (not both)")
    if args.questions:
        questions = read_questions(args.questions, params.chat.max_input_chars)
    else:
        raw = sys.stdin.read() if args.question == "-" else args.question
        questions = [inference.check_question(raw, params.chat.max_input_chars)]
    settings = settings_from(args, params)
    loaded = load(args, params, settings.mode)
    answers = []
    for question in questions:
        if len(questions) > 1:
            sys.stdout.write(f"Q: {question}\nA: ")
        messages = inference.build_messages(question, params.train.system_prompt)
        pieces = []
        for piece in inference.stream_answer(loaded, messages, settings, on_cap=note_cap):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n\n" if len(questions) > 1 else "\n")
        answers.append({"question": question, "answer": "".join(pieces).strip()})
    if args.output:
        write_jsonl(args.output, answers)
        print(f"qatune: {len(answers)} answers -> {args.output}", file=sys.stderr)


def read_questions(path: str, max_chars: int) -> list[str]:
    """Questions from a text file (one per line), a JSON list, or JSON lines with a `question` field; a bad
    entry is a one-line error naming the file and line."""
    file = Path(path)
    if not file.is_file():
        raise QatuneError(f"{path}: no such questions file")
    text = file.read_text(encoding="utf-8-sig")
    entries: list[tuple[int, object]]
    if text.lstrip().startswith("["):
        try:
            entries = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as err:
            raise QatuneError(f"{path}: not a JSON list ({err.msg}, line {err.lineno})") from None
    else:
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("{"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise QatuneError(f"{path}: line {number}: not JSON ({err.msg})") from None
                if not isinstance(row, dict) or "question" not in row:
                    raise QatuneError(f"{path}: line {number}: field 'question' missing")
                line = row["question"]
            entries.append((number, line))
    questions = []
    for number, entry in entries:
        if not isinstance(entry, str):
            raise QatuneError(f"{path}: entry {number}: a question must be text, got {type(entry).__name__}")
        try:
            questions.append(inference.check_question(entry, max_chars))
        except QatuneError as err:
            raise QatuneError(f"{path}: line {number}: {err}") from None
    if not questions:
        raise QatuneError(f"{path}: no questions in the file")
    return questions


def chat(args: argparse.Namespace, params: Params) -> None:
    try:
        from qatune import app
    except ImportError as err:  # gradio is the `app` extra
        raise QatuneError(f"the chat app needs gradio ({err}); pip install 'qatune[app]'") from None
    settings = settings_from(args, params)
    if args.compare is not None:
        return compare_chat(args, params, settings, app)
    loaded = load(args, params, settings.mode)
    app.serve(loaded, params, settings, host=args.host, port=args.port, share=args.share)


def compare_chat(args: argparse.Namespace, params: Params, settings, app) -> None:
    """`qatune chat --compare [A B]`: name both models (a bad argument fails before anything loads), load
    them, then serve the vote app."""
    from qatune.feedback import default_specs, model_spec

    base_dir = args.model_dir or inference.BASE_DIR
    if len(args.compare) not in (0, 2):
        raise QatuneError(f"chat --compare: give two models or none (base vs final), got {len(args.compare)}")
    if args.compare:
        specs = tuple(model_spec(arg, base_dir) for arg in args.compare)
    else:
        gguf = f"{inference.GGUF_DIR}/{gguf_name(params.export.modelfile_quant)}"
        adapter = adapter_ref(args, params)
        if adapter != inference.ADAPTER_DIR and settings.mode == "adapter":
            adapter = inference.local_folder(adapter, "adapter")
        specs = default_specs(settings.mode, base_dir, inference.MERGED_DIR, adapter, gguf)
    if specs[0].name == specs[1].name:
        raise QatuneError(f"chat --compare: both models are {specs[0].name}; give two different ones")
    quiet_libraries()
    contestants = {}
    for spec in specs:
        contestants[spec.name] = inference.load_model(
            spec.mode,
            spec.model_dir,
            spec.adapter_dir or adapter_ref(args, params),
            device=args.device or params.chat.device,
            trust_remote_code=params.train.trust_remote_code,
            enable_thinking=params.train.enable_thinking,
            dtype=args.dtype or params.chat.dtype,
        )
        loaded = contestants[spec.name]
        print(f"qatune: {loaded.source} on {loaded.device} ({loaded.dtype})", file=sys.stderr)
    votes = args.votes or params.chat.votes
    app.serve_compare(contestants, params, settings, votes, host=args.host, port=args.port, share=args.share)


def serve(args: argparse.Namespace, params: Params) -> None:
    """Check the address and key, load the model (a one-line error when it is not built), then serve."""
    import os

    try:
        from qatune import serve as api
    except ImportError as err:  # fastapi and uvicorn come with gradio (the `app` extra)
        raise QatuneError(
            f"qatune serve needs fastapi and uvicorn ({err}); pip install 'qatune[app]'"
        ) from None
    host, port = args.host or params.serve.host, args.port or params.serve.port
    key = os.environ.get(params.serve.api_key_env) or None
    warning = api.exposure_warning(host, key, params.serve.api_key_env)
    if warning:
        print(f"qatune: {warning}", file=sys.stderr)
    settings = settings_from(args, params)
    loaded = load(args, params, settings.mode)
    app = api.create_app(loaded, params.serve, settings, params.train.system_prompt, api_key=key)
    shown = f"[{host}]" if ":" in host else host
    lock = "an API key" if key else "no API key"
    print(f"qatune: serving {params.serve.model_name} on http://{shown}:{port}/v1 ({lock})", file=sys.stderr)
    api.run(app, host, port)


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "plan":
        return show_plan(args)
    if args.command == "compare":
        from qatune import compare

        if args.exp_show:
            params = Path(args.repo) / "params.yaml"
            sys.exit(compare.show_table(params, shlex.split(args.dvc_args), args.repo))
        return print(compare.main(args.by, args.exp_show_json, args.repo))
    params = load_params(args.params)
    {"ask": ask, "chat": chat, "serve": serve}[args.command](args, params)


if __name__ == "__main__":
    main()
