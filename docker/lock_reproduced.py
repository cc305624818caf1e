"""Did `dvc repro STAGE...` reproduce what the committed dvc.lock records? Run in a git checkout after the repro:

    python docker/lock_reproduced.py check-params fetch clean split

Compares each stage's outputs (md5 and size, per path) in the working dvc.lock with HEAD's. A different output
is an error (exit 1): that output does not reproduce on this machine and library stack, so every later stage
is out of date for whoever runs `dvc status` here. Changed dependencies (code edited since the lock was
written) are listed as a warning: then the lock itself is stale, and HEAD's outputs say nothing about them.
"""

from __future__ import annotations

import subprocess
import sys

import yaml


def entries(stage: dict, kind: str) -> dict[str, tuple]:
    return {e["path"]: (e.get("md5"), e.get("size")) for e in stage.get(kind, [])}


def main(stages: list[str]) -> int:
    head = subprocess.run(["git", "show", "HEAD:dvc.lock"], capture_output=True, text=True, check=True).stdout
    old = yaml.safe_load(head)["stages"]
    with open("dvc.lock", encoding="utf-8") as f:
        new = yaml.safe_load(f)["stages"]
    failed = False
    for name in stages:
        before, after = entries(old[name], "outs"), entries(new[name], "outs")
        for path in sorted(before.keys() | after.keys()):
            if before.get(path) != after.get(path):
                failed = True
                print(
                    f"error: {name}: {path} does not reproduce: dvc.lock has {before.get(path)}, this run {after.get(path)}"
                )
        deps = entries(old[name], "deps"), entries(new[name], "deps")
        stale = sorted(p for p in deps[0].keys() | deps[1].keys() if deps[0].get(p) != deps[1].get(p))
        if stale:
            print(f"warning: {name}: dependencies changed since dvc.lock was written: {', '.join(stale)}")
    if not failed:
        print(f"dvc.lock's outputs reproduced: {', '.join(stages)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
