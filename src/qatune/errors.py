"""Errors that stop a stage with one clear line instead of a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


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
