"""GLIDE's models: a tiny random checkpoint in glide-text2im's layout, converted, against the original forward.

The original forward and layout are written out in tests/models/glide_reference.py (formulas cited there).
For each kind (base, upsample, base-inpaint, upsample-inpaint) the converted GlideTextEncoder +
UNet2DConditionModel must give the original model's output within 1e-5 (float32, CPU, reference kernels).
The converter must refuse missing, unexpected and mis-shaped tensors, naming them, and write nothing.
"""

from __future__ import annotations

import pytest
import torch

from fusediff import UNet2DConditionModel
from fusediff.models.glide_text_encoder import GlideTextEncoder
from fusediff.models.glide_unet import glide_model_input, glide_options, text_encoder_config, unet_config
from fusediff.pipelines.glide_convert import convert_glide, convert_state_dict

from models import glide_reference as ref

N_VOCAB = 40
KINDS = ("base", "upsample", "base-inpaint", "upsample-inpaint")
ATOL = 1e-5


def tiny_options(kind: str) -> dict:
    return glide_options(kind, dict(ref.TINY, n_vocab=N_VOCAB))


def models_of(state: dict, options: dict) -> tuple[GlideTextEncoder, UNet2DConditionModel]:
    text_state, unet_state = convert_state_dict(state, options)
    text_encoder = GlideTextEncoder(**text_encoder_config(options)).eval()
    unet = UNet2DConditionModel(**unet_config(options)).eval()
    text_encoder.load_state_dict(text_state, strict=True)
    unet.load_state_dict(unet_state, strict=True)
    return text_encoder, unet


