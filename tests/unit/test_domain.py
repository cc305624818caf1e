"""The domain lives in params, not in code: params `domain` gives the app's texts, the demo questions, the
referral words the measures count, the cards' example, tags and licence, and each seed profile its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from qatune import demo, hub, stance
from qatune.cards import CardInputs, render_card
from qatune.errors import QatuneError
from qatune.params import load_params, parse_params
from qatune.profiles import merged

ROOT = Path(__file__).resolve().parents[2]
# Words of the embedded default's subject. Bundled data files (src/qatune/data/) may hold them, code may not;
# names of bundled files (fitness_pairs) are not words here, as `\b` does not split at "_".
DOMAIN_WORDS = re.compile(
    r"\b(?:fitness|nutrition|nutritional|gym|protein|proteins|creatine)\b", re.IGNORECASE
)
# Each seed profile, its base model and the licence a release of it must carry.
SEEDS = {
    "seed000-qwen3-dpo": "apache-2.0",
    "seed001-qwen25-sft": "apache-2.0",
    "seed002-gemma-psychology": "gemma",
    "seed003-mistral-qlora": "apache-2.0",
    "seed004-llama32-finetome": "llama3.2",
}


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


def test_no_domain_words_in_code():
    files = sorted((ROOT / "src" / "qatune").rglob("*.py")) + sorted((ROOT / "stages").glob("*.py"))
    data = ROOT / "src" / "qatune" / "data"
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()[:80]}"
        for path in files
        if data not in path.parents
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if DOMAIN_WORDS.search(line)
    ]
    assert len(files) > 40 and not found, (
        "domain words in code (move them to params `domain`):\n" + "\n".join(found)
    )


def test_the_embedded_default_keeps_its_questions_and_referral_words(params):
    """`bundled` reads the files shipped with the bundled dataset: the same 10 questions and 34 referral words."""
    questions = demo.demo_questions(questions=params.domain.demo_questions)
    assert len(questions) == 10 and questions[:3] == [
        "What are the benefits of regular exercise?",
        "How often should I do strength training?",
        "What is a healthy diet plan for weight loss?",
    ]
    assert [r["prompt"][0]["content"] for r in demo.demo_rows(4, params.domain.demo_questions)] == questions[
        :4
    ]
    pattern = stance.referral_vocabulary(params.domain.referral)
    assert pattern.pattern == stance.REFERRAL.pattern and pattern.flags & re.IGNORECASE
    assert len(pattern.pattern.split("|")) == 34 and pattern.pattern.startswith("doctor|physio|GP\\b|")


def test_lists_come_inline_from_a_file_or_bundled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("q.txt").write_text("# my questions\n\nFirst?\n  Second?  \n", encoding="utf-8")
    assert demo.demo_questions(questions="q.txt") == ["First?", "Second?"]
    assert demo.demo_questions(1, ["Only?", "Not this one?"]) == ["Only?"]
    with pytest.raises(QatuneError, match=r"domain.demo_questions: missing.txt: no such file"):
        demo.demo_questions(questions="missing.txt")
    Path("empty.txt").write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(QatuneError, match=r"domain.referral: the list is empty"):
        stance.referral_vocabulary("empty.txt")
    with pytest.raises(QatuneError, match=r"domain.referral: not a regular expression"):
        stance.referral_vocabulary(["therap(ist"])


@pytest.mark.parametrize(
    ("setting", "base_id", "card", "expected"),
    [
        ("auto", "HuggingFaceTB/SmolLM2-135M-Instruct", None, "apache-2.0"),
        ("auto", "Qwen/Qwen2.5-0.5B-Instruct", None, "apache-2.0"),
        ("auto", "Qwen/Qwen2.5-3B-Instruct", None, "other"),  # qwen-research, not apache-2.0
        ("auto", "google/gemma-2b-it", None, "gemma"),
        ("auto", "unsloth/Llama-3.2-3B-Instruct", None, "llama3.2"),
        ("auto", "meta-llama/Llama-3.1-8B-Instruct", None, "llama3.1"),
        ("auto", "mistralai/Mistral-7B-Instruct-v0.1", None, "apache-2.0"),
        ("auto", "org/anything", "cc-by-4.0", "cc-by-4.0"),  # the base's own card comes first
        ("mit", "google/gemma-2b-it", "gemma", "mit"),  # a value given is the value used
    ],
)
def test_the_licence_follows_the_base_model(setting, base_id, card, expected):
    assert hub.release_license(setting, base_id, card) == expected


def test_an_unknown_base_licence_is_an_error_not_a_guess(tmp_path):
    with pytest.raises(
        QatuneError, match=r"does not know the licence of the base model org/base: set domain.license"
    ):
        hub.release_license("auto", "org/base")
    (tmp_path / "README.md").write_text("---\nlicense: llama3.2\nbase_model: x/y\n---\n# A model\n")
    assert hub.card_license(tmp_path / "README.md") == "llama3.2"
    assert hub.card_license(tmp_path / "missing.md") is None


def test_the_domain_block_is_strict_and_has_no_defaults_in_code():
    data = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    data["domain"]["titel"] = "typo"
    with pytest.raises(QatuneError, match=r"unknown key 'domain.titel'"):
        parse_params(data)
    del data["domain"]["titel"], data["domain"]["title"]
    with pytest.raises(QatuneError, match=r"missing key 'domain.title'"):
        parse_params(data)
    for moved in (("chat", "title"), ("chat", "placeholder"), ("hub", "tags"), ("hub", "license")):
        data = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
        data[moved[0]][moved[1]] = "x"
        with pytest.raises(QatuneError, match=f"unknown key '{'.'.join(moved)}'"):
            parse_params(data)


def base_id(p) -> str:
    return (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
        if p.base_model.source.startswith("bundled:")
        else p.base_model.source
    )


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_each_seed_profile_releases_under_its_base_models_licence(name):
    _, p = merged(name, ROOT / "params.yaml", ROOT / "profiles")
    assert hub.release_license(p.domain.license, base_id(p)) == SEEDS[name]
    assert "smollm2" not in p.hub.merged_repo and "smollm2" not in p.hub.adapter_repo
    assert demo.demo_questions(questions=p.domain.demo_questions)  # readable from the profile alone
    stance.referral_vocabulary(p.domain.referral)


def test_seed_002s_card_is_a_psychology_card_under_gemmas_licence():
    _, p = merged("seed002-gemma-psychology", ROOT / "params.yaml", ROOT / "profiles")
    for role in ("adapter", "merged"):
        text = render_card(
            CardInputs(
                role=role,
                repo_id=p.hub.adapter_repo,
                sibling_repo=p.hub.merged_repo,
                base_id=base_id(p),
                params=p,
            )
        )
        meta = yaml.safe_load(text.split("\n---\n", 1)[0].removeprefix("---\n"))
        assert meta["license"] == "gemma" and {"psychology", "mental-health"} <= set(meta["tags"])
        assert not {"fitness", "nutrition"} & set(meta["tags"])
        assert "psychology and mental health support question-answering assistant" in text
        assert p.domain.usage_question in text and "**Not therapy, diagnosis or crisis support.**" in text
        assert not DOMAIN_WORDS.search(text) and "dietitian" not in text


def test_the_default_card_keeps_the_fitness_texts(params):
    text = render_card(
        CardInputs(
            role="merged",
            repo_id="me/m",
            sibling_repo="me/l",
            base_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            params=params,
        )
    )
    meta = yaml.safe_load(text.split("\n---\n", 1)[0].removeprefix("---\n"))
    assert meta["license"] == "apache-2.0" and {"qatune", "fitness", "nutrition"} <= set(meta["tags"])
    assert '"content": "How much protein do I need to build muscle?"' in text
    assert "## Limitations\n\n- **Not medical or dietary advice.**" in text


def test_the_chat_app_shows_the_profiles_domain():
    pytest.importorskip("gradio")
    from types import SimpleNamespace

    from qatune import app

    _, p = merged("seed002-gemma-psychology", ROOT / "params.yaml", ROOT / "profiles")
    loaded = SimpleNamespace(source="models/merged", device="cpu", dtype="float32")
    ui = app.build_app(loaded, p, p.generate)
    assert ui.title == "qatune: psychology support QA"
    assert [e[0] for e in ui.examples] == p.domain.demo_questions[: app.EXAMPLES]
    assert ui.textbox.placeholder == p.domain.placeholder
    assert "**Not therapy, diagnosis or crisis support.**" in app.description(p, loaded)
    assert not DOMAIN_WORDS.search(app.description(p, loaded))
