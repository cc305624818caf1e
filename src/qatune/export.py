"""GGUF export with llama.cpp's own tools: its converter, its quantiser, and its runtime to check the result.

qatune writes no GGUF bytes itself. `convert_hf_to_gguf.py` (with the `conversion` package and `gguf-py`
beside it, copied by `make setup` out of llama-cpp-python's sdist, which vendors llama.cpp whole) turns the
merged safetensors model into a 16-bit GGUF; `llama_model_quantize` (llama.cpp's quantiser, through
llama-cpp-python) writes the smaller types from it; `llama_cpp.Llama` loads every file back so that its
log-probabilities can be compared with the merged model's in transformers. The runtime is imported, and the
files named, through qatune.llama_cpp, which `qatune ask --mode gguf` shares.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune.errors import QatuneError
from qatune.llama_cpp import llama_cpp_module, stderr_to

if TYPE_CHECKING:
    from qatune.generation import StopTokens

CONVERTER_ENV = "QATUNE_LLAMA_CPP_DIR"
# What the converter writes itself; the rest go through llama.cpp's quantiser from the 16-bit file.
CONVERTER_TYPES = {"f32", "f16", "bf16"}
QUANT_FTYPES = {  # llama.h's llama_ftype values
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
# The converter's ways of saying a model is outside what it knows (architecture, tokenizer, vocabulary).
UNSUPPORTED = re.compile(
    r"(not supported|NotImplementedError|pre-tokenizer was not recognized|not recognized|Unknown model|"
    r"unsupported)",
    re.IGNORECASE,
)


class Unsupported(Exception):
    """The converter does not handle this model; the message is its own last error line."""


def converter_dir() -> Path:
    """Where `make setup` put llama.cpp's converter: $QATUNE_LLAMA_CPP_DIR, else <venv>/share/qatune/llama.cpp."""
    folder = Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "share" / "qatune" / "llama.cpp")
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise QatuneError(
            f"{folder}: llama.cpp's converter (convert_hf_to_gguf.py) is not there; run `make setup`, "
            f"or point {CONVERTER_ENV} at a llama.cpp checkout"
        )
    return folder


def source_type(quants: list[str]) -> str:
    """The 16-bit (or 32-bit) type the converter writes: the first listed, else f16 as a working file."""
    return next((q for q in quants if q in CONVERTER_TYPES), "f16")


