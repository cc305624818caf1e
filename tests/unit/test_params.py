"""params.yaml is typed: the real file validates, unknown keys fail with the key's name."""

import copy
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from qatune.errors import QatuneError
from qatune.params import PARAMS_FILE, Params, load_params, parse_params
from qatune.profiles import DEFAULTS_FILE

ROOT = Path(__file__).resolve().parents[2]
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_project_params_validate():
    params = load_params(ROOT / "params.yaml")
    assert params.base_model.source == "bundled:smollm2-135m-instruct"
    assert params.train.trust_remote_code is False


def test_beta_is_a_top_level_key_so_dvc_exp_run_S_beta_changes_it():
    assert "beta" in RAW and isinstance(RAW["beta"], float)
    assert parse_params({**RAW, "beta": 0.2}).beta == 0.2


@pytest.mark.parametrize(("path", "name"), [((), "betta"), (("clean",), "max_lenght"), (("split",), "tset")])
def test_unknown_key_is_an_error_naming_it(path, name):
    data = copy.deepcopy(RAW)
    block = data
    for key in path:
        block = block[key]
    block[name] = 1
    with pytest.raises(QatuneError, match=f"unknown key '{'.'.join((*path, name))}'"):
        parse_params(data)


def test_unknown_key_in_a_source_is_an_error():
    data = copy.deepcopy(RAW)
    data["fetch"]["sources"][0]["sampels"] = 3
    with pytest.raises(QatuneError, match=r"unknown key 'fetch.sources.0.sampels'"):
        parse_params(data)


def test_wrong_type_and_missing_key():
    with pytest.raises(QatuneError, match="'beta'"):
        parse_params({**RAW, "beta": "high"})
    data = {k: v for k, v in RAW.items() if k != "split"}
    with pytest.raises(QatuneError, match="missing key 'split'"):
        parse_params(data)


def test_source_needs_its_location():
    data = copy.deepcopy(RAW)
    data["fetch"]["sources"] = [{"name": "x", "type": "hub"}]
    with pytest.raises(QatuneError, match="needs 'dataset'"):
        parse_params(data)


def test_prompt_limit_below_total_limit():
    data = copy.deepcopy(RAW)
    data["clean"]["max_prompt_length"] = 2048
    with pytest.raises(QatuneError, match="max_prompt_length"):
        parse_params(data)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(QatuneError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "p.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(QatuneError, match="invalid YAML"):
        load_params(bad)


def test_every_params_key_a_stage_reads_is_declared_in_dvc_yaml():
    """dvc.yaml's params lists only keys that exist, so `-S` on them reruns the right stages."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        for key in stage.get("params", []):
            node = RAW
            for part in key.split("."):
                assert part in node, f"stage {name} lists params key {key!r} that params.yaml lacks"
                node = node[part]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quantizations": ["f16", "q3_xx"]}, "export': quantizations: unknown type(s) ['q3_xx']"),
        ({"quantizations": ["f16", "f16"]}, "a type is listed twice"),
        ({"tolerance": {"f16": 0.02}}, "tolerance: none given for ['q8_0', 'q4_k_m']"),
        ({"modelfile_quant": "q4_0"}, "modelfile_quant: 'q4_0' is not in quantizations"),
    ],
)
def test_export_block_is_checked(change, message):
    data = copy.deepcopy(RAW)
    data["export"].update(change)
    with pytest.raises(QatuneError) as err:
        parse_params(data)
    assert message in str(err.value)


@pytest.mark.parametrize("block", ["sft", "dpo"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"early_stopping_patience": 2, "load_best_model_at_end": False},
            "{b}.early_stopping_patience: 2 needs {b}.load_best_model_at_end: true",
        ),
        (
            {"load_best_model_at_end": True, "eval_steps": 4, "save_steps": 6},
            "{b}.save_steps: 6 is not a multiple of {b}.eval_steps: 4",
        ),
    ],
)
def test_training_checkpoint_choices_are_checked_with_the_params(block, change, message):
    """check-params says it in one line, before any stage loads a model (the stages read params first)."""
    data = copy.deepcopy(RAW)
    data[block].update(change, enabled=True)  # the embedded default runs no SFT: the block is turned on here
    with pytest.raises(QatuneError) as err:
        parse_params(data)
    assert str(err.value).startswith(f"{PARAMS_FILE}: {message.format(b=block)}")  # one line, the keys named
    assert "\n" not in str(err.value)
    data[block]["enabled"] = False  # a block that trains nothing is not held to it
    assert not getattr(parse_params(data), block).enabled


def test_early_stopping_with_the_best_checkpoint_kept_is_valid():
    data = copy.deepcopy(RAW)
    data["sft"].update(early_stopping_patience=2, load_best_model_at_end=True, eval_steps=5, save_steps=10)
    assert parse_params(data).sft.early_stopping_patience == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"load_in_4bit": True, "load_in_8bit": True},
            "train.load_in_4bit and train.load_in_8bit are both true: choose one",
        ),
        (
            {"load_in_8bit": True, "distributed": "fsdp", "num_processes": 2},
            "train.load_in_8bit: FSDP shards 16-bit and 4-bit bases only",
        ),
        ({"prompt_format": "text"}, "'train.prompt_format': Input should be 'chat' or 'plain'"),
    ],
)
def test_quantisation_and_prompt_format_are_checked(change, message):
    data = copy.deepcopy(RAW)
    data["train"].update(change)
    with pytest.raises(QatuneError) as err:
        parse_params(data)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_new_keys_default_to_what_qatune_did_before():
    """8-bit off, the model's chat template, the chat app on the GPU when there is one in the dtype qatune
    chose, this pipeline's adapter: params.yaml states them, and a file without them means the same."""
    params = parse_params(RAW)
    assert (params.train.load_in_8bit, params.train.prompt_format) == (False, "chat")
    assert (params.chat.device, params.chat.dtype, params.chat.adapter) == ("auto", "auto", None)
    data = copy.deepcopy(RAW)
    for block, key in [("train", "load_in_8bit"), ("train", "prompt_format"), ("chat", "device")]:
        del data[block][key]
    for key in ("dtype", "adapter"):
        del data["chat"][key]
    assert parse_params(data) == params
    data["train"].update(load_in_8bit=True)  # 8-bit alone, or with ddp processes, is valid
    assert parse_params(data).train.load_in_8bit
    data["chat"].update(device="cpu", dtype="float32", adapter="someone/their-lora")
    assert parse_params(data).chat.adapter == "someone/their-lora"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"method": "kto", "loss_type": ["kto"], "batch_size": 1},
            "dpo.batch_size: 1 with dpo.loss_type [kto]: KTO estimates its KL term from the other answers",
        ),
        (
            {"loss_type": ["sigmoid", "exo_pair"]},
            "dpo.loss_type ['sigmoid', 'exo_pair'] with dpo.method 'dpo'",
        ),
    ],
)
def test_preference_choices_trl_refuses_are_checked_with_the_params(change, message):
    """What DPOTrainer and KTOTrainer refused only when built, after the model loaded (and the SFT model had
    answered the on-policy rows): a one-line error from check-params instead."""
    data = copy.deepcopy(RAW)
    data["dpo"].update(change, loss_weights=None)
    with pytest.raises(QatuneError) as err:
        parse_params(data)
    assert str(err.value).startswith(f"{PARAMS_FILE}: 'dpo': {message}") and "\n" not in str(err.value)


