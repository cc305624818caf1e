"""`qatune chat --compare` on two tiny models (the random base and its merged random LoRA), driven by a real
headless Chromium: ask, read both answers, vote, check the votes file, and read that file back the way the
fetch and clean stages do, as preference pairs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qatune.clean import choose_format
from qatune.fetch import envelope, load_source
from qatune.formats import RowError, normalise_text, to_canonical
from qatune.params import SourceParams
from tests.stages.test_chat import CHROMIUM_FLAGS, chat_project, free_port, qatune, wait_for_http

__all__ = ["chat_project"]  # the fixture, shared with test_chat.py


@pytest.fixture
def compare_server(chat_project: Path, tmp_path: Path):
    """`qatune chat --compare` (base vs final by default) on a free local port, votes under tmp_path."""
    port = free_port()
    log = tmp_path / "compare.log"
    votes = tmp_path / "feedback" / "votes.jsonl"
    exe = Path(sys.executable).parent / "qatune"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            # Sampled: greedy, the random base answers only with newlines (an empty answer).
            [str(exe), "chat", "--compare", "--temperature", "1", "--port", str(port), "--votes", str(votes)],
            cwd=chat_project,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_http(url, proc, log)
        yield url, votes
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def as_shown(text: str) -> str:
    """A text as an HTML textarea's value gives it back (the HTML standard's newline normalisation)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def test_compare_votes_in_a_real_browser_become_preference_pairs(compare_server, tmp_path: Path):
    from playwright.sync_api import expect, sync_playwright

    url, votes = compare_server
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed; the browser test needs it (make setup installs it)"
    shown = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url)
            expect(page.get_by_text("which answer is better?")).to_be_visible(timeout=30_000)
            expect(page.locator("#compare-tally")).to_contain_text("No votes yet")
            question = page.locator("#compare-question textarea")
            for pick, button in (("left", "#vote-left"), ("both_bad", "#vote-both-bad")):
                question.fill("How much protein do I need to build muscle?")
                page.locator("#compare-ask").click()
                expect(page.locator(button)).to_be_enabled(timeout=60_000)  # both answers are in
                left = page.locator("#compare-left textarea").input_value()
                right = page.locator("#compare-right textarea").input_value()
                assert left.strip() and right.strip()
                page.locator(button).click()
                reveal = page.locator("#compare-reveal")
                expect(reveal).to_contain_text("Left: models/", timeout=30_000)  # names shown after the vote
                expect(page.locator(button)).to_be_disabled()  # one vote per question
                shown.append((pick, left, right, reveal.inner_text()))
            tally = page.locator("#compare-tally")
            expect(tally).to_contain_text("models/merged")
            expect(tally).to_contain_text("models/base")
            page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
        finally:
            browser.close()

    rows = [json.loads(line) for line in votes.read_text().splitlines()]
    assert len(rows) == 2
    for row, (pick, left, right, reveal) in zip(rows, shown, strict=True):
        assert row["pick"] == pick and row["prompt"] == "How much protein do I need to build muscle?"
        # a textarea's value has its line breaks normalised (CR LF and a lone CR become LF): the votes file
        # keeps the answers as generated, which a random tiny model may give a stray CR
        assert (as_shown(row["left_answer"]), as_shown(row["right_answer"])) == (left, right)
        assert {row["left_model"], row["right_model"]} == {"models/base", "models/merged"}
        assert f"Left: {row['left_model']}" in reveal and row["time"]
    assert (rows[0]["chosen"], rows[0]["rejected"]) == (rows[0]["left_answer"], rows[0]["right_answer"])
    assert rows[0]["chosen_model"] == rows[0]["left_model"]
    assert rows[1]["chosen"] is None and rows[1]["rejected"] is None  # both bad: kept, never a pair

    # The file as a `local` source: fetch reads it, clean's auto-detection calls it preference data.
    source = SourceParams(name="votes", type="local", path=str(votes))
    raw, provenance = load_source(source)
    envelopes = [envelope("votes", provenance["file"], row) for row in raw]
    fmt = choose_format(envelopes, source.format, "votes")
    assert fmt == "preference"
    # Two sampled answers of random models: different texts, so a pair.
    pair = to_canonical(envelopes[0]["record"], fmt, 10_000)
    expected = (normalise_text(rows[0]["chosen"]), normalise_text(rows[0]["rejected"]))
    assert (pair["chosen"], pair["rejected"]) == expected  # random text: clean drops its control characters
    assert pair["meta"]["chosen_model"] == rows[0]["chosen_model"]
    with pytest.raises(RowError):
        to_canonical(envelopes[1]["record"], fmt, 10_000)


def test_compare_needs_two_different_models(chat_project: Path):
    out = qatune(["chat", "--compare", "models/merged"], chat_project)
    assert out.returncode == 1 and "give two models or none" in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