def inputs(options: dict, batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = options["image_size"]
    tokens = torch.randint(0, N_VOCAB - 1, (batch, options["text_ctx"]), generator=g)
    mask = torch.zeros(batch, options["text_ctx"], dtype=torch.bool)
    mask[0, :5], mask[1, :0] = True, True  # a prompt of 5 tokens, and the empty (unconditional) one
    tokens = torch.where(mask, tokens, torch.full_like(tokens, N_VOCAB - 1))
    out = dict(x=torch.randn(batch, 3, size, size, generator=g), t=torch.tensor([999, 3][:batch]), tokens=tokens,
               mask=mask)
    if options["super_res"]:
        out["low_res"] = torch.rand(batch, 3, size // 2, size // 2, generator=g) * 2 - 1
    if options["inpaint"]:
        out["inpaint_image"] = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
        keep = torch.ones(batch, 1, size, size)
        keep[:, :, size // 2:] = 0
        out["inpaint_mask"] = keep
    return out


def ours(text_encoder, unet, x, t, tokens, mask, **extra) -> torch.Tensor:
    text = text_encoder(tokens, mask)
    return unet(glide_model_input(x, **extra), t, encoder_hidden_states=text.last_hidden_state,
                class_labels=text.text_embeds).sample


@pytest.mark.parametrize("kind", KINDS)
def test_converted_model_gives_the_original_forward(kind):
    options = tiny_options(kind)
    state = ref.random_state_dict(options, seed=0)
    text_encoder, unet = models_of(state, options)
    given = inputs(options)
    extra = {k: v for k, v in given.items() if k in ("low_res", "inpaint_image", "inpaint_mask")}
    with torch.no_grad():
        expected = ref.forward(state, options, given["x"], given["t"], given["tokens"], given["mask"], **extra)
        got = ours(text_encoder, unet, given["x"], given["t"], given["tokens"], given["mask"], **extra)
    err = (got - expected).abs().max().item()
    print(f"{kind}: max |ours - original| = {err:.2e} (output scale {expected.abs().max().item():.2f})")
    assert got.shape == (2, 6, options["image_size"], options["image_size"])
    assert expected.abs().max() > 0.1  # not trivially zero
    assert err <= ATOL


def test_text_encoder_gives_the_original_text_embedding():
    options = tiny_options("base")
    state = ref.random_state_dict(options, seed=3)
    text_encoder, _ = models_of(state, options)
    given = inputs(options)
    with torch.no_grad():
        proj, xf_out = ref.text_embedding(state, options, given["tokens"], given["mask"])
        out = text_encoder(given["tokens"], given["mask"])
    assert (out.text_embeds - proj).abs().max() <= ATOL
    assert (out.last_hidden_state - xf_out.permute(0, 2, 1)).abs().max() <= ATOL


def test_published_configs_have_the_original_layout():
    """At the published hyperparameters our two models hold exactly the original tensors (the transcribed
    layout of glide_reference, every name and shape), 385,030,726 parameters for the base model ("GLIDE
    (filtered)", ~385M) and 398,361,286 for the upsampler."""
    import math

    for kind in KINDS:
        options = glide_options(kind)
        original = ref._shapes(options)
        with torch.device("meta"):
            unet = UNet2DConditionModel(**unet_config(options))
            text_encoder = GlideTextEncoder(**text_encoder_config(options))
        ours_count = sum(p.numel() for m in (unet, text_encoder) for p in m.parameters())
        assert ours_count == sum(math.prod(s) for s in original.values()), kind
        fake = {name: torch.empty(shape, device="meta") for name, shape in original.items()}
        text_state, unet_state = convert_state_dict(fake, options, dtype=None)  # every name and shape accepted
        assert len(text_state) + len(unet_state) > len(fake)  # qkv / encoder_kv split into several tensors
        if kind in ("base", "upsample"):
            print(kind, ours_count)
            assert ours_count == {"base": 385_030_726, "upsample": 398_361_286}[kind]


def _save(state: dict, path) -> None:
    torch.save(state, path)


def test_converter_refuses_missing_extra_and_misshaped_tensors(tmp_path):
    options = tiny_options("base")
    state = ref.random_state_dict(options)
    bad = dict(state)
    del bad["input_blocks.1.0.in_layers.2.weight"]
    bad["output_blocks.0.9.bogus"] = torch.zeros(1)
    bad["middle_block.1.qkv.weight"] = torch.zeros(5, 64, 1)
    _save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as info:
        convert_glide(tmp_path / "bad.pt", tmp_path / "out", "base", options=dict(ref.TINY, n_vocab=N_VOCAB))
    message = str(info.value)
    print(message)
    for piece in ("missing 1: input_blocks.1.0.in_layers.2.weight", "unexpected 1: output_blocks.0.9.bogus",
                  "middle_block.1.qkv.weight (5, 64, 1) (expected (192, 64, 1))"):
        assert piece in message
    assert not (tmp_path / "out").exists()


def test_converter_refuses_a_checkpoint_of_another_kind(tmp_path):
    state = ref.random_state_dict(tiny_options("upsample"))
    _save(state, tmp_path / "up.pt")
    with pytest.raises(ValueError, match=r"input_blocks\.0\.0\.weight \(32, 6, 3, 3\) \(expected \(32, 3, 3, 3\)\)"):
        convert_glide(tmp_path / "up.pt", tmp_path / "out", "base", options=dict(ref.TINY, n_vocab=N_VOCAB))


def test_converter_loads_safely(tmp_path):
    """A pickle that is not plain tensors is refused (weights_only=True), as is a missing file."""
    torch.save({"x": torch.zeros(1), "f": print}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_glide(tmp_path / "evil.pt", tmp_path / "out", "base")
    with pytest.raises(FileNotFoundError):
        convert_glide(tmp_path / "absent.pt", tmp_path / "out", "base")
    with pytest.raises(ValueError, match="unknown GLIDE kind"):
        convert_glide(tmp_path / "evil.pt", tmp_path / "out", "huge")
    with pytest.raises(ValueError, match="unknown GLIDE options"):
        glide_options("base", {"num_chanels": 3})


def test_converted_directory_round_trips(tmp_path):
    """convert -> from_pretrained of each component gives the same outputs; save_pretrained again is identical."""
    options = tiny_options("base-inpaint")
    state = ref.random_state_dict(options)
    _save(state, tmp_path / "ckpt.pt")
    out = convert_glide(tmp_path / "ckpt.pt", tmp_path / "glide", "base-inpaint",
                        options=dict(ref.TINY, n_vocab=N_VOCAB))
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "text_encoder" / "config.json").is_file() and (out / "model_index.json").is_file()
    text_encoder = GlideTextEncoder.from_pretrained(out / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    text_encoder.save_pretrained(tmp_path / "again")
    again = GlideTextEncoder.from_pretrained(tmp_path / "again")
    for k, v in text_encoder.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    given = inputs(options)
    extra = {k: given[k] for k in ("inpaint_image", "inpaint_mask")}
    with torch.no_grad():
        expected = ref.forward(state, options, given["x"], given["t"], given["tokens"], given["mask"], **extra)
        got = ours(text_encoder, unet, given["x"], given["t"], given["tokens"], given["mask"], **extra)
    assert (got - expected).abs().max() <= ATOL


def test_text_encoder_bad_inputs():
    enc = GlideTextEncoder(vocab_size=10, text_ctx=4, width=8, layers=1, heads=2, time_embed_dim=16)
    ids, mask = torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\(B, 4\) integer"):
        enc(torch.zeros(1, 5, dtype=torch.long), mask)
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        enc(ids + 10, mask)
    with pytest.raises(ValueError, match="attention_mask"):
        enc(ids)
    with pytest.raises(ValueError, match="multiple of heads"):
        GlideTextEncoder(width=10, heads=4)
    assert enc(ids, mask).text_embeds.shape == (1, 16)
