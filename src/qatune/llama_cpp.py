"""llama.cpp's runtime as qatune uses it: importing llama-cpp-python with a clear error when it is missing,
keeping the C library's logging off the stage's output, and the name of every GGUF file the export stage
writes. Shared by the export stage (which writes and checks the files) and `qatune ask`/`chat`/`serve` in
gguf mode (which load one), so both spell a GGUF's name the same way.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from qatune.errors import QatuneError

GGUF_PREFIX = "model-"


def gguf_name(quant: str) -> str:
    """The file name of the exported GGUF in type `quant`: model-q4_k_m.gguf."""
    return f"{GGUF_PREFIX}{quant}.gguf"


def gguf_quant(path: str | Path) -> str:
    """The type a GGUF's file name says (gguf_name's inverse); another file's name without its suffix."""
    return Path(path).stem.removeprefix(GGUF_PREFIX)


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError as err:
        raise QatuneError(
            f"llama.cpp's runtime is not installed ({err}); run `make setup` (it builds llama-cpp-python)"
        ) from None
    return llama_cpp


@contextmanager
def stderr_to(log_file: Path):
    """llama.cpp's C code logs to file descriptor 2: into log_file instead, so stage output stays readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log_file, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
