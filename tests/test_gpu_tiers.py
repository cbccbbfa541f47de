"""The GPU tiers' selection (tests/support/gpu_tiers.py): smoke keeps one test per function, the K/N parts
cover every test exactly once with balanced expected time, bad tiers are usage errors, durations merge."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from support import gpu_tiers


def test_parse_tier_accepts_smoke_and_parts_and_refuses_the_rest():
    assert gpu_tiers.parse_tier("smoke") is None
    assert gpu_tiers.parse_tier("2/5") == (2, 5)
    for bad in ("0/3", "4/3", "fast", "1-3", "/2", ""):
        with pytest.raises(ValueError, match="K/N"):
            gpu_tiers.parse_tier(bad)


def test_smoke_keeps_the_first_parametrization_of_each_function():
    ids = ["a.py::t1[fp16]", "a.py::t1[bf16]", "a.py::t2", "b.py::t1[x]", "a.py::t1[fp32]", "b.py::t1[y]"]
    assert gpu_tiers.smoke(ids) == [0, 2, 3]


def test_smoke_takes_the_quickest_recorded_parametrization():
    ids = ["a.py::t1[big]", "a.py::t1[small]", "a.py::t1[new]", "a.py::t2[x]", "a.py::t2[y]"]
    assert gpu_tiers.smoke(ids, {"a.py::t1[big]": 9.0, "a.py::t1[small]": 0.5, "a.py::t2[y]": 1.0}) == [1, 4]


def test_examples_are_capped_only_in_the_smoke_tier(monkeypatch):
    assert gpu_tiers.examples(25) == 25
    monkeypatch.setattr(gpu_tiers, "_SMOKE", True)
    assert gpu_tiers.examples(25) == 4 and gpu_tiers.examples(2) == 2


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_parts_cover_every_test_once_in_order_and_balance_time(n):
    rng = random.Random(n)
    weights = [rng.choice([0.01, 0.5, 2.0, 30.0]) for _ in range(97)]
    parts = [gpu_tiers.part(weights, k, n) for k in range(1, n + 1)]
    flat = [i for p in parts for i in p]
    assert flat == list(range(len(weights))), "parts must be disjoint, complete and contiguous in order"
    total, biggest = sum(weights), max(weights)
    loads = [sum(weights[i] for i in p) for p in parts]
    assert max(loads) <= total / n + biggest, (loads, total / n)


def test_parts_of_zero_weights_fall_back_to_counts():
    parts = [gpu_tiers.part([0.0] * 10, k, 2) for k in (1, 2)]
    assert parts == [list(range(5)), list(range(5, 10))]


def test_unknown_tests_weigh_the_median_of_the_known_ones():
    assert gpu_tiers.weights_for(["a", "b", "c"], {"a": 1.0, "x": 3.0, "y": 5.0}) == [1.0, 3.0, 3.0]
    assert gpu_tiers.weights_for(["a"], {}) == [1.0]


def test_duration_recorder_merges_leaves_skips_out_and_writes_whole_files(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"old::t": 4.0, "a::t": 9.0}))
    rec = gpu_tiers.DurationRecorder(str(path))
    for nodeid, dur, skipped in [("a::t", 0.5, False), ("a::t", 1.25, False), ("s::t", 0.1, True)]:
        rec.pytest_runtest_logreport(SimpleNamespace(nodeid=nodeid, duration=dur, skipped=skipped))
    rec.pytest_sessionfinish()
    assert json.loads(path.read_text()) == {"a::t": 1.75, "old::t": 4.0}
    assert not list(tmp_path.glob("*.tmp"))


def test_a_bad_tier_is_a_usage_error_and_a_part_runs_only_gpu_tests(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_cpu(): pass\n"
        "@pytest.mark.gpu\n@pytest.mark.parametrize('i', range(4))\ndef test_gpu(i): pass\n")
    conftest = Path(__file__).with_name("conftest.py")
    (tmp_path / "conftest.py").write_text(conftest.read_text())
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: gpu\n")
    env_path = str(Path(__file__).parent)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "--co", "-p", "no:cacheprovider", *args,
                               "--rootdir", str(tmp_path), str(tmp_path)],
                              capture_output=True, text=True, cwd=tmp_path, env={**_env(), "PYTHONPATH": env_path})

    bad = run("--gpu-tier", "9/2")
    assert bad.returncode == 4 and "K/N" in bad.stderr, bad.stdout + bad.stderr
    smoke = run("--gpu-tier", "smoke")
    assert "test_gpu[0]" in smoke.stdout and "test_gpu[1]" not in smoke.stdout and "test_cpu" not in smoke.stdout
    halves = [run("--gpu-tier", f"{k}/2").stdout for k in (1, 2)]
    assert [sum(f"test_gpu[{i}]" in h for i in range(4)) for h in halves] == [2, 2], halves


def _env():
    import os
    return {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
