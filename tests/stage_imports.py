"""The libraries the stage scripts import, imported once in the test workers' fork server (tests/warm.py). Only
a head start: a name one library version lacks is imported by the stage itself, as in a new process."""

import contextlib
import importlib
import importlib.util

for name in ("torch", "transformers", "peft", "trl", "datasets", "accelerate"):
    if importlib.util.find_spec(name) is not None:
        importlib.import_module(name)

for module, names in {
    "transformers": ("AutoModelForCausalLM", "AutoTokenizer", "Trainer"),
    "trl": ("DPOConfig", "DPOTrainer", "KTOConfig", "KTOTrainer", "SFTConfig", "SFTTrainer"),
}.items():
    for attribute in names:
        with contextlib.suppress(ImportError, AttributeError):
            getattr(importlib.import_module(module), attribute)  # the lazy modules import on first access

# No qatune module: a stage's provenance digests the qatune modules it has imported (code_digest), so each
# script imports its own, as in a new process.
