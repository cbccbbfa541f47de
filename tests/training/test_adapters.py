"""Adapters: pass-through to the UNet, class and text conditioning with their null conditions, and
classifier-free guidance against the hand formula eps_u + s (eps_c - eps_u) with the wrapped model called
twice, plus the statistics of its condition drops."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from fusediff import UNet2DConditionModel, UNet2DModel
from fusediff.training import ClassConditioning, ClassifierFreeGuidance, TextConditioning, UNetAdapter
from support.configs import TINY_COND_UNET, TINY_UNET
from support.parity import assert_close, one_thread  # noqa: F401  (one_thread: autouse)

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def class_unet():
    torch.manual_seed(0)
    return UNet2DModel(**TINY_UNET, num_class_embeds=NUM_CLASSES + 1).eval()


@pytest.fixture(scope="module")
def text_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_COND_UNET).eval()


def _inputs(b=3, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, 8, 8, generator=g), torch.tensor([5, 400, 999][:b])


def test_unet_adapter_is_the_unet(class_unet):
    x, t = _inputs()
    labels = torch.tensor([0, 3, 9])
    with torch.no_grad():
        ours = UNetAdapter(class_unet)(x, t, class_labels=labels)
        theirs = class_unet(x, t, class_labels=labels).sample
    assert type(ours) is torch.Tensor
    assert torch.equal(ours, theirs)
    with pytest.raises(TypeError, match="nn.Module"):
        UNetAdapter(lambda x, t: x)


def test_class_conditioning(class_unet):
    x, t = _inputs()
    model = ClassConditioning(class_unet, NUM_CLASSES)
    assert model.null_cond() == {"class_labels": NUM_CLASSES}
    with torch.no_grad():
        unconditional = model(x, t)
        expected = class_unet(x, t, class_labels=torch.full((3,), NUM_CLASSES)).sample
    assert torch.equal(unconditional, expected)
    with pytest.raises(ValueError, match="num_class_embeds=10"):
        ClassConditioning(class_unet, 9)
    with pytest.raises(ValueError, match="num_classes"):
        ClassConditioning(class_unet, 0)


def _tiny_clip() -> CLIPTextModel:
    torch.manual_seed(1)
    config = CLIPTextConfig(vocab_size=50, hidden_size=12, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=8,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config)


def test_text_conditioning_hidden_states_and_ids(text_unet):
    x, t = _inputs(c=4)
    ehs = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(TextConditioning(text_unet)(x, t, encoder_hidden_states=ehs),
                           text_unet(x, t, encoder_hidden_states=ehs).sample)
    encoder = _tiny_clip()
    model = TextConditioning(text_unet, text_encoder=encoder)
    assert not any(p.requires_grad for p in encoder.parameters())
    ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = text_unet(x, t, encoder_hidden_states=encoder(ids).last_hidden_state).sample
    assert_close(model(x, t, input_ids=ids), expected, "encoded ids", rtol=1e-6)
    model.train()
    assert not encoder.training, "a frozen encoder stays in eval mode"
    with pytest.raises(ValueError, match="not both"):
        model(x, t, input_ids=ids, encoder_hidden_states=ehs)
    with pytest.raises(ValueError, match="no text_encoder"):
        TextConditioning(text_unet)(x, t, input_ids=ids)
    with pytest.raises(ValueError, match="encoder_hidden_states or input_ids"):
        TextConditioning(text_unet)(x, t)


def test_trained_text_encoder_gets_gradients(text_unet):
    x, t = _inputs(c=4)
    encoder = _tiny_clip()
    ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(3))
    TextConditioning(text_unet, text_encoder=encoder, train_text_encoder=True)(x, t, input_ids=ids).sum().backward()
    assert encoder.get_input_embeddings().weight.grad is not None
    frozen = _tiny_clip()
    TextConditioning(text_unet, text_encoder=frozen)(x, t, input_ids=ids).sum().backward()
    assert frozen.get_input_embeddings().weight.grad is None


def test_text_null_embedding(text_unet):
    x, t = _inputs(c=4)
    null = torch.randn(7, 12, generator=torch.Generator().manual_seed(4))
    model = TextConditioning(text_unet, null_embedding=null)
    with torch.no_grad():
        expected = text_unet(x, t, encoder_hidden_states=null.expand(3, 7, 12)).sample
        assert torch.equal(model(x, t), expected)
    assert model.null_cond()["encoder_hidden_states"] is model.null_embedding


def _hand_cfg(model, x, t, cond, null, s):
    """eps_u + s (eps_c - eps_u) with the wrapped model called twice."""
    with torch.no_grad():
        c = model(x, t, **cond)
        u = model(x, t, **null)
    return u + s * (c - u)


class _Counting(nn.Module):
    """Counts the wrapped model's calls and the batch sizes it saw."""

    def __init__(self, model):
        super().__init__()
        self.model, self.batches = model, []

    def null_cond(self):
        return self.model.null_cond()

    def forward(self, sample, timestep, **cond):
        self.batches.append(sample.shape[0])
        return self.model(sample, timestep, **cond)


