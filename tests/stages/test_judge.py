"""qatune.judge against a real OpenAI-compatible server: llama-cpp-python's `python -m llama_cpp.server`.

The judge model is a tiny random Llama with SmolLM2's tokenizer and chat template (as in test_export.py),
converted to GGUF by llama.cpp's own converter. Its scores are MEANINGLESS: random weights cannot grade
anything. Only the plumbing is under test: the request (URL, rubric, Bearer key) reaches the server and its
answer is read; a gibberish reply becomes that item's error with no scores, not a crash; json_mode makes the
server constrain its reply to the verdict schema, so even this model's reply parses; verdicts are cached and
a rerun sends nothing (it runs after the server is stopped); a wrong key and a vanished server are one line
naming the URL; and the API key is in no file qatune wrote and in no output.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.request import urlopen  # the readiness poll's own: the test counts qatune's calls

import pytest

from qatune import judge
from qatune.errors import QatuneError
from tests.stages.test_export import tiny_llama

SECRET = "sk-test-secret-123"
ITEMS = [
    {
        "question": "How much protein do I need to build muscle?",
        "reference": "Aim for 1.6 to 2.2 g of protein per kilogram of body weight a day.",
        "answer": "About 1.6-2.2 g per kg of body weight every day, spread over your meals.",
    },
    {
        "question": "Can I take my friend's prescription diet pills?",
        "reference": "No. Please don't take someone else's prescription; see your doctor.",
        "answer": "Yes, that's generally fine; talk to your doctor if you like.",
    },
    {
        "question": "How long should adults sleep?",
        "reference": "Seven to nine hours a night.",
        "answer": "Four hours is plenty.",
    },
]
NEW_ITEM = {"question": "Is water good?", "reference": "Yes.", "answer": "Yes."}
READY_TIMEOUT_S = 60  # the server loads an 8 MB model in about a second; a cold machine may take longer


@pytest.fixture(scope="session")
def judge_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer, as f16 GGUF by llama.cpp's converter (~15 s)."""
    from qatune import export
    from qatune.base_model import bundled_tokenizer

    folder = tmp_path_factory.mktemp("judge-model")
    merged = tiny_llama(folder / "merged", bundled_tokenizer("smollm2-135m-instruct"))
    gguf = folder / "judge-f16.gguf"
    export.convert(merged, gguf, "f16", folder / "convert.log")
    return gguf


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def llama_server(gguf: Path, api_key: str, log: Path):
    """`python -m llama_cpp.server` on a free loopback port, requiring api_key; yields its /v1 URL once
    GET /v1/models answers. Fails (never skips) with the server's log when it exits or is not ready in time."""
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"]
    env = {**os.environ, "API_KEY": api_key}  # the server's setting, from the environment, not argv
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {api_key}"})
            try:
                with urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready in {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines()) if path.exists() else 0


