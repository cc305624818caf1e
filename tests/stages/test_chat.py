"""`qatune ask` and `qatune chat` on a tiny random model: merged and adapter modes, streaming, and the
Gradio app driven by a real headless Chromium (type a question, read the answer, take a screenshot).

The adapter is a random LoRA (no training needed): its B matrices are not zero, so adapter mode really
differs from the bare base, and the merged folder is that adapter folded in. Answers are random text;
what is checked is that text arrives, streams, and that both modes give the same greedy answer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests import warm
from tests.conftest import ROOT

MAX_INPUT_CHARS = 200
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def chat_project(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the pipeline's outputs: models/base, models/dpo, models/merged, params."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proj = tmp_path_factory.mktemp("chat")
    models = proj / "models"
    shutil.copytree(tiny_model_dir, models / "base")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)  # the random LoRA weights: the same model whatever ran before in this worker
    adapted = get_peft_model(base, lora)
    adapted.save_pretrained(models / "dpo")
    tokenizer.save_pretrained(models / "dpo")
    adapted.merge_and_unload().save_pretrained(models / "merged")
    tokenizer.save_pretrained(models / "merged")

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["system_prompt"] = "Be safe."
    params["sft"]["enabled"] = True  # an SFT then DPO run, as the GPU profiles make
    # Greedy and short: the same answer every run, in well under a second.
    params["generate"].update(temperature=0.0, max_new_tokens=16)
    params["chat"].update(max_input_chars=MAX_INPUT_CHARS)
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    return proj


def qatune(
    args: list[str], cwd: Path, env_extra: dict | None = None, **kwargs
) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "qatune"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env = {**env, "PATH": f"{exe.parent}{os.pathsep}{env['PATH']}"}
    cmd = [str(exe), *args]
    if not set(kwargs) - {"input"}:  # forked by the warm server when the environment is the tests' own
        env = warm.prepare(env)
        if warm.forkable(cmd, env):
            return warm.run_script(cmd, cwd, env, kwargs.get("input"))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, **kwargs)


# --------------------------------------------------------------------------- qatune ask


def test_ask_answers_in_merged_and_adapter_mode_alike(chat_project: Path):
    merged = qatune(["ask", "--max-new-tokens", "12", "How much protein do I need?"], chat_project)
    assert merged.returncode == 0, merged.stderr
    assert "models/merged on cpu (float32)" in merged.stderr
    assert merged.stdout.strip(), "no answer text"
    # Adapter mode, with the question on stdin and sampling flags that greedy decoding ignores.
    adapter = qatune(
        ["ask", "--mode", "adapter", "--top-p", "0.5", "--max-new-tokens", "12", "-"],
        chat_project,
        input="How much protein do I need?\n",
    )
    assert adapter.returncode == 0, adapter.stderr
    assert "models/base + models/dpo on cpu" in adapter.stderr
    # merge_and_unload is exact to ~1e-4 in the logits: greedy decoding picks the same tokens.
    assert adapter.stdout == merged.stdout


def test_ask_answers_a_questions_file_in_turn(chat_project: Path):
    """Seed 001's questions list: one model load, each question answered as `qatune ask Q` answers it."""
    questions = ["How much protein do I need?", "Is creatine safe?"]
    (chat_project / "questions.txt").write_text("# seed 001\n" + "\n\n".join(questions) + "\n")
    (chat_project / "questions.json").write_text(json.dumps(questions))
    out = qatune(["ask", "--questions", "questions.txt", "--output", "answers.jsonl"], chat_project)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("on cpu (float32)") == 1  # loaded once
    rows = [json.loads(line) for line in (chat_project / "answers.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == questions
    for row in rows:
        single = qatune(["ask", row["question"]], chat_project)
        assert row["answer"] and row["answer"] == single.stdout.strip()  # greedy: the same answer
        assert f"Q: {row['question']}\nA: {row['answer']}" in out.stdout
    from_json = qatune(["ask", "--questions", "questions.json", "--output", "again.jsonl"], chat_project)
    assert (chat_project / "again.jsonl").read_text() == (chat_project / "answers.jsonl").read_text()
    assert from_json.returncode == 0


def test_ask_serves_an_adapter_by_hub_id_on_the_cpu_in_float32(chat_project: Path, tmp_path: Path):
    """Seed 004's app: the base in float32 on the CPU with a LoRA adapter named by its Hub repo id, here from a
    Hugging Face cache the way a download leaves it (HF_HUB_OFFLINE=1: the snapshot is found without asking
    the Hub). chat.adapter, chat.device and chat.dtype say it in params; the answer is the local adapter's."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--tiny-lora"
    shutil.copytree(chat_project / "models" / "dpo", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    params = yaml.safe_load((chat_project / "params.yaml").read_text())
    params["chat"].update(adapter="someone/tiny-lora", device="cpu", dtype="float32")
    (chat_project / "hub-adapter.yaml").write_text(yaml.safe_dump(params))
    env = {"HF_HUB_CACHE": str(tmp_path / "cache")}
    question = ["--mode", "adapter", "--max-new-tokens", "12", "How much protein do I need?"]

    local = qatune(["ask", *question], chat_project)
    hub = qatune(["ask", "--params", "hub-adapter.yaml", *question], chat_project, env_extra=env)
    assert hub.returncode == 0, hub.stderr
    assert "qatune: models/base + someone/tiny-lora on cpu (float32)" in hub.stderr
    assert hub.stdout == local.stdout and hub.stdout.strip()
    # the flags override the params for one run; a repo missing from the cache offline is a one-line error
    half = qatune(
        ["ask", "--params", "hub-adapter.yaml", "--dtype", "bfloat16", *question], chat_project, env_extra=env
    )
    assert half.returncode == 0 and "someone/tiny-lora on cpu (bfloat16)" in half.stderr, half.stderr
    missing = qatune(["ask", "--adapter-dir", "someone/other-lora", *question], chat_project, env_extra=env)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "adapter 'someone/other-lora': no such folder here, and no Hub snapshot of it" in missing.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ask", "--model-dir", "nowhere", "Q?"], "nowhere: no model found; run `dvc repro merge` first"),
        (["ask", "--mode", "adapter", "--adapter-dir", "nowhere", "Q?"], "run `dvc repro dpo` first"),
        (["ask", "x" * (MAX_INPUT_CHARS + 1)], f"the limit is {MAX_INPUT_CHARS}"),
        (["ask", "--top-p", "1.5", "Q?"], "generation settings: top_p"),
        (["ask", "--params", "missing.yaml", "Q?"], "missing.yaml: not found"),
        (["ask"], "give one question, or --questions FILE"),
        (["ask", "--questions", "nowhere.txt"], "nowhere.txt: no such questions file"),
        (["ask", "--questions", "bad.jsonl"], "bad.jsonl: line 2: field 'question' missing"),
        (["ask", "--questions", "long.txt"], "long.txt: line 3: the question is 201 characters"),
    ],
)
def test_ask_errors_are_one_line(chat_project: Path, args: list[str], message: str):
    (chat_project / "bad.jsonl").write_text('{"question": "Q?"}\n{"prompt": "Q?"}\n')
    (chat_project / "long.txt").write_text("Q?\n\n" + "x" * (MAX_INPUT_CHARS + 1) + "\n")
    out = qatune(args, chat_project)
    assert out.returncode == 1
    assert message in out.stderr
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr


# --------------------------------------------------------------------------- streaming, in process


@pytest.fixture(scope="module")
def loaded(chat_project: Path):
    from qatune import inference

    return inference.load_model("merged", chat_project / "models" / "merged")


def test_answers_stream_in_pieces(loaded):
    import torch

    from qatune import inference
    from qatune.params import GenerateParams

    torch.manual_seed(0)  # sampled random text has spaces, where the streamer hands out a piece
    settings = GenerateParams(temperature=1.5, top_p=1.0, max_new_tokens=48)
    stream = inference.stream_answer(loaded, inference.build_messages("Q?", "Be safe."), settings)
    pieces = list(stream)
    assert len(pieces) >= 2, pieces
    assert all(isinstance(p, str) and p for p in pieces)


def test_closing_the_stream_stops_generation(loaded):
    import threading

    from qatune import inference
    from qatune.params import GenerateParams

    settings = GenerateParams(temperature=1.0, top_p=1.0, max_new_tokens=2000)
    steps = []  # one forward pass per generated token: what the stop must cut short
    hook = loaded.model.register_forward_hook(lambda *_: steps.append(1))
    config = loaded.model.generation_config
    kept, config.min_new_tokens = config.min_new_tokens, 2000  # no early eos: unstopped, it runs all 2000
    try:
        stream = inference.stream_answer(loaded, inference.build_messages("Q?", None), settings)
        next(stream)
        started = time.monotonic()
        stream.close()  # what Gradio's stop button does to the generator
        assert time.monotonic() - started < 5
        assert not [t for t in threading.enumerate() if t.name.endswith("(run)")]  # the generate thread
        done = len(steps)
        time.sleep(0.2)
        assert len(steps) == done  # nothing generates after the close
        assert done < 200, f"{done} of 2000 tokens generated: closing the stream did not stop generation"
    finally:
        hook.remove()
        config.min_new_tokens = kept


def test_free_memory_caps_the_answer(loaded, monkeypatch):
    from qatune import inference
    from qatune.params import GenerateParams

    # The tiny model's cache is 2 layers x 2 KV heads x 16 dims x 2 x 4 bytes = 512 bytes per token.
    prompt_tokens = inference.prompt_inputs(loaded, inference.build_messages("Q?", None))["input_ids"].shape[
        1
    ]
    monkeypatch.setattr(inference, "free_memory_bytes", lambda device: 2 * 512 * (prompt_tokens + 3))
    capped = []
    settings = GenerateParams(temperature=0.0, max_new_tokens=50)
    messages = inference.build_messages("Q?", None)
    list(inference.stream_answer(loaded, messages, settings, on_cap=lambda *pair: capped.append(pair)))
    assert capped == [(50, 3)]


# --------------------------------------------------------------------------- the Gradio app


def test_app_defaults_are_local_and_queued(loaded, chat_project: Path):
    from qatune import app
    from qatune.params import load_params

    params = load_params(chat_project / "params.yaml")
    assert app.launch_kwargs(params.chat) == {"server_name": "127.0.0.1", "server_port": 7860, "share": False}
    assert app.launch_kwargs(params.chat, host="0.0.0.0", port=9000, share=True)["share"] is True
    demo = app.build_app(loaded, params, params.generate)
    assert demo.title == params.domain.title == "qatune: fitness & nutrition QA"
    assert "then direct preference optimisation" in demo.description  # the recipe params.yaml ran
    kto = params.model_copy(update={"dpo": params.dpo.model_copy(update={"method": "kto"})})
    assert "then KTO on answers labelled good or bad" in app.description(kto, loaded)
    renamed = params.model_copy(
        update={"domain": params.domain.model_copy(update={"title": "Running coach"})}
    )
    assert app.build_app(loaded, renamed, params.generate).title == "Running coach"
    assert demo._queue.max_size == params.chat.max_queue
    assert demo._queue.default_concurrency_limit == params.chat.concurrency_limit


def test_app_refuses_long_input_and_keeps_it_out_of_the_history(loaded, chat_project: Path):
    from qatune import app
    from qatune.params import load_params

    params = load_params(chat_project / "params.yaml")
    respond = app.make_respond(loaded, params, params.generate)
    refusal = list(respond("x" * (MAX_INPUT_CHARS + 1), [], 0.0, 0.9, 8))
    assert len(refusal) == 1 and refusal[0].startswith(app.REFUSAL) and "limit" in refusal[0]
    history = [
        {"role": "user", "content": [{"type": "text", "text": "x" * 300}]},
        {"role": "assistant", "content": [{"type": "text", "text": refusal[0]}]},
        {"role": "user", "content": [{"type": "text", "text": "Q?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A."}]},
    ]
    assert app.plain_history(history) == [
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A."},
    ]
    answer = list(respond("How much protein?", history, 0.0, 0.9, 8))
    assert answer and answer[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"qatune chat exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(
        f"qatune chat did not answer on {url} within {timeout} s:\n{log.read_text()[-3000:]}"
    )


@pytest.fixture
def chat_server(chat_project: Path, tmp_path: Path):
    """`qatune chat` in a subprocess on a free local port; stopped (by its own pid) after the test."""
    port = free_port()
    log = tmp_path / "chat.log"
    exe = Path(sys.executable).parent / "qatune"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(exe), "chat", "--port", str(port)],
            cwd=chat_project,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_http(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_chat_in_a_real_browser(chat_server: str, tmp_path: Path):
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, (
        "chromium is not installed; the browser test needs it: "
        "DEBIAN_FRONTEND=noninteractive apt-get install -y chromium (CI does this in .ci/run)"
    )
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(chat_server)
            expect(page.get_by_text("Temperature (0 = greedy)")).to_be_visible(timeout=30_000)
            expect(page.get_by_text("qatune: fitness & nutrition QA")).to_be_visible()  # domain.title
            expect(page.get_by_placeholder("Ask a fitness or nutrition question…")).to_be_visible()
            expect(page.get_by_text("Max new tokens")).to_be_visible()
            box = page.get_by_test_id("textbox")  # its placeholder goes once the chat has messages
            box.fill("How much protein do I need to build muscle?")
            box.press("Enter")
            bot = page.locator('[data-testid="bot"]')
            expect(bot.first).to_have_text(re.compile(r"\S"), timeout=30_000)
            expect(page.locator('[data-testid="user"]').first).to_contain_text("How much protein")
            answer = bot.first.inner_text()
            assert answer.strip()

            box.fill("x" * (MAX_INPUT_CHARS + 1))
            page.locator("button.submit-button").click()
            expect(bot.nth(1)).to_contain_text(f"the limit is {MAX_INPUT_CHARS}", timeout=30_000)

            shot = tmp_path / "chat.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
