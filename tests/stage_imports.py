"""What the stage scripts import, imported once in the test workers' fork server (tests/warm.py). Only a head
start: a name one library version lacks is imported by the stage itself, as in a new process."""

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

import qatune.cli  # noqa: E402, F401
import qatune.inference  # noqa: E402, F401
import qatune.training  # noqa: E402, F401
