#!/usr/bin/env bash
# The whole embedded default, end to end: `dvc repro` from a clean state, then `dvc exp run -S beta=0.2`.
#
#     bash bench/pipeline.sh                 # or: make bench-pipeline
#     QATUNE_BENCH_DIR=/tmp/elsewhere bash bench/pipeline.sh
#
# Runs in a fresh clone (git clone of this checkout into $QATUNE_BENCH_DIR, default /tmp/qatune-bench), never in
# the working tree: a clean state means no data/, no models/, no DVC cache. `make setup` builds the clone's own
# venv first (~2 min, not timed). QATUNE_BENCH_REUSE_VENV=1 skips that and reuses this checkout's .venv; its
# qatune is installed editable from this checkout, so PYTHONPATH then points at the clone's src/ instead.
# Uncommitted changes in this checkout are NOT in the clone: commit first to benchmark them.
# Measures wall time and peak RSS (the largest single process, from GNU time's "Maximum resident set size",
# which for dvc is its largest child stage) of each command, records the load average before and after, and
# writes bench/results/pipeline.json here. Goals (issue 7): full run <= 15 min on 2 cores, peak RSS < 4 GB,
# the beta experiment <= half the full run (it reruns dpo, evaluate, merge and push-to-hub, not fetch .. sft).
set -euo pipefail

SRC="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${QATUNE_BENCH_DIR:-/tmp/qatune-bench}"
OUT="$SRC/bench/results/pipeline.json"
TIME=/usr/bin/time
[ -x "$TIME" ] || { echo "error: $TIME (GNU time) is needed for peak RSS: apt-get install time"; exit 1; }
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false \
  GRADIO_ANALYTICS_ENABLED=False

rm -rf "$DIR"
git clone --quiet "$SRC" "$DIR"
cd "$DIR"
if [ "${QATUNE_BENCH_REUSE_VENV:-0}" = 1 ]; then
  export PATH="$SRC/.venv/bin:$PATH" PYTHONPATH="$DIR/src"
else
  make setup
  export PATH="$DIR/.venv/bin:$PATH"
fi
git log -1 --format='bench/pipeline.sh: commit %h %s' 

STAMP='import sys, time
for line in sys.stdin:
    print(f"{time.time():.1f} {line}", end="", flush=True)'

measure() {  # name, command...: wall seconds and peak RSS (KiB) into $name.time, time-stamped output in $name.log
  local name=$1; shift
  echo "bench/pipeline.sh: $name: $* (load $(cut -d' ' -f1-3 /proc/loadavg))"
  "$TIME" -v -o "$DIR/$name.time" "$@" > >(python -u -c "$STAMP" | tee "$DIR/$name.log") 2>&1
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
measure repro dvc repro
measure beta_exp dvc exp run -S beta=0.2
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

python - "$DIR" "$OUT" "$LOAD_BEFORE" "$LOAD_AFTER" <<'EOF'
import json, os, re, sys
from pathlib import Path

folder, out, before, after = sys.argv[1:5]

def parse(name):
    text = Path(folder, f"{name}.time").read_text()
    wall = re.search(r"Elapsed \(wall clock\) time .*: (.+)", text).group(1).split(":")
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall)))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return {"wall_s": round(seconds, 1), "wall_min": round(seconds / 60, 2), "peak_rss_gb": round(rss_kb / 1024**2, 3)}

def stages(name):
    """Seconds from each `Running stage` line to the next one (or the last line): per-stage wall time."""
    lines = [line.split(" ", 1) for line in Path(folder, f"{name}.log").read_text().splitlines() if " " in line]
    starts = [(float(t), m.group(1)) for t, text in lines if (m := re.search(r"Running stage '([^']+)'", text))]
    end = float(lines[-1][0]) if lines else 0.0
    return {stage: round(nxt - t, 1) for (t, stage), nxt in zip(starts, [s for s, _ in starts[1:]] + [end])}

full, beta = parse("repro"), parse("beta_exp")
full["stages_s"], beta["stages_s"] = stages("repro"), stages("beta_exp")
result = {
    "benchmark": "pipeline",
    "machine": {"cpu_count": os.cpu_count(), "loadavg_before": before, "loadavg_after": after},
    "repro": full,
    "beta_exp": beta,
    "beta_over_full": round(beta["wall_s"] / full["wall_s"], 3),
    "goals": {"full_le_15_min": full["wall_s"] <= 900, "peak_rss_lt_4_gb": max(full["peak_rss_gb"], beta["peak_rss_gb"]) < 4,
              "beta_le_half": beta["wall_s"] <= full["wall_s"] / 2},
}
result["summary"] = (
    f"pipeline: dvc repro {full['wall_min']} min, peak RSS {full['peak_rss_gb']} GB; dvc exp run -S beta=0.2 "
    f"{beta['wall_min']} min = {result['beta_over_full']}x of the full run; load {before} -> {after}"
)
Path(out).parent.mkdir(parents=True, exist_ok=True)
Path(out).write_text(json.dumps(result, indent=2) + "\n")
print(result["summary"])
EOF