@pytest.mark.parametrize("scale", [0.0, 3.5, 7.5])
def test_guidance_class(class_unet, scale):
    x, t = _inputs()
    inner = ClassConditioning(class_unet, NUM_CLASSES)
    counting = _Counting(inner)
    cfg = ClassifierFreeGuidance(counting, drop_prob=0.1, guidance_scale=scale).eval()
    labels = torch.tensor([1, 2, 7])
    with torch.no_grad():
        ours = cfg(x, t, class_labels=labels)
    assert counting.batches == [6], "one batched call on [cond, null]"
    expected = _hand_cfg(inner, x, t, {"class_labels": labels}, {"class_labels": torch.full((3,), NUM_CLASSES)}, scale)
    assert_close(ours, expected, f"guided s={scale}", rtol=1e-5)


def test_guidance_text_with_zero_null(text_unet):
    x, t = _inputs(c=4)
    inner = TextConditioning(text_unet)
    cfg = ClassifierFreeGuidance(inner, guidance_scale=4.0).eval()
    ehs = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = cfg(x, t[0], encoder_hidden_states=ehs)  # a 0-d timestep, as a sampling loop passes it
    expected = _hand_cfg(inner, x, t[0], {"encoder_hidden_states": ehs},
                         {"encoder_hidden_states": torch.zeros_like(ehs)}, 4.0)
    assert_close(ours, expected, "guided text", rtol=1e-5)


def test_guidance_scale_one_is_one_conditional_call(class_unet):
    x, t = _inputs()
    counting = _Counting(ClassConditioning(class_unet, NUM_CLASSES))
    cfg = ClassifierFreeGuidance(counting, guidance_scale=1.0).eval()
    labels = torch.tensor([1, 2, 7])
    with torch.no_grad():
        assert torch.equal(cfg(x, t, class_labels=labels), counting.model(x, t, class_labels=labels))
    assert counting.batches == [3], "one conditional call"


class _Recorder(nn.Module):
    """Returns its input and keeps the condition it was called with."""

    def forward(self, sample, timestep, **cond):
        self.cond = cond
        return sample


def test_drop_rate_statistics_and_seeding():
    p, n = 0.3, 20000
    cfg = ClassifierFreeGuidance(_Recorder(), drop_prob=p, null_cond={"class_labels": NUM_CLASSES}).train()
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=torch.Generator().manual_seed(6))
    x = torch.zeros(n, 1, 1, 1)
    cfg(x, torch.zeros(n, dtype=torch.long), generator=torch.Generator().manual_seed(7), class_labels=labels)
    got = cfg.model.cond["class_labels"]
    dropped = got == NUM_CLASSES
    rate = dropped.double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    print(f"drop rate {rate:.4f}, expected {p} +- {sigma:.4f}")
    assert abs(rate - p) < 4 * sigma
    assert torch.equal(got[~dropped], labels[~dropped]), "kept items keep their labels"
    # the mask is one uniform draw per item from the generator: u < p drops
    u = torch.rand(n, generator=torch.Generator().manual_seed(7))
    assert torch.equal(dropped, u < p)
    # no drops with drop_prob=0, nor in eval mode
    cfg.drop_prob = 0.0
    cfg(x, torch.zeros(n, dtype=torch.long), class_labels=labels)
    assert torch.equal(cfg.model.cond["class_labels"], labels)


def test_drop_text_items_to_zeros():
    cfg = ClassifierFreeGuidance(_Recorder(), drop_prob=0.5, null_cond={"encoder_hidden_states": None}).train()
    ehs = torch.randn(64, 3, 4, generator=torch.Generator().manual_seed(8)) + 5
    cfg(torch.zeros(64, 1), torch.zeros(64, dtype=torch.long), generator=torch.Generator().manual_seed(9),
        encoder_hidden_states=ehs)
    got = cfg.model.cond["encoder_hidden_states"]
    zero = (got == 0).all(dim=(1, 2))
    kept = (got == ehs).all(dim=(1, 2))
    assert torch.equal(zero, ~kept) and 10 < int(zero.sum()) < 54


def test_guidance_bad_input(class_unet):
    model = ClassConditioning(class_unet, NUM_CLASSES)
    with pytest.raises(ValueError, match="drop_prob"):
        ClassifierFreeGuidance(model, drop_prob=1.5)
    with pytest.raises(ValueError, match="null_cond"):
        ClassifierFreeGuidance(_Recorder())
    with pytest.raises(TypeError, match="guidance_scale"):
        ClassifierFreeGuidance(model, guidance_scale="7")
    x, t = _inputs()
    with pytest.raises(ValueError, match="class_labels"):
        ClassifierFreeGuidance(model, guidance_scale=3.0).eval()(x, t)
