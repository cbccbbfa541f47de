"""argparse value types shared by the command line and the benchmarks it runs: each parses its text
and checks a range, with a one-line error otherwise."""

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
