"""Profiles: parameter overlays for the seed systems and real hardware, merged into params.yaml.

    python -m qatune.profiles list
    python -m qatune.profiles show NAME          # the merged, validated params
    python -m qatune.profiles apply NAME         # write the overlay into params.yaml (comments kept)
    python -m qatune.profiles args NAME          # `-S key=value` flags for `dvc exp run`

params.yaml stays the single source of truth: `apply` edits it in place (commit or `dvc exp run` it),
and `args` leaves it untouched and lets DVC record the values as an experiment.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qatune.errors import QatuneError, fail_cleanly
from qatune.params import PARAMS_FILE, Params, parse_params

PROFILES_DIR = Path("profiles")


@dataclass(frozen=True)
class Seed:
    """One of the user's seed systems (design documents) that qatune reproduces as a profile."""

    number: str  # the seed document's number
    profile: str  # file stem under profiles/
    base_model: str  # Hub id the profile trains
    family: str  # architecture family (qatune.tiny builds a tiny random model of it for the profile's test)
    summary: str


# The one list of seed systems: tests/unit/test_profiles.py fails for a seed here without a profile file,
# and for a seed profile file that is not here.
SEEDS = (
    Seed(
        "000",
        "seed000-qwen3-dpo",
        "unsloth/Qwen3-0.6B",
        "qwen3",
        "Unsloth Qwen3-0.6B, 4-bit LoRA, DPO from the base",
    ),
    Seed(
        "001",
        "seed001-qwen25-sft",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "qwen2",
        "Qwen2.5-0.5B LoRA SFT, own train/val files",
    ),
    Seed(
        "002",
        "seed002-gemma-psychology",
        "google/gemma-2b-it",
        "gemma",
        "gemma-2b-it SFT on response_j, 4-bit",
    ),
    Seed(
        "003",
        "seed003-mistral-qlora",
        "mistralai/Mistral-7B-Instruct-v0.1",
        "mistral",
        "Mistral-7B QLoRA SFT on alpaca rows",
    ),
    Seed(
        "004",
        "seed004-llama32-finetome",
        "unsloth/Llama-3.2-3B-Instruct",
        "llama",
        "Llama-3.2-3B QLoRA, FineTome + WizardLM",
    ),
)


def deep_merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = (
            deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def profile_path(name: str, folder: Path = PROFILES_DIR) -> Path:
    path = folder / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
        raise QatuneError(f"{path}: no such profile (have: {have})")
    return path


def load_overlay(path: Path) -> dict:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise QatuneError(f"{path}: a profile is a mapping of params blocks")
    return data


def merged(
    name: str, params_file: str | Path = PARAMS_FILE, folder: Path = PROFILES_DIR
) -> tuple[dict, Params]:
    """The params mapping with the profile applied, validated (unknown keys in a profile are errors)."""
    path = profile_path(name, folder)
    data = deep_merge(yaml.safe_load(Path(params_file).read_text(encoding="utf-8")), load_overlay(path))
    return data, parse_params(data, str(path))


def flatten(overlay: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Leaf keys as dotted paths; lists are set whole (DVC replaces them whole too)."""
    out = []
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(flatten(value, dotted + "."))
        else:
            out.append((dotted, value))
    return out


def set_args(name: str, folder: Path = PROFILES_DIR) -> list[str]:
    return [
        f"-S={key}={json.dumps(value)}" for key, value in flatten(load_overlay(profile_path(name, folder)))
    ]


def apply(name: str, params_file: str | Path = PARAMS_FILE, folder: Path = PROFILES_DIR) -> None:
    """Merge the overlay into params.yaml in place, keeping its comments and order."""
    from ruamel.yaml import YAML

    merged(name, params_file, folder)  # validate before touching the file
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(float, _yaml_float)
    path = Path(params_file)
    doc = rt.load(path.read_text(encoding="utf-8"))

    def put(node, overlay: dict) -> None:
        for key, value in overlay.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                put(node[key], value)
            else:
                node[key] = value

    put(doc, load_overlay(profile_path(name, folder)))
    with open(path, "w", encoding="utf-8") as f:
        rt.dump(doc, f)


def _yaml_float(representer, value: float):
    """3e-05 would read back as a string in PyYAML (and DVC): always write a mantissa with a dot."""
    text = repr(value)
    mantissa, _, exponent = text.partition("e")
    if exponent and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["list", "show", "apply", "args"], help="what to do")
    parser.add_argument("name", nargs="?", help="profile name (file stem under profiles/)")
    parser.add_argument("--params", default=PARAMS_FILE, help="params file to merge into")
    args = parser.parse_args(argv)
    if args.command == "list":
        for path in sorted(PROFILES_DIR.glob("*.yaml")):
            print(path.stem)
        return
    if not args.name:
        raise QatuneError(f"`{args.command}` needs a profile name (see: python -m qatune.profiles list)")
    if args.command == "show":
        print(yaml.safe_dump(merged(args.name, args.params)[0], sort_keys=False), end="")
    elif args.command == "args":
        print(" ".join(set_args(args.name)))
    else:
        apply(args.name, args.params)
        print(f"{args.params}: applied profile {args.name}; run `dvc repro` (or `dvc exp run`)")


if __name__ == "__main__":
    main()
