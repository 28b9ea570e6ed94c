"""Errors about bad input, and the ``--on-error skip|stop`` policy that decides what they do."""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field


class PrepError(Exception):
    """A problem the user can fix (bad input, bad config, mismatched output dir): shown without a traceback."""

    exit_status = 1  # of the command that reports it


class DirInUse(PrepError):
    """Another process holds a directory's lock (``fsutil.lock_dir``); ``pid`` is 0 when unknown."""

    exit_status = 2

    def __init__(self, message: str, pid: int = 0):
        super().__init__(message)
        self.pid = pid


class Stopped(BaseException):
    """A stop signal (SIGTERM) reached the main process: unwinds like KeyboardInterrupt does."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def write_error(path, err: OSError) -> PrepError:
    """``writing PATH: No space left on device``: an OSError met while writing an output file."""
    return PrepError(f"writing {path}: {err.strerror or err}")


class InputError(PrepError):
    """Bad input at a place in a file.  ``reason`` is a short counter name, e.g. ``invalid_utf8``."""

    def __init__(self, path, line: int | None, message: str, reason: str = "bad_input"):
        self.path = str(path)
        self.line = line
        self.message = message
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


ON_ERROR_CHOICES = ("skip", "stop")


@dataclass
class ErrorPolicy:
    """``stop`` raises the first InputError; ``skip`` counts it by reason and goes on.

    The first ``max_warnings`` skipped problems are printed to stderr so that the user sees
    what kind of damage the input has; the rest are only counted.
    """

    mode: str = "stop"
    max_warnings: int = 20
    counts: Counter = field(default_factory=Counter)
    warned: int = 0

    def __post_init__(self):
        if self.mode not in ON_ERROR_CHOICES:
            raise PrepError(f"on_error must be one of {ON_ERROR_CHOICES}, got {self.mode!r}")

    def handle(self, err: InputError) -> None:
        if self.mode == "stop":
            raise err
        self.counts[err.reason] += 1
        if self.warned < self.max_warnings:
            self.warned += 1
            print(f"data_prep: skipped: {err}", file=sys.stderr)
            if self.warned == self.max_warnings:
                print("data_prep: further skipped input is only counted (see the summary)", file=sys.stderr)
