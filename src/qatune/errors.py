"""Errors that stop a stage with one clear line instead of a traceback, and the check that raises one when a
stage's input is missing."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path


class QatuneError(Exception):
    """A fatal, user-facing problem: the message names the file, line and field where it can."""


def fail_cleanly(main: Callable[..., object]) -> Callable[..., object]:
    """Run a stage's main(); a QatuneError exits 1 with its one-line message on stderr."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return main(*args, **kwargs)
        except QatuneError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper


def require(path: str | Path, what: str) -> Path:
    """The path, or a one-line error saying that an earlier stage has not run."""
    path = Path(path)
    if not path.exists():
        raise QatuneError(f"{path}: missing {what}; run the earlier stages first (dvc repro)")
    return path
