"""Model cards and release helpers as pure functions: metadata, tables, defensive reading of metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qatune import hub
from qatune.cards import CardInputs, evaluation_table, render_card
from qatune.errors import QatuneError
from qatune.params import GenerateParams, load_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


def card(params, role="adapter", **kw) -> str:
    """A card for org/base, whose own card names apache-2.0 (the licence `domain.license: auto` follows)."""
    other = "me/merged" if role == "adapter" else "me/lora"
    kw.setdefault("base_license", "apache-2.0")
    return render_card(
        CardInputs(
            role=role, repo_id=f"me/{role}", sibling_repo=other, base_id="org/base", params=params, **kw
        )
    )


def front_matter(text: str) -> dict:
    """The card's metadata as huggingface_hub's own parser reads it (the Hub's tools use the same)."""
    from huggingface_hub import ModelCard

    parsed = ModelCard(text)
    assert yaml.safe_load(text.split("\n---\n", 1)[0].removeprefix("---\n")) == parsed.data.to_dict()
    return parsed.data.to_dict()


EVALUATION = {
    "models": {
        "base": {"nll": 3.4, "preference_accuracy": 0.36, "rouge_l": 0.2},
        "final": {"nll": 3.08, "preference_accuracy": 0.44, "rouge_l": 0.22},
    },
    "test_rows": 64,
}


def test_metadata_per_role(params):
    adapter, merged = front_matter(card(params)), front_matter(card(params, "merged"))
    assert adapter["library_name"] == "peft" and adapter["base_model_relation"] == "adapter"
    assert merged["library_name"] == "transformers" and merged["base_model_relation"] == "finetune"
    for meta in (adapter, merged):
        assert meta["base_model"] == "org/base" and meta["pipeline_tag"] == "text-generation"
        assert meta["license"] == "apache-2.0" and set(params.domain.tags) <= set(meta["tags"])
        assert "datasets" not in meta  # the bundled data has no Hub id


def test_evaluation_results_are_model_index_metadata(params):
    from huggingface_hub import ModelCard

    for role in ("adapter", "merged"):
        parsed = ModelCard(card(params, role, evaluation=EVALUATION))
        results = {r.metric_type: r for r in parsed.data.eval_results}
        assert set(results) == {"nll", "preference_accuracy", "rouge_l"}
        assert results["nll"].metric_value == 3.08 and results["preference_accuracy"].metric_value == 0.44
        assert (
            results["nll"].metric_name.startswith("answer NLL")
            and results["nll"].task_type == "text-generation"
        )
        assert results["nll"].dataset_split == "test" and parsed.data.model_name == role
    assert ModelCard(card(params)).data.eval_results is None  # nothing measured, nothing claimed


def with_recipe(params, sft=True, dpo=True, method="dpo"):
    return params.model_copy(
        update={
            "sft": params.sft.model_copy(update={"enabled": sft}),
            "dpo": params.dpo.model_copy(update={"enabled": dpo, "method": method}),
        }
    )


@pytest.mark.parametrize(
    ("sft", "dpo", "method", "words", "tags", "not_tags"),
    [
        (
            True,
            True,
            "dpo",
            "(SFT) on the good answers, then direct preference optimisation",
            {"sft", "dpo"},
            {"kto"},
        ),
        (True, True, "kto", "then KTO on answers labelled good or bad", {"sft", "kto"}, {"dpo"}),
        (False, True, "dpo", "straight from the base model (no SFT run", {"dpo"}, {"sft"}),
        (True, False, "dpo", ": supervised fine-tuning (SFT) on the answers.", {"sft"}, {"dpo", "kto"}),
    ],
)
def test_card_prose_and_tags_describe_what_this_run_did(params, sft, dpo, method, words, tags, not_tags):
    text = card(with_recipe(params, sft, dpo, method))
    assert words in text and "qatune's bundled fitness and nutrition preference set" in text
    meta = front_matter(text)
    assert tags <= set(meta["tags"]) and not (not_tags & set(meta["tags"]))


def test_card_names_hub_datasets_it_trained_on(params):
    from qatune.params import SourceParams

    hub_source = SourceParams(
        name="psy", type="hub", dataset="jkhedri/psychology-dataset", format="response_jk"
    )
    other = params.model_copy(
        update={
            "fetch": params.fetch.model_copy(update={"sources": [hub_source]}),
            "domain": params.domain.model_copy(update={"name": "psychology"}),
        }
    )
    assert "[jkhedri/psychology-dataset](https://huggingface.co/datasets/jkhedri/psychology-dataset)" in card(
        other
    )
    intro = card(other).split("\n# ", 1)[1].split("\n## ", 1)[0]
    assert "fitness" not in intro and "psychology-dataset" in intro  # the prose follows the data and domain
    assert "into a psychology question-answering assistant" in intro


def test_evaluation_table_reads_defensively():
    evaluation = {
        "models": {
            "base": {"nll": 3.0, "rouge_l": 0.2, "only_base": 1.0, "note": "text", "flag": True},
            "final": {"nll": 2.5, "rouge_l": 0.3, "extra_metric": 0.4, "flag": False},
        },
        "test_rows": 50,
    }
    table = evaluation_table(evaluation)
    nll, rouge = (
        "answer NLL (nats/token, reference answers) (lower is better)",
        "ROUGE-L F1 vs reference (higher is better)",
    )
    assert f"| {nll} | 3 | 2.5 | -0.5 |" in table and f"| {rouge} | 0.2 | 0.3 | +0.1 |" in table
    assert "only_base" not in table and "extra_metric" not in table and "flag" not in table
    assert "| SFT |" not in table.splitlines()[4]  # no sft block -> no SFT column
    assert "50 held-out test rows" in table
    with_sft = evaluation_table({"models": {**evaluation["models"], "sft": {"nll": 2.7}}})
    assert f"| {nll} | 3 | 2.7 | 2.5 | -0.5 |" in with_sft and f"| {rouge} | 0.2 | – | 0.3 |" in with_sft


@pytest.mark.parametrize("evaluation", [None, {}, {"models": {"base": {"nll": 1.0}}}, {"models": "broken"}])
def test_missing_evaluation_says_not_run(params, evaluation):
    assert "Evaluation was not run" in card(params, evaluation=evaluation)


def test_merged_card_has_generation_settings_and_loading_snippets(params):
    adapter, merged = card(params), card(params, "merged")
    assert "AutoPeftModelForCausalLM" in adapter and "PeftModel.from_pretrained" in adapter
    assert 'AutoModelForCausalLM.from_pretrained("me/merged")' in merged and "Generation settings" in merged
    assert json.dumps(params.train.system_prompt) in adapter  # the prompt it was trained with, escaped
    assert "Not medical or dietary advice" in merged and "English only" in merged
    assert "skipped" not in adapter


def test_dpo_disabled_is_stated(params):
    off = params.model_copy(update={"dpo": params.dpo.model_copy(update={"enabled": False})})
    assert "DPO: skipped" in card(off, dpo={"enabled": False})


def test_generation_config_sampling_and_greedy():
    merged = {"eos_token_id": 2, "pad_token_id": 2, "bos_token_id": None, "use_cache": True}
    sampled = hub.generation_config(merged, GenerateParams(temperature=0.7, top_p=0.8))
    assert sampled["do_sample"] is True and sampled["temperature"] == 0.7 and sampled["top_p"] == 0.8
    assert sampled["eos_token_id"] == sampled["pad_token_id"] == 2 and "bos_token_id" not in sampled
    greedy = hub.generation_config(merged, GenerateParams(temperature=0.0))
    assert greedy["do_sample"] is False and "temperature" not in greedy and "top_p" not in greedy


def test_base_id_resolution_order(tmp_path):
    (tmp_path / "qatune_base.json").write_text(json.dumps({"hub_id": "recorded/id"}))
    assert hub.resolve_base_id("configured/id", tmp_path, "x") == "configured/id"
    assert hub.resolve_base_id(None, tmp_path, "x") == "recorded/id"
    (tmp_path / "qatune_base.json").write_text(json.dumps({"hub_id": None}))
    assert hub.resolve_base_id(None, tmp_path, "org/model") == "org/model"
    with pytest.raises(QatuneError, match="hub.base_model_id"):
        hub.resolve_base_id(None, tmp_path, str(tmp_path))


def test_git_blob_sha1_matches_git(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"hello\n")
    assert hub.git_blob_sha1(path) == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object`


def test_local_paths_are_refused_before_release(tmp_path):
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "tokenizer.json").write_text(
        json.dumps({"vocab": {str(tmp_path): 1}})
    )  # vocabularies are skipped
    (staged / "config.json").write_text(json.dumps({"_name_or_path": "org/model"}))
    needles = hub.local_path_needles(tmp_path)
    hub.check_no_local_paths(staged, needles)
    (staged / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(tmp_path / "base")})
    )
    with pytest.raises(QatuneError, match="adapter_config.json: contains the local path"):
        hub.check_no_local_paths(staged, needles)


@pytest.mark.parametrize(
    ("front", "expected"),
    [
        ("base_model: org/base\n", "org/base"),
        ("base_model:\n- 'org/base'   # the first of several\n- other/model\n", "org/base"),
        ('license: mit\nbase_model: "org/quoted"\n', "org/quoted"),
        ("license: mit\n", None),
    ],
)
def test_base_model_is_read_with_huggingface_hubs_parser(tmp_path, front, expected):
    from qatune.base_model import card_base_model

    card = tmp_path / "README.md"
    card.write_text(f"---\n{front}---\n\n# A model\n\nbase_model: not/this-one (body text)\n")
    assert card_base_model(card) == expected


def test_unreadable_card_metadata_is_one_line(tmp_path):
    from qatune.base_model import card_base_model

    card = tmp_path / "README.md"
    card.write_text("---\nbase_model: [unclosed\n---\n")
    with pytest.raises(QatuneError, match=r"README.md: unreadable model card metadata"):
        card_base_model(card)


def test_gguf_card_needs_the_export_metrics_and_sizes_read_plainly(params):
    from qatune.cards import file_size

    for export in (None, {"enabled": True, "files": []}):
        with pytest.raises(ValueError, match="metrics/export.json"):
            card(params, "gguf", export=export)
    assert [file_size(n) for n in (None, 512, 2_500, 105_453_920, 2_700_000_000)] == [
        "–",
        "512 B",
        "2.5 kB",
        "105 MB",
        "2.7 GB",
    ]
