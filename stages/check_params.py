"""check-params: validate the whole of params.yaml before any other stage runs.

    python stages/check_params.py --params params.yaml --out metrics/params_check.json

dvc.yaml runs this first on every `dvc repro` / `dvc exp run` that changed params.yaml (it depends on the
whole file, and fetch depends on its output). A misspelled or unknown key, such as `-S bta=0.2`, fails here
with one line naming it, instead of being added silently and rerunning nothing. Its output does not change
while params.yaml stays valid, so a valid edit reruns only the stages that read the edited key.
"""

from __future__ import annotations

import argparse

from qatune.errors import fail_cleanly
from qatune.io import write_json
from qatune.params import load_params


@fail_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml", help="params file to validate")
    parser.add_argument("--out", default="metrics/params_check.json", help="stamp written when valid")
    args = parser.parse_args(argv)
    load_params(args.params)
    write_json(args.out, {"params": args.params, "valid": True})
    print(f"check-params: {args.params} is valid")


if __name__ == "__main__":
    main()
