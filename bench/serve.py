"""`qatune serve` measured through its HTTP API: first-token latency and tokens/s per mode.

    python bench/serve.py                       # models/merged and models/gguf/model-q4_k_m.gguf
    python bench/serve.py --questions 4 --max-new-tokens 128 --modes merged

Each mode runs `qatune serve` in its own process (as a user would start it), one streamed greedy request at
a time with the official `openai` client, after one warm-up request. First token: request sent -> first
non-empty content chunk (prompt processing + one step + HTTP). Decode tok/s: completion tokens after the
first / time after the first. Writes bench/results/serve.json with the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import machine  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
MODES = {"merged": [], "gguf": ["--model-dir", "models/gguf/model-q4_k_m.gguf"]}


def wait_up(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    import httpx

    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"qatune serve exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("qatune serve did not come up")


def one(api, question: str, max_tokens: int) -> dict:
    sent = time.perf_counter()
    first = None
    usage = None
    stream = api.chat.completions.create(
        model="qatune",
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage:
            usage = chunk.usage
    done = time.perf_counter()
    tokens = usage.completion_tokens
    return {
        "first_token_s": first - sent,
        "completion_tokens": tokens,
        "decode_tok_s": (tokens - 1) / (done - first) if tokens > 1 else None,
        "end_to_end_tok_s": tokens / (done - sent),
    }


def measure(mode: str, questions: list[str], max_tokens: int, port: int) -> dict:
    import openai

    cmd = [str(Path(sys.executable).parent / "qatune"), "serve", "--mode", mode, *MODES[mode]]
    cmd += ["--port", str(port), "--max-new-tokens", str(max_tokens)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_up(url, proc)
        api = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        one(api, questions[0], 8)  # warm-up
        runs = [one(api, q, max_tokens) for q in questions]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        "mode": mode,
        "first_token_s_median": statistics.median(r["first_token_s"] for r in runs),
        "decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in runs if r["decode_tok_s"]),
        "end_to_end_tok_s_median": statistics.median(r["end_to_end_tok_s"] for r in runs),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=4, help="demo questions, asked one at a time")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer budget per request")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="what to serve")
    parser.add_argument("--port", type=int, default=8765, help="port for the served model")
    args = parser.parse_args()
    from qatune.demo import demo_questions

    questions = demo_questions(args.questions)
    before = machine()
    results = [measure(m, questions, args.max_new_tokens, args.port) for m in args.modes]
    out = {"machine_before": before, "machine_after": machine(), "max_new_tokens": args.max_new_tokens}
    out["results"] = results
    (ROOT / "bench/results").mkdir(exist_ok=True)
    (ROOT / "bench/results/serve.json").write_text(json.dumps(out, indent=2) + "\n")
    for r in results:
        print(
            f"{r['mode']}: first token {r['first_token_s_median'] * 1000:.0f} ms, "
            f"decode {r['decode_tok_s_median']:.1f} tok/s, end to end {r['end_to_end_tok_s_median']:.1f} tok/s"
        )


if __name__ == "__main__":
    main()