def test_kto_batches_of_one_pass_where_nothing_needs_a_batch_mate():
    data = copy.deepcopy(RAW)
    data["dpo"].update(method="kto", loss_type=["apo_zero_unpaired"], loss_weights=None, batch_size=1)
    assert parse_params(data).dpo.batch_size == 1  # no KL term estimated from the batch
    data["dpo"].update(loss_type=["kto"], enabled=False)  # a block that trains nothing is not held to it
    assert not parse_params(data).dpo.enabled


# Fields whose default recipe value is not the model's default, each with the reason. A key the recipe states
# as data (the system prompt, the Hub repos, the domain) has no default at all and needs no entry here.
NOT_A_DEFAULT = {
    "fetch.sources.*.path": "the bundled source's own file; a source's location depends on its type (a hub "
    "source has a dataset and no path), so no value suits every source",
}


def _model_of(annotation):
    """The params model inside a field's type (`X`, `X | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_model_of, typing.get_args(annotation))), None)


def _walk(model, node, key=""):
    """(dotted key, field, recipe value) for every key of a recipe mapping, in nested blocks and in the rows
    of a list of params models (fetch.sources: `fetch.sources.*.name`); a block or row itself is not listed."""
    unknown = [name for name in node if name not in model.model_fields]
    assert not unknown, f"{key or 'top level'}: keys without a model field: {unknown}"
    for name, value in node.items():
        field, dotted = model.model_fields[name], f"{key}{name}"
        rows = typing.get_args(field.annotation)[:1] if typing.get_origin(field.annotation) is list else ()
        if isinstance(value, dict) and _model_of(field.annotation):
            yield from _walk(_model_of(field.annotation), value, dotted + ".")
        elif isinstance(value, list) and rows and _model_of(rows[0]):
            for row in value:
                yield from _walk(_model_of(rows[0]), row, dotted + ".*.")
        else:
            yield dotted, field, value


def test_every_model_default_is_the_default_recipes_value():
    """One truth for defaults: a params file (or a test or script) that leaves a key out gets the value the
    default recipe states for it, never another value written in the code."""
    recipe = yaml.safe_load(DEFAULTS_FILE.read_text(encoding="utf-8"))
    leaves = list(_walk(Params, recipe))
    assert len(leaves) > 150  # the walk reached the nested blocks and the sources
    differ = {}
    for key, field, value in leaves:
        if field.is_required():
            continue  # the recipe's own data: no default to disagree with
        default = field.get_default(call_default_factory=True)
        if default != value or isinstance(default, bool) is not isinstance(value, bool):
            differ[key] = (default, value)
    stale = sorted(set(NOT_A_DEFAULT) - set(differ))
    assert not stale, f"NOT_A_DEFAULT lists keys whose default now equals the recipe: {stale}"
    wrong = [f"{key}: {d!r} != {v!r}" for key, (d, v) in differ.items() if key not in NOT_A_DEFAULT]
    assert not wrong, "model default != default recipe: " + "; ".join(wrong)


def test_a_params_file_without_the_defaulted_keys_means_the_default_recipe():
    """The recipe with every key that has a default left out parses to the same params as the full recipe."""
    recipe = yaml.safe_load(DEFAULTS_FILE.read_text(encoding="utf-8"))
    short = copy.deepcopy(recipe)
    for key, field, _ in _walk(Params, recipe):
        if field.is_required() or key in NOT_A_DEFAULT:
            continue
        *path, name = key.split(".")
        nodes = [short]
        for part in path:
            nodes = [row for node in nodes for row in node] if part == "*" else [node[part] for node in nodes]
        for node in nodes:
            del node[name]
    assert len(yaml.safe_dump(short)) < len(yaml.safe_dump(recipe)) / 2  # most keys have a default
    assert "score_precision" not in short["evaluate"] and "system_prompt" in short["train"]
    assert parse_params(short) == parse_params(recipe)
