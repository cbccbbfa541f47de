"""GLIDE pipelines against glide-text2im's sampling, written out in the test (tests/models/glide_reference.py).

For each stage a tiny random checkpoint in the original layout is converted (``convert_glide``), loaded with
``DiffusionPipeline.from_pretrained`` and run with a seeded CPU generator; the expected image is glide-text2im's
``p_sample_loop`` over its respaced diffusion with the original forward, given the same noise:
- base: the notebook's guided ``model_fn`` on [cond; uncond] rows (2B rows; the uncond half's own noise is
  drawn from another generator and thrown away, as the notebook throws the half away), "25" respacing;
- upsample: ``low_res`` rounded to 8 bits, x_T = randn * upsample_temp, "fast27", no guidance;
- inpainting (base and upsample): the notebook's ``denoised_fn`` replacing x0 in the known region.
The tokens of the expected run come from the test's transcription of glide-text2im's BPE encoder.
"""

from __future__ import annotations

import pytest
import torch

from fusediff import DiffusionPipeline, GlideInpaintPipeline, GlidePipeline, GlideUpsamplePipeline
from fusediff.pipelines.glide_common import space_timesteps
from fusediff.pipelines.glide_convert import load_tokenizer

from models import glide_reference as ref
from pipelines.tiny_glide import build_glide, glide_tokens, vocabulary, write_vocabulary

ATOL = 1e-4  # float32 on the CPU; the measured figures are printed
# Inpainting replaces x0 through eps (glide_common): at t = 999 of the cosine schedule abar ~ 2e-9, so the
# fused step's x0 = (x - sqrt(1 - abar) eps') / sqrt(abar) cancels in float32 (~1e-3 in x0, scaled by
# sqrt(abar_prev) ~ 0.08 into x); glide-text2im assigns x0 directly. Measured 1.5e-4 on the base stage.
INPAINT_ATOL = 5e-4


