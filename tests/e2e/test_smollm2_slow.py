"""Slow tier (`make test-slow`): the real bundled SmolLM2-135M-Instruct through fetch → sft for two steps."""

import json
import sys

import pytest
import yaml

from tests.conftest import ROOT, run


@pytest.mark.slow
def test_bundled_smollm2_trains_two_steps(project):
    proj = project()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())  # the real default: bundled model and data
    params["data_samples"] = 60
    params["split"] = {"val": 8, "test": 8, "stratify": "topic"}
    params["sft"].update(max_steps=2, eval_steps=2, save_steps=2, eval_rows=8)
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("fetch", "clean", "split", "sft"):
        run([sys.executable, f"stages/{stage}.py"], proj)
    base = json.loads((proj / "models/base/qatune_base.json").read_text())
    assert base["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and base["parameters"] > 100_000_000
    assert json.loads((proj / "metrics/clean.json").read_text())["dropped"] == 0
    metrics = json.loads((proj / "metrics/sft.json").read_text())
    assert metrics["steps"] == 2 and metrics["loss_mode"] == "assistant_only"
    assert (
        1.0 < metrics["eval_before"]["loss"] < 6.0
    )  # an instruct model, not random weights (ln 49152 = 10.8)
