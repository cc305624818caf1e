"""The user's seed systems (design documents, docs/seeds.md) that qatune reproduces as profiles: the tests
check each one's profile file, values and tiny run against this list."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Seed:
    """One of the user's seed systems (design documents) that qatune reproduces as a profile."""

    number: str  # the seed document's number
    profile: str  # file stem under profiles/
    base_model: str  # Hub id the profile trains
    family: str  # architecture family (tests.tiny builds a tiny random model of it for the profile's test)
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
