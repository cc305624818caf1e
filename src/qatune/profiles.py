"""Profiles: parameter overlays for the seed systems and real hardware, each resolved over the embedded
default recipe (src/qatune/default_params.yaml), never over whatever params.yaml holds now.

    python -m qatune.profiles list
    python -m qatune.profiles show NAME          # default + profile, validated, and the values it takes from the default
    python -m qatune.profiles apply NAME         # write default + profile to params.yaml (the default's comments kept)
    python -m qatune.profiles args NAME          # `-S key=value` flags for `dvc exp run`

A profile is default + overlay: applying seed001 and then seed002 gives exactly seed002 (no seed001 LoRA
left behind), and `apply cpu-default` restores params.yaml as shipped. params.yaml stays the file the
stages read: `apply` rewrites it (commit or `dvc exp run` it); `args` leaves it untouched and sets every
value where default + profile differs from it, so DVC records the profile as an experiment.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import yaml

from qatune.errors import QatuneError, fail_cleanly
from qatune.params import PARAMS_FILE, Params, parse_params

PROFILES_DIR = Path("profiles")
# The embedded default recipe: params.yaml as shipped, comments and all. It travels with the package, so a
# profile resolves the same in a fresh clone, a container or after any number of `apply`s.
DEFAULTS_FILE = Path(__file__).with_name("default_params.yaml")


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
    path = Path(folder) / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in Path(folder).glob("*.yaml"))) or "none"
        raise QatuneError(f"{path}: no such profile (have: {have})")
    return path


def load_overlay(path: Path) -> dict:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise QatuneError(f"{path}: a profile is a mapping of params blocks")
    return data


def load_defaults(defaults: str | Path = DEFAULTS_FILE) -> dict:
    path = Path(defaults)
    if not path.is_file():
        raise QatuneError(f"{path}: the default recipe is missing (reinstall qatune: pip install -e .)")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def resolve(
    name: str, folder: Path = PROFILES_DIR, defaults: str | Path = DEFAULTS_FILE
) -> tuple[dict, Params]:
    """Default recipe + profile, validated (unknown keys in a profile are errors). Never reads params.yaml."""
    path = profile_path(name, folder)
    data = deep_merge(load_defaults(defaults), load_overlay(path))
    return data, parse_params(data, str(path))


def merged(name: str, params_file: object = None, folder: Path = PROFILES_DIR) -> tuple[dict, Params]:
    """`resolve` under its old name. Callers from before profiles had a fixed base (`qatune plan`,
    tests/unit/test_plan.py) still pass a params file second: it is ignored, the base is the default."""
    return resolve(name, folder)


def flatten(overlay: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Leaf keys as dotted paths; lists are set whole (DVC replaces them whole too)."""
    out = []
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(flatten(value, dotted + "."))
        else:
            out.append((dotted, value))
    return out


def from_default(
    name: str, folder: Path = PROFILES_DIR, defaults: str | Path = DEFAULTS_FILE
) -> list[tuple[str, Any]]:
    """The resolved values the profile does not set, as (dotted key, value): what it takes from the default."""
    sets = {key for key, _ in flatten(load_overlay(profile_path(name, folder)))}
    return [
        (key, value)
        for key, value in flatten(resolve(name, folder, defaults)[0])
        if not any(key == s or key.startswith(s + ".") for s in sets)
    ]


def show(name: str, folder: Path = PROFILES_DIR, defaults: str | Path = DEFAULTS_FILE) -> str:
    """The resolved params as YAML, then (as comments, so the text stays valid YAML) every value the profile
    takes from the default: what the seed document does not set."""
    data = resolve(name, folder, defaults)[0]
    taken = from_default(name, folder, defaults)
    lines = [
        f"# {name} sets {len(flatten(data)) - len(taken)} values; these {len(taken)} are the default recipe's "
        f"({Path(defaults).name}):"
    ]
    lines += [f"#   {key}: {json.dumps(value, ensure_ascii=False)}" for key, value in taken]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True) + "\n".join(lines) + "\n"


def set_args(name: str, folder: Path = PROFILES_DIR, params_file: str | Path = PARAMS_FILE) -> list[str]:
    """`-S` flags that turn params_file (what `dvc exp run` starts from) into default + profile: every value
    where the two differ. A key params_file has and the resolved params lack is reset through its parent."""
    want = resolve(name, folder)[0]
    have = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    out: list[str] = []

    def walk(want_node: dict, have_node: dict, prefix: str) -> None:
        extra = [k for k in have_node if k not in want_node]
        if extra and prefix:  # -S cannot delete a key: set the whole mapping instead
            out.append(f"-S={prefix.rstrip('.')}={_compact(want_node)}")
            return
        if extra:
            raise QatuneError(
                f"{params_file}: top-level {extra} are not in the default recipe and `dvc exp run -S` cannot "
                f"remove them: run `python -m qatune.profiles apply {name}` instead"
            )
        for key, value in want_node.items():
            old = have_node.get(key)
            if isinstance(value, dict) and value and isinstance(old, dict):
                walk(value, old, f"{prefix}{key}.")
            elif key not in have_node or old != value or type(old) is not type(value):
                out.append(f"-S={prefix}{key}={_compact(value)}")

    walk(want, have, "")
    return out


