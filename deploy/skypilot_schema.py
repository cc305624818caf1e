"""Write SkyPilot's own task and resources JSON schemas to deploy/skypilot-schema.json, and parse
deploy/skypilot.yaml with SkyPilot's loader. Runs in a throwaway venv, never in qatune's (SkyPilot brings
37 packages the lock does not have and pins click and uvicorn below it):

    python3.11 -m venv /tmp/skyvenv && /tmp/skyvenv/bin/pip install skypilot==0.14.1
    /tmp/skyvenv/bin/python deploy/skypilot_schema.py            # rewrite the schema, then parse the task
    /tmp/skyvenv/bin/python deploy/skypilot_schema.py --check    # fail if the committed schema differs

SkyPilot validates a task in two steps (sky/task.py from_yaml_config, sky/resources.py): the task schema
(`sky.utils.schemas.get_task_schema()`, where `resources` is any object) and then the resources schema
(`get_resources_schema()`). Both are kept, so tests/unit/test_skypilot.py can run the same two checks
with jsonschema and without SkyPilot. The parse makes no cloud call (checked with the network off):
it reads the YAML, substitutes the envs into the git workdir, and builds one Resources per accelerator.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCHEMA = HERE / "skypilot-schema.json"
TASK = HERE / "skypilot.yaml"


def schema_text() -> str:
    import sky
    from sky.utils import schemas

    data = {
        "generated_by": "deploy/skypilot_schema.py",
        "skypilot": sky.__version__,
        "task": schemas.get_task_schema(),
        "resources": schemas.get_resources_schema(),
    }
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def parse_task() -> None:
    import sky

    task = sky.Task.from_yaml(str(TASK))
    accelerators = sorted(name for r in task.resources for name in (r.accelerators or {}))
    print(
        f"{TASK.name}: parsed by skypilot {sky.__version__}: accelerators any of {accelerators}, "
        f"workdir {task.workdir}, envs {sorted(task.envs)}, secrets {sorted(task.secrets)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed schema, write nothing"
    )
    args = parser.parse_args()
    text = schema_text()
    if args.check:
        if SCHEMA.read_text(encoding="utf-8") != text:
            sys.exit(f"error: {SCHEMA.name} differs from this SkyPilot's schema: rerun without --check")
        print(f"{SCHEMA.name}: matches this SkyPilot")
    else:
        SCHEMA.write_text(text, encoding="utf-8")
        print(f"wrote {SCHEMA}")
    parse_task()


if __name__ == "__main__":
    main()
