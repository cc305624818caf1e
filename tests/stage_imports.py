"""What the stage scripts import, imported once in the test workers' fork server (tests/warm.py)."""

import datasets  # noqa: F401
import peft  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer  # noqa: F401
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer  # noqa: F401

import qatune.cli  # noqa: F401
import qatune.inference  # noqa: F401
import qatune.training  # noqa: F401
