"""fusediff.patch / unpatch on HF diffusers' models and pipelines, on the CPU.

A patched model is compared with the same model unpatched (fp32; both run PyTorch ops on the CPU,
so they agree to ~1e-5 of the output's largest magnitude) and spies on fusediff.kernels show that
the patch routes through fusediff's kernels, so a patch that changed nothing fails. unpatch must give
bit-identical outputs, the original processor objects and no leftover attributes. One test runs the
Triton kernels (TRITON_INTERPRET=1 with the fused backend) inside a patched model.
"""

from __future__ import annotations

import copy
import functools

import diffusers
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from pipelines.tiny_sd import UNET, VAE, sd_components
from support.parity import assert_close
from support.spy import record_calls

import fusediff
from fusediff import kernels as K
from fusediff.kernels import _backend
from fusediff.patching import FusedAttnProcessor, patched, report

UNET2D = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
              down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
              norm_num_groups=4, attention_head_dim=8)


def build(cls, config, seed=0):
    torch.manual_seed(seed)
    return cls(**config).eval()


def spies(monkeypatch):
    """Calls of fusediff's kernels, by name."""
    return {name: record_calls(monkeypatch, K, name)
            for name in ("group_norm", "attention", "timestep_embedding", "geglu")}


def counts(calls):
    return {name: len(c) for name, c in calls.items()}


def unet2d_inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 8, 8, generator=g), torch.tensor([3, 900][:batch])


def cond_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 7, 16, generator=g)


def check_patched(model, run, monkeypatch, what):
    """Patch ``model``; its output agrees with the unpatched one and each kernel ran; returns the calls."""
    with torch.no_grad():
        expected = run(model)
        fusediff.patch(model)
        calls = spies(monkeypatch)
        got = run(model)
    assert_close(got, expected, what)
    print(f"{what}: kernel calls {counts(calls)}")
    assert report(model).skipped == {}, report(model).skipped
    return calls


# --- models and pipelines agree, through fusediff's kernels ----------------------------------

@pytest.mark.parametrize("shift", ["default", "scale_shift"])
def test_unet2d_model_patched_agrees(monkeypatch, shift):
    unet = build(diffusers.UNet2DModel, dict(UNET2D, resnet_time_scale_shift=shift))
    x, t = unet2d_inputs()
    calls = check_patched(unet, lambda m: m(x, t).sample, monkeypatch, f"UNet2DModel {shift}")
    resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    attentions = [m for m in unet.modules() if isinstance(m, Attention)]
    assert len(calls["group_norm"]) >= 2 * len(resnets) + len(attentions)
    assert len(calls["attention"]) == len(attentions) > 0
    assert len(calls["timestep_embedding"]) == 1


def test_resnet_norms_and_silu_modules_do_not_run_when_patched():
    # the block's GroupNorm and SiLU modules are bypassed: GroupNorm + SiLU is one kernel call
    unet = build(diffusers.UNet2DModel, UNET2D)
    x, t = unet2d_inputs()
    fired = []
    for block in (m for m in unet.modules() if isinstance(m, ResnetBlock2D)):
        for sub in (block.norm1, block.norm2, block.nonlinearity):
            sub.register_forward_hook(lambda *_: fired.append(1))
    with torch.no_grad():
        unet(x, t)
        unpatched = len(fired)
        fusediff.patch(unet)(x, t)
    assert unpatched > 0 and len(fired) == unpatched, (unpatched, len(fired) - unpatched)


@pytest.mark.parametrize("linear", [False, True], ids=["conv_proj", "linear_proj"])
def test_unet2d_condition_model_patched_agrees(monkeypatch, linear):
    unet = build(diffusers.UNet2DConditionModel, dict(UNET, use_linear_projection=linear))
    x, t, cond = cond_inputs()
    calls = check_patched(unet, lambda m: m(x, t, cond).sample, monkeypatch, f"UNet2DConditionModel linear={linear}")
    cross = [c for c in calls["attention"] if c[1].shape[2] == cond.shape[1]]  # keys from the 7 context tokens
    assert len(calls["attention"]) == sum(isinstance(m, Attention) for m in unet.modules())
    assert len(cross) == len(calls["attention"]) // 2 > 0


