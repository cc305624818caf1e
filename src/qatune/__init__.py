"""qatune: turn a small open LLM into a domain question-answering bot, reproducibly."""

__version__ = "0.1.0"
