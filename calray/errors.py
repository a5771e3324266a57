"""The errors calray raises for bad input: each names the file, key or path at fault."""

from __future__ import annotations

import sys
from typing import Callable


class CalrayError(Exception):
    """Base class: a problem the user can fix, reported as one line."""


class ConfigError(CalrayError, ValueError):
    """A malformed config file, an unknown key, a wrong type or a bad override."""


class DatasetError(CalrayError, FileNotFoundError):
    """A missing or malformed dataset file; names the path and the preparation script."""

    def __init__(self, message: str, path=None, script: str | None = None):
        parts = [message]
        if path is not None:
            parts.append(f"(path: {path})")
        if script:
            parts.append(f"— prepare the data with `python scripts/{script}`; see docs/DATASETS.md")
        super().__init__(" ".join(parts))
        self.path = path
        self.script = script


class TrainingError(CalrayError, RuntimeError):
    """A run that cannot go on (non-finite loss, diverged contributions)."""


def run_cli(body: Callable[[], int | None]) -> int:
    """Run a command-line entry point's body: a CalrayError — a problem the user can fix — is one
    line on stderr and exit status 2, never a traceback. Every `python -m calray.*` main uses this."""
    try:
        return body() or 0
    except CalrayError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