def test_autoencoder_kl_patched_agrees(monkeypatch):
    vae = build(diffusers.AutoencoderKL, VAE)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    calls = check_patched(vae, lambda m: m.decode(m.encode(image).latent_dist.mode()).sample, monkeypatch,
                          "AutoencoderKL encode + decode")
    assert len(calls["attention"]) == 2  # the encoder's and the decoder's mid-block
    assert len(calls["group_norm"]) > 0


@pytest.mark.parametrize("library", [diffusers, fusediff], ids=["diffusers", "fusediff"])
def test_ddpm_pipeline_patched_agrees(monkeypatch, library):
    # fusediff's pipelines take diffusers' models too: patch walks either kind's components
    unet = build(diffusers.UNet2DModel, UNET2D)
    pipe = library.DDPMPipeline(unet=unet, scheduler=library.DDPMScheduler(num_train_timesteps=50))
    pipe.set_progress_bar_config(disable=True)
    run = lambda p: torch.from_numpy(p(generator=torch.Generator().manual_seed(0), num_inference_steps=3,  # noqa: E731
                                       output_type="np").images)
    calls = check_patched(pipe, run, monkeypatch, f"{library.__name__} DDPMPipeline")
    assert len(calls["timestep_embedding"]) == 3
    assert all(name.startswith("unet.") for name in report(pipe).patched)


