"""Loading from a Hugging Face Hub cache the test builds, offline (DESIGN.md, decision 9)."""

from __future__ import annotations

import socket

import pytest
import torch
from support.tiny_model import Tiny
from support.hub_cache import add_to_cache

from fusediff.hub import resolve_directory


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def cache(tmp_path):
    torch.manual_seed(0)
    main, other = Tiny(hidden=4), Tiny(hidden=6)
    main.save_pretrained(tmp_path / "src-main" / "unet")
    other.save_pretrained(tmp_path / "src-v2" / "unet")
    cache_dir = tmp_path / "hf-cache"
    add_to_cache(cache_dir, "fusediff-test/tiny", tmp_path / "src-main")
    add_to_cache(cache_dir, "fusediff-test/tiny", tmp_path / "src-v2", revision="v2")
    return cache_dir, main, other


def test_model_loads_from_cache_offline(cache):
    cache_dir, main, _ = cache
    loaded = Tiny.from_pretrained("fusediff-test/tiny", subfolder="unet", cache_dir=cache_dir, local_files_only=True)
    assert loaded.config.hidden == 4
    for k, v in main.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_revision_selects_snapshot(cache):
    cache_dir, _, other = cache
    loaded = Tiny.from_pretrained("fusediff-test/tiny", subfolder="unet", revision="v2", cache_dir=cache_dir,
                                  local_files_only=True)
    assert loaded.config.hidden == 6
    assert torch.equal(loaded.inp.weight, other.inp.weight)


def test_uncached_repo_is_a_clear_error(cache):
    cache_dir, _, _ = cache
    with pytest.raises(FileNotFoundError, match="could not find 'fusediff-test/absent' in the local cache"):
        Tiny.from_pretrained("fusediff-test/absent", cache_dir=cache_dir, local_files_only=True)


def test_missing_subfolder(cache):
    cache_dir, _, _ = cache
    with pytest.raises(FileNotFoundError, match="no subfolder 'vae'"):
        resolve_directory("fusediff-test/tiny", subfolder="vae", cache_dir=cache_dir, local_files_only=True)


@pytest.mark.parametrize("name", ["not a repo!", "a/b/c/d", "./missing-dir", "/no/such/dir"])
def test_bad_names(name, tmp_path):
    with pytest.raises(FileNotFoundError):
        resolve_directory(name, cache_dir=tmp_path, local_files_only=True)


def test_subfolder_cannot_escape(tmp_path):
    (tmp_path / "inner").mkdir()
    with pytest.raises(ValueError, match="escapes"):
        resolve_directory(tmp_path / "inner", subfolder="../inner")