def _reference_loop(state, options, prompts, respacing, seed, guidance=None, low_res=None, known=None, keep=None,
                    temp=1.0):
    """glide-text2im's sampling of ``prompts`` with the noise our pipeline draws from ``seed``."""
    size, batch = options["image_size"], len(prompts)
    shape = (batch, 3, size, size)
    g, other = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(12345)
    use = ref.space_timesteps(options["diffusion_steps"], respacing)
    guided = guidance is not None
    texts = list(prompts) + ([""] * batch if guided else [])
    tokens, mask = glide_tokens(texts, options["text_ctx"])
    rows = 2 * batch if guided else batch
    extra = {}
    if low_res is not None:
        extra["low_res"] = torch.cat([low_res] * (rows // batch))
    if keep is not None:
        extra["inpaint_image"] = torch.cat([known * keep] * (rows // batch))
        extra["inpaint_mask"] = torch.cat([keep] * (rows // batch))

    def model(x, ts):
        if not guided:
            return ref.forward(state, options, x, ts, tokens, mask, **extra)
        half = x[: len(x) // 2]  # the notebook's model_fn
        out = ref.forward(state, options, torch.cat([half, half]), ts, tokens, mask, **extra)
        eps, rest = out[:, :3], out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + guidance * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)

    def draw():
        ours = torch.randn(shape, generator=g)
        return torch.cat([ours, torch.randn(shape, generator=other)]) if guided else ours

    denoised_fn = None
    if keep is not None:  # the inpainting notebook's denoised_fn
        def denoised_fn(x_start):
            return x_start * (1 - extra["inpaint_mask"]) + extra["inpaint_image"] * extra["inpaint_mask"]
    betas = ref.named_betas(options["noise_schedule"], options["diffusion_steps"])
    x_T = draw() * temp
    with torch.no_grad():
        out = ref.p_sample_loop(model, (rows, 3, size, size), betas, use, x_T, lambda i: draw(), denoised_fn)
    return out[:batch]


def _load(directory):
    pipe = DiffusionPipeline.from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _compare(got, expected, what, atol=ATOL):
    err = (got - expected).abs().max().item()
    print(f"{what}: max |fusediff - glide-text2im| = {err:.2e} (image scale {expected.abs().max().item():.2f})")
    assert got.shape == expected.shape
    assert err <= atol


def test_tokenizer_gives_glides_token_ids(tmp_path):
    """transformers' GPT2Tokenizer (split_special_tokens) = glide-text2im's encoder, from either file naming."""
    from fusediff.pipelines.glide_common import tokens_and_mask

    encoder, merges = vocabulary()
    texts = ["an oil painting of a corgi", "A CORGI in Paint!", "  spaces\tand\nlines ", "café 3.14 it's",
             "<|endoftext|> x", "", "a" * 40]
    for glide_names in (False, True):
        tok = load_tokenizer(write_vocabulary(tmp_path / f"v{glide_names}", glide_names=glide_names))
        ids, mask = tokens_and_mask(tok, texts, 16, len(encoder) - 1)
        expected, expected_mask = glide_tokens(texts, 16)
        assert torch.equal(ids, expected) and torch.equal(mask, expected_mask)
    assert ref.bpe_encode("a corgi", encoder, merges)[-2:] == [encoder["Ġcorg"], encoder["i"]]


@pytest.mark.parametrize("respacing", ["100", "25", "fast27", "ddim50", "10,10,3,2,2", "1", 7])
def test_respacing_is_glides(respacing):
    assert space_timesteps(1000, respacing) == sorted(ref.space_timesteps(1000, str(respacing)), reverse=True)


def test_base_pipeline_reproduces_glides_guided_sampling(tmp_path):
    directory, state, options = build_glide(tmp_path, "base")
    pipe = _load(directory)
    assert isinstance(pipe, GlidePipeline)
    prompts = ["an oil painting of a corgi", "a corgi"]
    got = pipe(prompts, guidance_scale=3.0, timestep_respacing="25", generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    expected = _reference_loop(state, options, prompts, "25", 0, guidance=3.0)
    _compare(got, expected, "base, guided, 25 steps")


def test_upsample_pipeline_reproduces_glides_sampling(tmp_path):
    directory, state, options = build_glide(tmp_path, "upsample")
    pipe = _load(directory)
    assert isinstance(pipe, GlideUpsamplePipeline)
    low = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    got = pipe("a corgi", image=low, generator=torch.Generator().manual_seed(1), output_type="pt").images
    expected = _reference_loop(state, options, ["a corgi"], "fast27", 1, low_res=ref_quantize(low), temp=0.997)
    _compare(got, expected, "upsample, fast27, upsample_temp 0.997")


def ref_quantize(x):
    return ((x + 1) * 127.5).round() / 127.5 - 1  # the text2im notebook's low_res


def _mask(size):
    keep = torch.ones(1, 1, size, size)
    keep[:, :, size // 2:] = 0  # the inpainting notebook's mask: keep the top rows
    return keep


def test_inpaint_pipeline_reproduces_glides_inpainting(tmp_path):
    directory, state, options = build_glide(tmp_path, "base-inpaint")
    pipe = _load(directory)
    assert isinstance(pipe, GlideInpaintPipeline)
    size = options["image_size"]
    source = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    keep = _mask(size)
    got = pipe("a corgi", image=source, mask_image=1 - keep, guidance_scale=5.0, timestep_respacing="25",
               generator=torch.Generator().manual_seed(3), output_type="pt").images
    expected = _reference_loop(state, options, ["a corgi"], "25", 3, guidance=5.0, known=source, keep=keep)
    _compare(got, expected, "base inpainting, guided", INPAINT_ATOL)
    assert torch.allclose(got * keep, source * keep, atol=1e-4)  # the known region is the source


def test_upsample_inpaint_pipeline_reproduces_glides_inpainting(tmp_path):
    directory, state, options = build_glide(tmp_path, "upsample-inpaint")
    pipe = _load(directory)
    size = options["image_size"]
    source = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    low = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    keep = _mask(size)
    got = pipe("a corgi", image=low, original_image=source, mask_image=1 - keep,
               generator=torch.Generator().manual_seed(6), output_type="pt").images
    expected = _reference_loop(state, options, ["a corgi"], "fast27", 6, low_res=ref_quantize(low), known=source,
                               keep=keep, temp=0.997)
    _compare(got, expected, "upsample inpainting", INPAINT_ATOL)
