"""Shared helpers of the model parity tests: fusediff's model against diffusers' with the same weights.

A pair is built from a seed (diffusers' model, then fusediff's holding its weights, ``strict=True``),
and outputs are compared in fp32 relative to the output's largest magnitude (the maximum difference is
printed). The same helpers check seeded initialisation, configs, and checkpoints saved by one library
and loaded by the other.
"""

from __future__ import annotations

import json

import diffusers
import pytest
import torch

RTOL = 1e-5  # max |ours - diffusers| / max |diffusers|, fp32


def theirs_of(ours_cls: type) -> type:
    """diffusers' class of the same name as fusediff's ``ours_cls``."""
    return getattr(diffusers, ours_cls.__name__)


def build_pair(ours_cls: type, config: dict, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """diffusers' model from ``seed`` and fusediff's ``ours_cls`` holding the same weights, both in eval mode."""
    torch.manual_seed(seed)
    theirs = theirs_of(ours_cls)(**config).eval()
    ours = ours_cls(**config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """Same shape and dtype, finite, and max |ours - theirs| <= rtol * max |theirs|; prints the difference."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (what, ours.shape, theirs.shape, ours.dtype)
    diff = (ours - theirs).abs().max().item()
    scale = max(theirs.abs().max().item(), 1e-6)
    print(f"{what}: max |diff| {diff:.2e}, relative {diff / scale:.2e}")
    assert torch.isfinite(ours).all(), what
    assert diff <= rtol * scale, f"{what}: max |diff| {diff:.3e} > {rtol:g} x {scale:.3e}"


def run_both(theirs, ours, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``.sample`` of ours and of theirs on the same arguments, without gradients (ours first)."""
    with torch.no_grad():
        return ours(*args, **kwargs).sample, theirs(*args, **kwargs).sample


def plain_config(config) -> dict:
    """Config without bookkeeping keys, as JSON types (tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def assert_same_seeded_init(ours_cls: type, config: dict, what: str = "") -> None:
    """Built from the same seed, ours has diffusers' parameter names, in order, and values."""
    torch.manual_seed(3)
    theirs = theirs_of(ours_cls)(**config).state_dict()
    torch.manual_seed(3)
    ours = ours_cls(**config).state_dict()
    assert list(ours) == list(theirs), what
    assert [k for k in theirs if not torch.equal(ours[k], theirs[k])] == [], what


def saved_and_loaded_by_diffusers(ours, path):
    """``ours`` saved to ``path`` and loaded by diffusers (eval mode), with an equal config; returns diffusers'."""
    ours.save_pretrained(path)
    theirs = theirs_of(type(ours)).from_pretrained(path).eval()
    assert plain_config(theirs.config) == plain_config(ours.config)
    return theirs


def saved_by_diffusers_and_loaded(theirs, path, ours_cls: type):
    """diffusers' ``theirs`` saved to ``path`` and loaded by ``ours_cls`` (in eval mode, with an equal config);
    returns ours."""
    theirs.save_pretrained(path)
    ours = ours_cls.from_pretrained(path)
    assert not ours.training and plain_config(ours.config) == plain_config(theirs.config)
    return ours


def save_with_legacy_attention_names(model, path) -> dict:
    """Save ``model``'s config to ``path`` and its weights under the old attention names (query, key, value,
    proj_attn), as old checkpoints hold them; returns the renamed state dict."""
    from safetensors.torch import save_file

    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for name, tensor in model.state_dict().items():
        for new, old in renames.items():
            name = name.replace(f".{new}.", f".{old}.")
        legacy[name] = tensor.contiguous()
    model.save_config(path)
    save_file(legacy, str(path / "diffusion_pytorch_model.safetensors"))
    return legacy


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops run faster on one thread than on contended ones; restored after the module.

    Autouse in each test module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
