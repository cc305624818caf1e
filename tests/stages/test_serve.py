"""`qatune serve` end to end with the official `openai` client: a real uvicorn server on a free port, in a
thread, over a tiny random Llama (transformers) and over the bundled SmolLM2 GGUF (llama.cpp).

Greedy answers (temperature 0) make the streamed and the whole answer comparable; the tiny model's words
are noise, so the tests check the protocol, the limits and the prompt, not the answer's content.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from qatune import inference
from qatune.params import GenerateParams, ServeParams
from tests.conftest import ROOT

openai = pytest.importorskip("openai")
QUESTION = [{"role": "user", "content": "How much protein do I need?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(loaded, api_key: str | None = None, **serve):
    """The app on http://127.0.0.1:<free port>/v1 while the block runs; yields (base_url, app)."""
    import uvicorn

    from qatune.serve import create_app

    settings = GenerateParams(temperature=0.0, max_new_tokens=16)
    app = create_app(loaded, ServeParams(**serve), settings, "Be safe.", api_key=api_key)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_dir):
    return inference.load_model("merged", tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def gguf_loaded():
    pytest.importorskip("llama_cpp")
    from qatune.base_model import bundled_gguf

    folder, name = bundled_gguf("smollm2-135m-instruct")
    return inference.load_gguf(folder / name, n_ctx=512)


def whole_and_streamed(url: str) -> tuple:
    api = client(url)
    whole = api.chat.completions.create(model="qatune", messages=QUESTION, max_tokens=8)
    chunks = list(
        api.chat.completions.create(
            model="qatune",
            messages=QUESTION,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    return whole, chunks


@pytest.mark.parametrize("backend", ["transformers", "llama.cpp"])
def test_whole_and_streamed_answers_agree(backend, request):
    loaded = request.getfixturevalue("tiny_loaded" if backend == "transformers" else "gguf_loaded")
    with served(loaded) as (url, _):
        assert [m.id for m in client(url).models.list()] == ["qatune"]
        whole, chunks = whole_and_streamed(url)
    answer = whole.choices[0].message
    assert answer.role == "assistant" and whole.object == "chat.completion"
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 5 and whole.usage.completion_tokens <= 9
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == answer.content  # greedy: the same answer, whole or in pieces
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens  # include_usage: a last usage chunk


def test_the_prompt_is_the_training_template_with_the_system_prompt(tiny_loaded, gguf_loaded):
    from qatune.generation import gguf_chat_formatter
    from qatune.serve import ChatRequest, chat_messages, prompt_ids

    request = ChatRequest(messages=QUESTION)
    messages = chat_messages(request, "Be safe.", 8000)
    assert messages == [{"role": "system", "content": "Be safe."}, *QUESTION]
    own = ChatRequest(messages=[{"role": "developer", "content": "Mine."}, *QUESTION])
    assert chat_messages(own, "Be safe.", 8000)[0] == {"role": "system", "content": "Mine."}
    text = tiny_loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (
        prompt_ids(tiny_loaded, messages)
        == tiny_loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    )
    llm = gguf_loaded.model
    prompt = gguf_chat_formatter(llm)(messages=messages).prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert prompt_ids(gguf_loaded, messages) == llm.tokenize(prompt.encode(), add_bos=False, special=True)


def test_concurrent_requests_wait_their_turn_and_a_full_queue_is_turned_away(tiny_loaded):
    with served(tiny_loaded, concurrency_limit=1, max_queue=3) as (url, app):
        api = client(url)

        def ask(_):
            return api.chat.completions.create(model="qatune", messages=QUESTION, max_tokens=8)

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, range(4)))  # 1 running + 3 waiting: all answered
        assert len({a.id for a in answers}) == 4
        assert len({a.choices[0].message.content for a in answers}) == 1  # greedy, one model, one answer
        assert app.state.gate.inside == 0
        app.state.gate.inside = app.state.gate.capacity  # as if 4 requests were in
        with pytest.raises(openai.InternalServerError) as busy:
            ask(0)
        app.state.gate.inside = 0
    assert busy.value.status_code == 503 and "serve.max_queue" in busy.value.message


def test_bad_requests_get_a_clear_400_or_413(tiny_loaded):
    with served(tiny_loaded, max_prompt_chars=500, max_body_bytes=2048) as (url, _):
        api = client(url)
        raw = httpx.post(f"{url}/chat/completions", content=b"{not json", timeout=30)
        assert raw.status_code == 400 and "not JSON" in raw.json()["error"]["message"]
        with pytest.raises(openai.BadRequestError) as no_messages:
            api.chat.completions.create(model="qatune", messages=[])
        assert "messages" in no_messages.value.message
        with pytest.raises(openai.BadRequestError) as wrong_role:
            api.chat.completions.create(model="qatune", messages=[{"role": "robot", "content": "hi"}])
        assert "role" in wrong_role.value.message
        long = [{"role": "user", "content": "protein " * 100}]  # 800 characters, 1 KB body
        with pytest.raises(openai.BadRequestError) as too_long:
            api.chat.completions.create(model="qatune", messages=long, stream=True)
        assert "800 characters; the limit is 500 (serve.max_prompt_chars)" in too_long.value.message
        huge = [{"role": "user", "content": "protein " * 400}]
        with pytest.raises(openai.APIStatusError) as too_big:
            api.chat.completions.create(model="qatune", messages=huge)
        assert too_big.value.status_code == 413 and "serve.max_body_bytes" in too_big.value.message
        # the server still answers afterwards
        assert api.chat.completions.create(model="qatune", messages=QUESTION, max_tokens=4).choices


def test_a_prompt_longer_than_the_context_window_is_refused(gguf_loaded):
    with served(gguf_loaded) as (url, _):  # n_ctx 512 tokens, 8000 characters allowed
        long = [{"role": "user", "content": "protein " * 900}]
        with pytest.raises(openai.BadRequestError) as err:
            client(url).chat.completions.create(model="qatune", messages=long)
    assert "the model's context window is 512" in err.value.message


def test_with_a_key_set_a_wrong_or_missing_key_gets_401(tiny_loaded):
    with served(tiny_loaded, api_key="s3cret") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, "nope").chat.completions.create(model="qatune", messages=QUESTION)
        missing = httpx.post(f"{url}/chat/completions", json={"messages": QUESTION}, timeout=30)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url, "nope").models.list()
        assert client(url, "s3cret").chat.completions.create(model="q", messages=QUESTION, max_tokens=2)


def test_serving_elsewhere_without_a_key_warns():
    from qatune.serve import exposure_warning

    assert exposure_warning("127.0.0.1", None, "QATUNE_API_KEY") is None
    assert exposure_warning("0.0.0.0", "k", "QATUNE_API_KEY") is None
    assert "set QATUNE_API_KEY" in exposure_warning("0.0.0.0", None, "QATUNE_API_KEY")


def test_a_model_not_built_is_a_one_line_error(tmp_path, capsys):
    from qatune.cli import main

    with pytest.raises(SystemExit) as done:
        main(["serve", "--params", str(ROOT / "params.yaml"), "--model-dir", str(tmp_path / "merged")])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 1
    assert err[-1] == f"error: {tmp_path / 'merged'}: no model found; run `dvc repro merge` first"
