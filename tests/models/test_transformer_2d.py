"""Transformer2DModel, its attention and feed-forward against diffusers 0.42.1: names, outputs, checkpoints, errors.

Parity tests build diffusers' module from a seed, load its weights into fusediff's with
``strict=True`` and compare in fp32. The transformer adds its input to its output, so the
comparison is of ``out - x`` (what the transformer computes), relative to its largest
magnitude; the maximum difference is printed. Tensors are tiny and run on one thread.
"""

from __future__ import annotations

import copy
import inspect

import diffusers
import pytest
import torch
from diffusers.models import attention as d_attention
from diffusers.models import attention_processor as d_attn

import fusediff.kernels
from fusediff.models import Transformer2DModel
from fusediff.models.attention import Attention
from fusediff.models.feed_forward import FeedForward
from fusediff.models.transformer_2d import BasicTransformerBlock, Transformer2DModelOutput
from support import parity
from support.parity import assert_close, assert_same_seeded_init, one_thread, plain_config  # noqa: F401  (autouse)
from support.tolerance import assert_within_ref_error

BASE = dict(num_attention_heads=3, attention_head_dim=8, in_channels=16, norm_num_groups=4, cross_attention_dim=12)
CONFIGS = {
    "conv_proj": dict(BASE),
    "linear_proj_upcast": dict(BASE, use_linear_projection=True, upcast_attention=True),
    "only_cross_attention": dict(BASE, only_cross_attention=True),
    "double_self_attention": dict(BASE, double_self_attention=True, cross_attention_dim=None),
    "self_attention_only": dict(BASE, cross_attention_dim=None, num_layers=2),
    "gelu_two_layers": dict(BASE, activation_fn="gelu", num_layers=2, norm_eps=1e-6),
    "gelu_approximate_bias": dict(BASE, activation_fn="gelu-approximate", attention_bias=True),
    "geglu_approximate_no_affine": dict(BASE, activation_fn="geglu-approximate", norm_elementwise_affine=False),
    "one_wide_head": dict(BASE, num_attention_heads=1, attention_head_dim=40, use_linear_projection=True),
}


def build_pair(config: dict, seed: int = 0):
    return parity.build_pair(Transformer2DModel, config, seed)


def context_for(config: dict, batch: int = 2, length: int = 7) -> torch.Tensor | None:
    width = config.get("cross_attention_dim")
    return None if width is None or config.get("double_self_attention") else torch.randn(batch, length, width)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity(name):
    config = CONFIGS[name]
    theirs, ours = build_pair(config)
    x = torch.randn(2, 16, 5, 3)  # odd H and W: S = 15 positions
    context = context_for(config)
    with torch.no_grad():
        a, b = ours(x, context).sample, theirs(x, context).sample
    assert_close(a - x, b - x, name)


def test_seeded_init_and_names_match_diffusers():
    for config in (CONFIGS["conv_proj"], CONFIGS["only_cross_attention"], CONFIGS["gelu_approximate_bias"]):
        assert_same_seeded_init(Transformer2DModel, config)


def test_init_signature_and_config_match_diffusers():
    def signature(cls):
        return [(p.name, p.default, p.kind) for p in list(inspect.signature(cls.__init__).parameters.values())[1:]]

    assert signature(Transformer2DModel) == signature(diffusers.Transformer2DModel)
    theirs, ours = build_pair(CONFIGS["linear_proj_upcast"])
    assert plain_config(ours.config) == plain_config(theirs.config)


def test_checkpoints_load_both_ways(tmp_path):
    theirs, ours = build_pair(CONFIGS["only_cross_attention"], seed=4)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    theirs_loaded = diffusers.Transformer2DModel.from_pretrained(tmp_path / "ours").eval()
    ours_loaded = Transformer2DModel.from_pretrained(tmp_path / "theirs")
    x, context = torch.randn(1, 16, 4, 4), torch.randn(1, 3, 12)
    with torch.no_grad():
        expected = theirs(x, context).sample - x
        assert_close(theirs_loaded(x, context).sample - x, expected, "fusediff save -> diffusers load")
        assert_close(ours_loaded(x, context).sample - x, expected, "diffusers save -> fusediff load")


def test_return_types_and_kernel_routing(monkeypatch):
    _, ours = build_pair(dict(BASE, num_layers=2))
    calls = []
    attention = fusediff.kernels.attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape)))
        return attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(fusediff.kernels, "attention", spy)
    x, context = torch.randn(2, 16, 3, 5), torch.randn(2, 7, 12)
    with torch.no_grad():
        out = ours(x, context)
        tup = ours(x, context, return_dict=False)
    assert isinstance(out, Transformer2DModelOutput) and isinstance(tup, tuple) and torch.equal(out.sample, tup[0])
    # per block: self-attention over the 15 positions, then cross-attention over the 7 context tokens
    assert calls[:4] == [((2, 3, 15, 8), (2, 3, 15, 8)), ((2, 3, 15, 8), (2, 3, 7, 8))] * 2


def test_ref_backend_equals_default():
    _, ours = build_pair(CONFIGS["linear_proj_upcast"])
    x, context = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 12)
    with torch.no_grad():
        default = ours(x, context).sample
        with fusediff.kernels.use_backend("ref"):
            assert torch.equal(ours(x, context).sample, default)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_upcast_attention(dtype):
    """In half precision (upcast_attention) ours is about as close to an fp64 run as diffusers' own half run is."""
    theirs, ours = build_pair(CONFIGS["linear_proj_upcast"], seed=2)
    x, context = torch.randn(2, 16, 5, 3) * 0.01, torch.randn(2, 7, 12) * 4  # small x: the output is the transformer's
    with torch.no_grad():
        exact = copy.deepcopy(ours).double()(x.double(), context.double()).sample
        a = copy.deepcopy(ours).to(dtype)(x.to(dtype), context.to(dtype)).sample
        b = copy.deepcopy(theirs).to(dtype)(x.to(dtype), context.to(dtype)).sample
    print(f"{dtype}: ours {(a.double() - exact).abs().max():.2e}, diffusers {(b.double() - exact).abs().max():.2e}")
    assert_within_ref_error(a, b, exact, f"Transformer2DModel {dtype}")


