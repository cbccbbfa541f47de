"""GPU test tiers: ``--gpu-tier smoke`` and ``--gpu-tier K/N``, so that each device call fits its time limit.

The whole GPU suite takes longer than one call on the device machine, so it runs in tiers:

- ``smoke``: one parametrization of every GPU test function (every fused op, every model family,
  every runtime path once): the quickest recorded one, else the first; hypothesis tests draw at most 4
  examples (``examples(n)`` for tests that set their own ``max_examples``). Meant to fit in four
  minutes on one H100.
- ``K/N`` (1 <= K <= N): part K of the GPU tests cut into N parts of about equal expected time. The
  cut keeps collection order (a module's tests stay together except at a cut, so module fixtures
  are built at most twice) and weighs each test by its duration in ``tests/gpu_durations.json``
  (written by ``--gpu-durations FILE`` on a device run; tests not in it weigh the median there, or
  1 s while the file is empty). Parts 1..N together hold every GPU test exactly once.

A tier selects GPU tests only (those marked ``gpu``); the CPU suite runs without one. Both options
are read by tests/conftest.py; bench/run_device.sh passes them (``TIER=smoke``, ``TIER=2/5``).
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Sequence

DURATIONS = Path(__file__).resolve().parents[1] / "gpu_durations.json"


def add_options(parser) -> None:
    group = parser.getgroup("fusediff GPU tiers")
    group.addoption("--gpu-tier", default=None, metavar="smoke|K/N",
                    help="run the GPU smoke tier, or part K of N of the GPU tests (tests/support/gpu_tiers.py)")
    group.addoption("--gpu-durations", default=None, metavar="FILE",
                    help="write each test's call+setup+teardown seconds to FILE as JSON (node id -> seconds)")


def parse_tier(text: str) -> tuple[int, int] | None:
    """``None`` for the smoke tier, ``(K, N)`` for a part; ``ValueError`` for anything else."""
    if text == "smoke":
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"--gpu-tier must be 'smoke' or K/N with 1 <= K <= N, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def function_id(nodeid: str) -> str:
    """A test's node id without its parametrization: ``a.py::test_x[fp16-3]`` -> ``a.py::test_x``."""
    return nodeid.split("[", 1)[0]


def smoke(nodeids: Sequence[str], durations: dict[str, float] | None = None) -> list[int]:
    """Indices of one parametrization of each test function, in order: the quickest one in ``durations``
    where any of them has a recorded time, else the first."""
    durations = durations or {}
    best: dict[str, int] = {}
    for i, nodeid in enumerate(nodeids):
        f = function_id(nodeid)
        if f not in best:
            best[f] = i
        elif nodeid in durations and durations[nodeid] < durations.get(nodeids[best[f]], float("inf")):
            best[f] = i
    return sorted(best.values())


_SMOKE = False


def examples(n: int) -> int:
    """A hypothesis test's ``max_examples``: ``n``, or at most 4 in the smoke tier (set before collection)."""
    return min(n, 4) if _SMOKE else n


def part(weights: Sequence[float], k: int, n: int) -> list[int]:
    """Indices of part ``k`` of ``n``: contiguous runs whose cumulative weight is cut at multiples of total/n.

    A test belongs to the part where its weight's midpoint falls, so every test lands in exactly one part.
    """
    total = float(sum(weights))
    if total <= 0:
        weights, total = [1.0] * len(weights), float(len(weights))
    keep, before = [], 0.0
    for i, w in enumerate(weights):
        mid = (before + w / 2) / total
        if min(int(mid * n), n - 1) == k - 1:
            keep.append(i)
        before += w
    return keep


def load_durations(path: Path = DURATIONS) -> dict[str, float]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of node id -> seconds")
    return {str(k): float(v) for k, v in data.items()}


def weights_for(nodeids: Sequence[str], durations: dict[str, float]) -> list[float]:
    default = statistics.median(durations.values()) if durations else 1.0
    return [durations.get(nodeid, default) for nodeid in nodeids]


def configure(config) -> None:
    """Before collection: the smoke tier's hypothesis budget; the duration recorder when asked for."""
    global _SMOKE
    _SMOKE = config.getoption("--gpu-tier") == "smoke"
    if _SMOKE:
        from hypothesis import settings
        settings.register_profile("fusediff-smoke", parent=settings.get_profile("fusediff"), max_examples=4)
        settings.load_profile("fusediff-smoke")
    if config.getoption("--gpu-durations"):
        config.pluginmanager.register(DurationRecorder(config.getoption("--gpu-durations")))


def select(config, items: list) -> None:
    """Keep only the items of the requested tier (in place); the rest are reported as deselected."""
    tier = config.getoption("--gpu-tier")
    if tier is None:
        return
    try:
        which = parse_tier(tier)
    except ValueError as exc:
        import pytest
        raise pytest.UsageError(str(exc)) from None
    gpu = [it for it in items if "gpu" in it.keywords]
    ids = [it.nodeid for it in gpu]
    durations = load_durations()
    idx = smoke(ids, durations) if which is None else part(weights_for(ids, durations), *which)
    chosen = {id(gpu[i]) for i in idx}
    config.hook.pytest_deselected(items=[it for it in items if id(it) not in chosen])
    items[:] = [it for it in items if id(it) in chosen]


class DurationRecorder:
    """Sums setup, call and teardown seconds per test (skipped ones left out) and writes them, merged into an
    existing file, atomically at the end."""

    def __init__(self, path: str):
        self.path, self.seconds, self.skipped = Path(path), {}, set()

    def pytest_runtest_logreport(self, report) -> None:
        if report.skipped:  # a skip's time says nothing about the test's
            self.skipped.add(report.nodeid)
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + float(report.duration)

    def pytest_sessionfinish(self) -> None:
        merged = load_durations(self.path)
        merged.update({k: round(v, 3) for k, v in self.seconds.items() if k not in self.skipped})
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(dict(sorted(merged.items())), indent=0) + "\n")
        tmp.replace(self.path)