def convert(model_dir: Path, out_file: Path, outtype: str, log_file: Path) -> None:
    """Run llama.cpp's converter in its own process; its output goes to log_file."""
    folder = converter_dir()
    cmd = [sys.executable, str(folder / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype]
    cmd += ["--outfile", str(out_file)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter's own gguf-py, the version it was written against
    with open(log_file, "w", encoding="utf-8") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        lines = [line.strip() for line in log_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {done.returncode}"
        if any(UNSUPPORTED.search(line) for line in lines[-5:]):
            raise Unsupported(last)
        raise QatuneError(
            f"export: llama.cpp's converter failed on {model_dir}: {last} (full log: {log_file})"
        )


def quantize(source: Path, out_file: Path, quant: str, threads: int, log_file: Path) -> None:
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[quant])
    params.nthread = threads
    with stderr_to(log_file):
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(out_file).encode(), params)
    if code != 0:
        raise QatuneError(f"export: llama.cpp's quantiser failed writing {out_file} ({quant}, code {code})")


@dataclass
class Reference:
    """The merged model's view of the check texts: token ids and the log-probability of each next token."""

    ids: list[list[int]]  # per text, prompt + answer token ids
    answer_start: list[int]  # index of the first answer token in each
    logprobs: list[Any]  # per text, a float32 array: log p(token t | tokens < t) for answer tokens
    top1: list[Any]  # per text, the merged model's most likely token at each answer position


def log_softmax_rows(logits):
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def gguf_logprobs(llm, ids: list[int], start: int):
    """llama.cpp's log-probabilities for the same token ids, at the answer positions, and its top-1 tokens."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    scores = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    lp = log_softmax_rows(scores[start - 1 : len(ids) - 1])
    targets = np.asarray(ids[start:])
    return lp[np.arange(len(targets)), targets], lp.argmax(axis=-1)


def compare(llm, ref: Reference) -> dict[str, float]:
    """Agreement of one GGUF with the merged model on the check texts: the mean and largest absolute
    difference of the answer tokens' log-probabilities, and how often the most likely next token is the same."""
    import numpy as np

    diffs, same = [], []
    for ids, start, want, top in zip(ref.ids, ref.answer_start, ref.logprobs, ref.top1, strict=True):
        got, got_top = gguf_logprobs(llm, ids, start)
        diffs.append(np.abs(got - want))
        same.append(got_top == top)
    diff = np.concatenate(diffs)
    return {
        "tokens": int(diff.size),
        "mean_abs_logprob_diff": round(float(diff.mean()), 5),
        "max_abs_logprob_diff": round(float(diff.max()), 5),
        "top1_agreement": round(float(np.concatenate(same).mean()), 4),
    }


def ollama_template(tokenizer, template_kwargs: dict, has_system: bool) -> str:
    """The chat template as an Ollama (Go) TEMPLATE for one system + user turn, derived by rendering the
    model's own Jinja template with marker strings. Its stop strings are qatune.generation.stop_tokens'.

    Exact for the single-turn prompts the model was trained on, whatever the family: the pieces around
    the markers are the template's own text. The BOS token is left out when llama.cpp adds it itself.
    """
    sys_m, user_m, answer_m = "\x00SYSTEM\x00", "\x00PROMPT\x00", "\x00ANSWER\x00"

    def render(messages: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **template_kwargs
        )

    user = [{"role": "user", "content": user_m}]
    plain = render(user, True)
    before_user, after_user = plain.split(user_m)
    full = render([*user, {"role": "assistant", "content": answer_m}], False)
    answer_end = full.split(answer_m, 1)[1]
    text = before_user
    if has_system:
        try:
            with_system = render([{"role": "system", "content": sys_m}, *user], True)
        except Exception:  # a template with no system role (Mistral Instruct, Gemma) raises or drops it
            with_system = ""
        if sys_m in with_system and user_m in with_system:
            sys_before, rest = with_system.split(sys_m)
            sys_after = rest.split(user_m)[0]
            text = f"{{{{ if .System }}}}{sys_before}{{{{ .System }}}}{sys_after}{{{{ else }}}}{before_user}{{{{ end }}}}"
    bos = tokenizer.bos_token or ""
    if bos and adds_bos(tokenizer):
        text = text.replace(bos, "", 1)  # llama.cpp (and Ollama) add BOS themselves, as the tokenizer does
    return f"{text}{{{{ .Prompt }}}}{after_user}{{{{ .Response }}}}{answer_end}"


def adds_bos(tokenizer) -> bool:
    """Whether tokenizing plain text puts BOS first (then llama.cpp does too, and a template's BOS text
    would double it); SmolLM2 names <|im_start|> its BOS but never adds it."""
    ids = tokenizer("x")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def modelfile(gguf_name: str, template: str, stops: StopTokens, system: str | None, generate) -> str:
    """An Ollama Modelfile: the GGUF, the model's own chat template, system prompt, sampling defaults and
    one `PARAMETER stop` per text that ends an answer (the end-of-turn token, every eos token, and the plain
    format's next "\nUser:" line). Ollama's Modelfile parser keeps a quoted value's characters as they are, a
    newline included (its own `ollama show --modelfile` writes such a stop the same way), and knows no escapes."""
    lines = [
        "# Ollama: ollama create qatune -f Modelfile && ollama run qatune",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
    ]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [
        f"PARAMETER temperature {generate.temperature}",
        f"PARAMETER top_p {generate.top_p}",
        f"PARAMETER repeat_penalty {generate.repetition_penalty}",
        f"PARAMETER num_predict {generate.max_new_tokens}",
    ]
    lines += [f'PARAMETER stop "{stop}"' for stop in [*stops.texts, *stops.strings]]
    return "\n".join(lines) + "\n"
