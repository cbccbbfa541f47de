"""What the command lines share (``fusediff`` and ``fusediff train``, and the benchmarks they run):
argparse value types, each parsing its text and checking a range with a one-line error otherwise, and
:class:`CliError` with :class:`OneLineParser`, which report a bad command line as one line."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _checked(parse: Callable[[str], float], ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse ``type``: ``parse(text)``, accepted when ``ok(value)``; else 'expected <expected>, got ...'."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    convert.__name__ = expected.replace(" ", "_")
    return convert


positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
probability = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")  # a rate that must leave something
unit_interval = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


class CliError(Exception):
    """An error reported to the user as one line, without a traceback; ``status`` is the exit code."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose parse errors raise :class:`CliError` (status 2) instead of printing usage."""

    def error(self, message: str) -> None:
        raise CliError(f"{message} (see '{self.prog} --help')", status=2)