def test_stable_diffusion_pipeline_patched_agrees(monkeypatch, tmp_path):
    pipe = diffusers.StableDiffusionPipeline(**sd_components(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(4)
    embeds, negative = torch.randn(1, 7, 16, generator=g), torch.randn(1, 7, 16, generator=g)
    run = lambda p: torch.from_numpy(p(prompt_embeds=embeds, negative_prompt_embeds=negative, height=32,  # noqa: E731
                                       width=32, num_inference_steps=2, guidance_scale=5.0, output_type="np",
                                       generator=torch.Generator().manual_seed(0)).images)
    calls = check_patched(pipe, run, monkeypatch, "StableDiffusionPipeline")
    kinds = {name.split(".")[0] for name in report(pipe).patched}
    assert kinds == {"unet", "vae"}, kinds  # CLIP has nothing fusediff replaces
    assert len(calls["timestep_embedding"]) == 2 and len(calls["attention"]) > 0
    assert len(calls["geglu"]) > 0  # the transformer blocks' feed-forward


def test_channels_last_input_keeps_its_layout(monkeypatch):
    unet = build(diffusers.UNet2DModel, UNET2D).to(memory_format=torch.channels_last)
    x, t = unet2d_inputs()
    x = x.contiguous(memory_format=torch.channels_last)
    calls = check_patched(unet, lambda m: m(x, t).sample, monkeypatch, "UNet2DModel channels-last")
    layouts = [c[0].is_contiguous(memory_format=torch.channels_last) for c in calls["group_norm"]]
    assert all(layouts), f"{layouts.count(False)} of {len(layouts)} GroupNorm inputs were not channels-last"


# --- single blocks: ResnetBlock2D and Attention variants ---------------------------------------

RESNETS = {
    "shortcut": dict(in_channels=8, out_channels=16),
    "conv_shortcut_flag": dict(in_channels=8, out_channels=8, use_in_shortcut=True),
    "up": dict(in_channels=8, up=True),
    "down_scale_shift": dict(in_channels=8, down=True, time_embedding_norm="scale_shift"),
    "skip_time_act_scaled": dict(in_channels=8, skip_time_act=True, output_scale_factor=2.0),
    "no_temb": dict(in_channels=8, out_channels=16, temb_channels=None),
    "vae_decoder_group": dict(in_channels=8, temb_channels=None, time_embedding_norm="group"),
}


@pytest.mark.parametrize("name", list(RESNETS))
def test_resnet_block_variants_agree(monkeypatch, name):
    config = {"groups": 4, "temb_channels": 12, **RESNETS[name]}
    block = build(ResnetBlock2D, config)
    g = torch.Generator().manual_seed(5)
    x, temb = torch.randn(2, 8, 6, 6, generator=g), torch.randn(2, 12, generator=g)
    temb = None if config["temb_channels"] is None else temb
    calls = check_patched(block, lambda m: m(x, temb), monkeypatch, f"ResnetBlock2D {name}")
    assert len(calls["group_norm"]) == 2


ATTENTIONS = {  # Attention kwargs, input shape, context shape
    "spatial_group_norm_residual": (dict(query_dim=16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True,
                                         rescale_output_factor=2.0, bias=True), (2, 16, 5, 3), None),
    "sequence_cross_layer_norm": (dict(query_dim=16, cross_attention_dim=12, heads=4, dim_head=4,
                                       cross_attention_norm="layer_norm"), (2, 9, 16), (2, 5, 12)),
    "sequence_group_norm": (dict(query_dim=16, heads=1, dim_head=16, norm_num_groups=2), (2, 9, 16), None),
    "classic_processor_unscaled": (dict(query_dim=16, heads=2, dim_head=8, scale_qk=False), (2, 9, 16), None),
}


@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_attention_variants_agree(monkeypatch, name):
    kwargs, shape, context_shape = ATTENTIONS[name]
    attn = build(Attention, kwargs)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(shape, generator=g)
    context = None if context_shape is None else torch.randn(context_shape, generator=g)
    original = attn.processor
    calls = check_patched(attn, lambda m: m(x, context), monkeypatch, f"Attention {name}")
    assert type(attn.processor) is FusedAttnProcessor and attn.processor.original is original
    assert len(calls["attention"]) == 1


def test_attention_mask_runs_the_original_processor(monkeypatch):
    attn = build(Attention, dict(query_dim=16, heads=2, dim_head=8))
    g = torch.Generator().manual_seed(7)
    x, context = torch.randn(2, 6, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    mask = torch.zeros(2, 1, 5)
    mask[1, :, 3:] = -10000.0
    with torch.no_grad():
        expected = attn(x, context, attention_mask=mask)
        fusediff.patch(attn)
        calls = spies(monkeypatch)
        got = attn(x, context, attention_mask=mask)
    assert torch.equal(got, expected) and calls["attention"] == []


def test_custom_processor_is_left_alone_with_a_warning():
    class MyProcessor(AttnProcessor2_0):
        pass

    unet = build(diffusers.UNet2DModel, UNET2D)
    attentions = [m for m in unet.modules() if isinstance(m, Attention)]
    custom = MyProcessor()
    attentions[0].set_processor(custom)
    attentions[1].set_processor(AttnProcessor())  # diffusers' other default: replaced
    with pytest.warns(UserWarning, match="MyProcessor is not one of diffusers' defaults"):
        fusediff.patch(unet)
    assert attentions[0].processor is custom and "forward" not in attentions[0].__dict__
    assert all(type(a.processor) is FusedAttnProcessor for a in attentions[1:])
    assert len(report(unet).skipped) == 1


def test_processor_set_after_patch_runs_and_survives_unpatch(monkeypatch):
    attn = build(Attention, dict(query_dim=16, heads=2, dim_head=8))
    x = torch.randn(2, 6, 16)
    fusediff.patch(attn)
    mine = AttnProcessor2_0()
    attn.set_processor(mine)
    calls = spies(monkeypatch)
    with torch.no_grad():
        attn(x)
    assert calls["attention"] == []
    fusediff.unpatch(attn)
    assert attn.processor is mine and "forward" not in attn.__dict__


def test_unsupported_modules_are_reported_and_left_alone():
    block = build(ResnetBlock2D, dict(in_channels=8, temb_channels=None, groups=4, non_linearity="mish"))
    timesteps = diffusers.models.embeddings.Timesteps(2, True, 1)  # dim // 2 - shift = 0: diffusers gives NaN
    model = torch.nn.ModuleDict(dict(block=block, timesteps=timesteps))
    with pytest.warns(UserWarning, match="left 2 module"):
        fusediff.patch(model)
    skipped = report(model).skipped
    print(skipped)
    assert set(skipped) == {"block", "timesteps"} and "Mish" in skipped["block"]
    assert set(report(model).patched) == {"block.norm1", "block.norm2"}  # its GroupNorms are fused alone
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        assert_close(block(x, None), fusediff.unpatch(model)["block"](x, None), "mish ResnetBlock2D")


def test_a_module_with_its_own_forward_is_skipped():
    norm = torch.nn.GroupNorm(2, 4)
    norm.forward = functools.partial(torch.nn.GroupNorm.forward, norm)  # as accelerate's hooks do
    with pytest.warns(UserWarning, match="own instance forward"):
        fusediff.patch(norm)
    assert norm.forward.func is torch.nn.GroupNorm.forward


def test_plain_torch_group_norm_is_patched(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.SiLU())
    x = torch.randn(2, 3, 9, 7)
    calls = check_patched(model, lambda m: m(x), monkeypatch, "Sequential with GroupNorm")
    assert len(calls["group_norm"]) == 1


# --- unpatch, idempotency, bad input -------------------------------------------------------

def state_of(model):
    """Per module: its __dict__ keys, and its attention processor object."""
    return {name: (sorted(vars(m)), getattr(m, "processor", None)) for name, m in model.named_modules()}


def test_unpatch_restores_everything_bit_for_bit():
    unet = build(diffusers.UNet2DConditionModel, UNET)
    x, t, cond = cond_inputs()
    before = state_of(unet)
    with torch.no_grad():
        expected = unet(x, t, cond).sample
        fusediff.patch(unet)
        assert report(unet).patched and report(unet).patchable == {}
        unet(x, t, cond)
        fusediff.unpatch(unet)
        got = unet(x, t, cond).sample
    assert torch.equal(got, expected)
    after = state_of(unet)
    for name, (keys, processor) in before.items():
        assert after[name][0] == keys, f"{name}: attributes {set(after[name][0]) ^ set(keys)} differ"
        assert after[name][1] is processor, f"{name}: processor {after[name][1]} is not the original"
    assert report(unet).patched == {} and report(unet).patchable


def test_patch_is_idempotent_and_unpatch_of_unpatched_is_a_noop():
    unet = build(diffusers.UNet2DModel, UNET2D)
    before = state_of(unet)
    assert fusediff.unpatch(unet) is unet and state_of(unet) == before
    assert fusediff.patch(unet) is unet
    once = {name: (m.__dict__.get("forward"), getattr(m, "processor", None)) for name, m in unet.named_modules()}
    fusediff.patch(unet)
    twice = {name: (m.__dict__.get("forward"), getattr(m, "processor", None)) for name, m in unet.named_modules()}
    assert all(once[n][0] is twice[n][0] and once[n][1] is twice[n][1] for n in once)
    fusediff.unpatch(fusediff.unpatch(unet))
    assert state_of(unet) == before


def test_context_manager_and_deepcopy():
    unet = build(diffusers.UNet2DModel, UNET2D)
    with patched(unet) as same:
        assert same is unet and report(unet).patchable == {}
        twin = copy.deepcopy(unet)
    assert report(unet).patched == {}
    assert report(twin).patched and report(twin).patchable == {}  # the copy's forwards are bound to the copy
    x, t = unet2d_inputs()
    with torch.no_grad():
        assert_close(twin(x, t).sample, unet(x, t).sample, "deep copy of a patched UNet")
        fusediff.unpatch(twin)
        assert torch.equal(twin(x, t).sample, unet(x, t).sample)


@pytest.mark.parametrize("bad", [42, None, "unet", {"unet": torch.nn.GroupNorm(1, 2)}], ids=repr)
def test_patch_refuses_what_is_not_a_module_or_pipeline(bad):
    for fn in (fusediff.patch, fusediff.unpatch):
        with pytest.raises(TypeError, match="expected a torch.nn.Module or a pipeline"):
            fn(bad)


# --- the Triton kernels inside a patched model (TRITON_INTERPRET=1) -----------------------------

@pytest.mark.skipif(not (_backend._interpreting() and _backend._have_triton()),
                    reason="runs the Triton kernels on CPU tensors only under TRITON_INTERPRET=1")
def test_patched_unet_runs_the_triton_kernels_in_the_interpreter(monkeypatch):
    unet = build(diffusers.UNet2DConditionModel, UNET)
    x, t, cond = cond_inputs()
    launches = {op: record_calls(monkeypatch, _backend.triton_module(op), "launch")
                for op in ("group_norm", "attention", "timestep_embedding")}
    with torch.no_grad():
        expected = unet(x, t, cond).sample
        with K.use_backend("fused"):
            got = fusediff.patch(unet)(x, t, cond).sample
    assert_close(got, expected, "UNet2DConditionModel, Triton kernels in the interpreter", rtol=1e-4)
    assert all(launches.values()), {op: len(c) for op, c in launches.items()}
    assert np.isfinite(got.numpy()).all()