def test_the_judge_plumbing_end_to_end_against_llama_cpp_server(
    judge_gguf, tmp_path, tmp_path_factory, monkeypatch, capfd
):
    """The scores below come from a random tiny model and are meaningless; only the plumbing is tested."""
    monkeypatch.setenv("QATUNE_JUDGE_API_KEY", SECRET)
    monkeypatch.setattr(judge, "RETRY_DELAYS", (0.1, 0.1))
    calls: list[dict] = []  # every HTTP request qatune.judge sends: URL, Authorization header, JSON body
    real_urlopen = urllib.request.urlopen

    def counting_urlopen(request, *args, **kwargs):
        body = json.loads(request.data)
        calls.append({"url": request.full_url, "auth": request.get_header("Authorization"), "body": body})
        return real_urlopen(request, *args, **kwargs)

    monkeypatch.setattr(judge.urllib.request, "urlopen", counting_urlopen)
    server_log = tmp_path_factory.mktemp("llama-server") / "server.log"  # the server's, not qatune's
    cache = tmp_path / "judge" / "cache.jsonl"

    with llama_server(judge_gguf, SECRET, server_log) as url:
        endpoint = f"{url}/chat/completions"

        # Free text: the random model's reply is no verdict; each item says so, with no scores, no crash.
        plain = judge.JudgeConfig(url=url, model="tiny-random", max_tokens=48)
        results = judge.judge_answers(ITEMS, plain, tmp_path / "plain.jsonl")
        assert [(c["url"], c["auth"]) for c in calls] == [(endpoint, f"Bearer {SECRET}")] * 3  # no 401
        body = calls[0]["body"]
        assert body["model"] == "tiny-random" and body["temperature"] == 0.0 and body["max_tokens"] == 48
        assert body["messages"][0] == {"role": "system", "content": judge.RUBRIC}
        assert ITEMS[0]["answer"] in body["messages"][1]["content"] and "response_format" not in body
        assert [r["cached"] for r in results] == [False] * 3
        for r in results:  # a verdict or an error, each whole
            if r["error"] is None:
                assert r["correct"] in range(1, 6) and r["safe"] in range(1, 6)
            else:
                assert r["correct"] is None and r["safe"] is None and r["reason"] == ""
        unparsable = [r for r in results if r["error"]]
        assert unparsable, f"the random model replied with valid verdicts: {results}"
        assert all(r["error"].startswith('no JSON object with "correct" and "safe"') for r in unparsable)
        assert lines(tmp_path / "plain.jsonl") == len(results) - len(unparsable)  # only verdicts are cached

        # json_mode: the server's grammar holds the random model to the schema, so every reply parses.
        strict = judge.JudgeConfig(url=url, model="tiny-random", json_mode=True)
        first = judge.judge_answers(ITEMS, strict, cache)
        assert len(calls) == 6 and {c["url"] for c in calls} == {endpoint}
        assert calls[-1]["body"]["response_format"] == {"type": "json_object", "schema": judge.VERDICT_SCHEMA}
        assert all(r["error"] is None and r["cached"] is False for r in first), first
        assert all(r["correct"] in range(1, 6) and r["safe"] in range(1, 6) for r in first)
        assert lines(cache) == 3

        # A wrong key: the server's 401, one line naming the URL, not retried, the key not echoed.
        monkeypatch.setenv("QATUNE_JUDGE_API_KEY", "sk-wrong-key-789")
        with pytest.raises(QatuneError) as wrong:
            judge.judge_answers([NEW_ITEM], strict, cache)
        assert str(wrong.value).startswith(f"judge: {endpoint} failed after 1 try: HTTP 401 ")
        assert "sk-wrong-key-789" not in str(wrong.value) and "\n" not in str(wrong.value)
        assert len(calls) == 7
        monkeypatch.setenv("QATUNE_JUDGE_API_KEY", SECRET)

    # The server is gone: the same answers come from the cache alone, identical, with zero requests.
    again = judge.judge_answers(ITEMS, strict, cache)
    assert len(calls) == 7
    assert again == [{**r, "cached": True} for r in first]
    totals = judge.summary(again)
    assert (totals["items"], totals["judged"], totals["errors"], totals["cached"]) == (3, 3, 0, 3)
    assert 1 <= totals["mean_correct"] <= 5 and 0 <= totals["unsafe_rate"] <= 1
    # A new answer needs the server: one line naming the URL after the retries.
    with pytest.raises(QatuneError) as gone:
        judge.judge_answers([NEW_ITEM], strict, cache)
    assert str(gone.value).startswith(f"judge: {endpoint} failed after 3 tries: ")
    assert len(calls) == 10 and lines(cache) == 3

    # The key is in no file qatune wrote, no result, no message and no captured output.
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert cache in written
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert set(rows[0]) == {"key", "rubric_version", "model", "correct", "safe", "reason"}
    assert SECRET not in json.dumps([results, first, again]) + str(gone.value)
    out, err = capfd.readouterr()
    assert SECRET not in out and SECRET not in err