def _compact(value: Any) -> str:
    """A value as DVC's -S parses it (YAML), without spaces between items so `$(... args NAME)` keeps each
    flag one word (a string with spaces in it still needs quoting by hand)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# --------------------------------------------------------------------------- apply: write default + profile


def _round_trip():
    """ruamel settings that give the default recipe back byte for byte (nulls as null, lists indented)."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.representer.add_representer(float, _yaml_float)
    rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return rt


def _mark(node, key, text: str, line_length: int) -> None:
    """Give `key` the end-of-line comment `text`, dropping the default's comment (and its continuation lines,
    which explain the default's value) but keeping what follows them (a blank line before the next block)."""
    old = node.ca.items.get(key)
    token = old[2] if old and len(old) > 2 else None
    if token is not None:
        lines = token.value.split("\n")
        rest = next((i for i, line in enumerate(lines[1:], 1) if not line.strip()), len(lines))
        token.value = "\n".join([text, *lines[rest:]]) if rest < len(lines) else text + "\n"
        return
    columns = [t[2].column for t in node.ca.items.values() if t and len(t) > 2 and t[2] is not None]
    fits = [c for c in columns if line_length + 2 < c <= line_length + 12]  # the block's column, when near
    node.yaml_add_eol_comment(text, key, column=min(fits) if fits else line_length + 3)


def render(name: str, folder: Path = PROFILES_DIR, defaults: str | Path = DEFAULTS_FILE) -> str:
    """params.yaml for a profile: the default recipe's text with the profile's values put in. Each value the
    profile changes carries `# NAME: its comment (default: old value)`; every other line is the default's.
    A profile that changes nothing (cpu-default) gives the default's text unchanged."""
    data, _ = resolve(name, folder, defaults)  # validate before writing anything
    text = Path(defaults).read_text(encoding="utf-8")
    if data == load_defaults(defaults):
        return text
    rt = _round_trip()
    doc = rt.load(text)
    overlay = rt.load(profile_path(name, folder).read_text(encoding="utf-8"))

    def comment_of(node, key) -> str:
        item = node.ca.items.get(key) if hasattr(node, "ca") else None
        token = item[2] if item and len(item) > 2 else None
        return token.value.split("\n")[0].lstrip().removeprefix("#").strip() if token is not None else ""

    def put(node, over, depth: int) -> None:
        for key, value in over.items():
            old = node.get(key)
            if isinstance(value, dict) and isinstance(old, dict):
                put(old, value, depth + 1)
                continue
            if key in node and old == value and type(old) is type(value):
                continue  # the default's own value: its line and comment stay as they are
            why = comment_of(over, key)
            was = json.dumps(yaml.safe_load(json.dumps(old)) if key in node else None, ensure_ascii=False)
            was = f"default: {was}" if len(was) <= 40 else "the default's is longer: see the default recipe"
            text = f"# {name}" + (f": {why}" if why else "") + f" ({was})"
            node[key] = value
            if not isinstance(value, dict | list):
                _mark(node, key, text, 2 * depth + len(str(key)) + 2 + len(str(value)))
            else:
                _mark(node, key, text, 2 * depth + len(str(key)) + 1)

    put(doc, overlay, 0)
    out = io.StringIO()
    rt.dump(doc, out)
    header = (
        f"# Profile {name} over the embedded default, written by `python -m qatune.profiles apply {name}`:\n"
        f"# profiles/{name}.yaml over src/qatune/{Path(defaults).name}. Lines marked `# {name}` are the\n"
        f"# profile's; every other value and comment is the default's. `apply cpu-default` restores the default.\n"
    )
    return header + _blank_lines_like(out.getvalue(), text)


def _blank_lines_like(text: str, default: str) -> str:
    """A replaced list takes the blank line that closed it in the default with it: put top-level blocks back
    on their own paragraphs, as in the default."""
    spaced = {
        line.split(":")[0]
        for before, line in zip(default.splitlines(), default.splitlines()[1:], strict=False)
        if not before.strip() and line[:1].isalpha()
    }
    out: list[str] = []
    for line in text.splitlines():
        if line[:1].isalpha() and line.split(":")[0] in spaced and out and out[-1].strip():
            out.append("")
        out.append(line)
    return "\n".join(out) + "\n"


def apply(
    name: str,
    params_file: str | Path = PARAMS_FILE,
    folder: Path = PROFILES_DIR,
    defaults: str | Path = DEFAULTS_FILE,
) -> None:
    """Write default + profile to params_file, whatever it held before (no stacking of profiles)."""
    text = render(name, folder, defaults)
    Path(params_file).write_text(text, encoding="utf-8")


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
    parser.add_argument(
        "--params",
        default=PARAMS_FILE,
        help="apply: the params file to write; args: the params file `dvc exp run` starts from",
    )
    args = parser.parse_args(argv)
    if args.command == "list":
        for path in sorted(PROFILES_DIR.glob("*.yaml")):
            print(path.stem)
        return
    if not args.name:
        raise QatuneError(f"`{args.command}` needs a profile name (see: python -m qatune.profiles list)")
    if args.command == "show":
        print(show(args.name), end="")
    elif args.command == "args":
        print(" ".join(set_args(args.name, PROFILES_DIR, args.params)))
    else:
        apply(args.name, args.params)
        print(f"{args.params}: default + profile {args.name}; run `dvc repro` (or `dvc exp run`)")


if __name__ == "__main__":
    main()
