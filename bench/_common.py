"""What every benchmark shares: the machine description, one arm per subprocess, results as JSON.

Each arm runs in its own Python process so that its peak RSS (ru_maxrss from os.wait4) is its own and
no arm warms caches or allocators for the next. The arm prints one JSON line last on stdout.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    """CPU model, cores, torch threads, bf16 support and the load average when the numbers were taken."""
    import torch

    from qatune.hardware import cpu_has_bf16

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_has_bf16(),  # AVX512-BF16 / AMX: what qatune's precision: auto keys on
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def run_arm(script: str, arm: str, args: list[str]) -> dict:
    """Run `python script --arm ARM args` in a fresh process; its last stdout line is its JSON result.

    Adds wall_s (process start to exit, model loading included) and peak_rss_gb (the child's ru_maxrss).
    """
    cmd = [sys.executable, script, "--arm", arm, *args]
    print(f"[bench] {arm}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    out = proc.stdout.read()  # to EOF; then reap the child ourselves to get its own rusage
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"[bench] arm {arm} failed (exit {proc.returncode}); see its stderr above")
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1])
    result["process_wall_s"] = round(wall, 1)
    result["peak_rss_gb"] = round(usage.ru_maxrss / 1024**2, 3)
    return result


def peak_rss_gb() -> float:
    """This process's peak RSS (ru_maxrss is KiB on Linux)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)


def emit(result: dict) -> None:
    """An arm's result: one JSON line on stdout, read by run_arm."""
    result.setdefault("peak_rss_gb", peak_rss_gb())
    print(json.dumps(result), flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed_answers(answer_all, questions: list, repeats: int, count_tokens) -> dict:
    """One untimed warm-up question, then `repeats` timed passes of answer_all over all questions: wall and
    CPU seconds, new tokens (count_tokens of each answer), and the median rates."""
    answer_all(questions[:1])  # warm-up: kernel selection, first-call allocations
    times, cpu, tokens = [], [], []
    for _ in range(repeats):
        start, cpu0 = time.perf_counter(), time.process_time()
        texts = answer_all(questions)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu0)
        tokens.append(sum(count_tokens(t) for t in texts))
    rates = [n / t for n, t in zip(tokens, times, strict=True)]
    return {
        "repeats_s": [round(t, 2) for t in times],
        "new_tokens": tokens,
        "tokens_per_s_repeats": [round(r, 1) for r in rates],
        "tokens_per_s": round(median(rates), 1),
        "seconds_median": round(median(times), 2),
        # CPU seconds (all threads): robust to other load on a shared machine
        "tokens_per_cpu_s": round(median([n / c for n, c in zip(tokens, cpu, strict=True)]), 1),
    }


def save(name: str, result: dict, summary: str) -> Path:
    """bench/results/<name>.json and a one-line summary on stdout."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    result = {"benchmark": name, "summary": summary, **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(summary)
    return path