# -- the pieces: cross-attention and feed-forward against diffusers' modules ------------------------

@pytest.mark.parametrize("cross_dim, bias, groups", [(None, False, None), (12, False, None), (12, True, 4)],
                         ids=["self", "cross", "bias_group_norm"])
def test_sequence_attention(cross_dim, bias, groups):
    torch.manual_seed(0)
    theirs = d_attn.Attention(16, cross_attention_dim=cross_dim, heads=2, dim_head=8, bias=bias,
                              norm_num_groups=groups).eval()
    ours = Attention(16, heads=2, dim_head=8, bias=bias, cross_attention_dim=cross_dim, norm_num_groups=groups,
                     residual_connection=False).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 9, 16)
    context = None if cross_dim is None else torch.randn(2, 4, cross_dim)
    with torch.no_grad():
        assert_close(ours(x, context), theirs(x, context), f"attention cross_dim={cross_dim}")


@pytest.mark.parametrize("activation_fn", ["geglu", "geglu-approximate", "gelu", "gelu-approximate"])
def test_feed_forward(activation_fn):
    torch.manual_seed(0)
    theirs = d_attention.FeedForward(16, activation_fn=activation_fn, final_dropout=True).eval()
    ours = FeedForward(16, activation_fn=activation_fn, final_dropout=True).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 5, 16) * 3
    with torch.no_grad():
        assert_close(ours(x), theirs(x), activation_fn)


def test_basic_transformer_block_against_diffusers():
    torch.manual_seed(0)
    args = dict(dim=16, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=12, ff_inner_dim=24,
                ff_bias=False, attention_out_bias=False)
    theirs = d_attention.BasicTransformerBlock(**args).eval()
    ours = BasicTransformerBlock(**args).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, context = torch.randn(2, 6, 16), torch.randn(2, 3, 12)
    with torch.no_grad():
        assert_close(ours(x, context) - x, theirs(x, encoder_hidden_states=context) - x, "BasicTransformerBlock")


# -- validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, error, match", [
    (dict(num_vector_embeds=10), NotImplementedError, "num_vector_embeds"),
    (dict(patch_size=2), NotImplementedError, "patch_size"),
    (dict(num_embeds_ada_norm=100), NotImplementedError, "num_embeds_ada_norm"),
    (dict(norm_type="ada_norm_zero"), NotImplementedError, "norm_type"),
    (dict(attention_type="gated"), NotImplementedError, "attention_type"),
    (dict(caption_channels=8), NotImplementedError, "caption_channels"),
    (dict(in_channels=None), ValueError, "in_channels is required"),
    (dict(out_channels=8), ValueError, "out_channels"),
    (dict(activation_fn="swiglu"), ValueError, "activation_fn"),
    (dict(norm_num_groups=5), ValueError, "divisible"),
    (dict(num_attention_heads=0), ValueError, "num_attention_heads"),
])
def test_bad_config_raises(override, error, match):
    with pytest.raises(error, match=match):
        Transformer2DModel(**dict(BASE, **override))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer2DModel(**BASE).eval()


@pytest.mark.parametrize("x, context, kwargs, error, match", [
    (torch.randn(2, 8, 4, 4), torch.randn(2, 3, 12), {}, ValueError, r"shape \(B, 16, H, W\)"),
    (torch.randn(2, 16, 16), torch.randn(2, 3, 12), {}, ValueError, r"shape \(B, 16, H, W\)"),
    (torch.randn(2, 16, 4, 4), torch.randn(2, 3, 10), {}, ValueError, r"encoder_hidden_states must have shape"),
    (torch.randn(2, 16, 4, 4), torch.randn(3, 3, 12), {}, ValueError, r"\(2, L, 12\)"),
    (torch.randn(2, 16, 4, 4), None, {}, ValueError, "needs encoder_hidden_states"),
    (torch.randn(2, 16, 4, 4), torch.randn(2, 3, 12), dict(encoder_attention_mask=torch.ones(2, 3)),
     NotImplementedError, "encoder_attention_mask"),
    (torch.randn(2, 16, 4, 4), torch.randn(2, 3, 12), dict(attention_mask=torch.ones(2, 16)),
     NotImplementedError, "attention_mask"),
    (torch.randn(2, 16, 4, 4), torch.randn(2, 3, 12), dict(cross_attention_kwargs={"scale": 0.5}),
     NotImplementedError, "cross_attention_kwargs"),
    (torch.randn(2, 16, 4, 4), torch.randn(2, 3, 12), dict(timestep=torch.tensor([1, 2])),
     NotImplementedError, "timestep"),
])
def test_bad_input_raises(model, x, context, kwargs, error, match):
    with pytest.raises(error, match=match):
        model(x, context, **kwargs)


def test_empty_cross_attention_kwargs_accepted(model):
    x, context = torch.randn(1, 16, 2, 2), torch.randn(1, 3, 12)
    with torch.no_grad():
        assert torch.equal(model(x, context, cross_attention_kwargs={}).sample, model(x, context).sample)
