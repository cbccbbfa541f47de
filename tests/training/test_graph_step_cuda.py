"""CUDAGraphTrainStep on a GPU: replayed steps of a UNet2DModel (fused GroupNorm+SiLU and attention,
forward and backward) give the weights of the same steps run eagerly; new batches are read; a new
input shape is refused.

The weights are compared after SGD with momentum: Adam divides each gradient by its own running
scale, so a parameter whose true gradient is 0 (attention's key bias) takes full-size steps on
rounding noise, which differs between any two runs that round differently. AdamW's capturable
path is checked to run and to follow the eager losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusediff import UNet2DModel
from fusediff.training.graph_step import CUDAGraphTrainStep

pytestmark = pytest.mark.gpu

CONFIG = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
              down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
              norm_num_groups=8, attention_head_dim=16)


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def make(seed=0, capturable=False, adam=False):
    torch.manual_seed(seed)
    model = UNet2DModel(**CONFIG).cuda().train()
    if adam:
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda") if capturable else 1e-3,
                                fused=True, capturable=capturable)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt


def batches(n):
    g = torch.Generator("cuda").manual_seed(1)
    return [(torch.randn(4, 3, 16, 16, device="cuda", generator=g),
             torch.randint(0, 1000, (4,), device="cuda", generator=g),
             torch.randn(4, 3, 16, 16, device="cuda", generator=g)) for _ in range(n)]


def loss_of(model):
    return lambda x, t, eps: F.mse_loss(model(x, t).sample, eps)


def eager_losses(model, opt, plan, clip):
    losses = []
    for x, t, eps in plan:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model)(x, t, eps)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_replays_match_eager_steps():
    data = batches(4)
    ref, ref_opt = make()
    # the graph's first call runs `warmup` eager steps on its first batch, then replays on it
    eager_losses(ref, ref_opt, [data[0], data[0]] + data[1:], clip=True)
    model, opt = make()
    step = CUDAGraphTrainStep(loss_of(model), opt, clip_grad_norm=1.0, warmup=1)
    losses = [step(*b).clone() for b in data]
    assert torch.isfinite(torch.stack(losses)).all()
    assert len({float(v) for v in losses}) == len(losses), f"replays did not see new batches: {losses}"
    worst = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), make()[0].parameters()))
    print(f"max |graph - eager| weight difference {worst:.2e}; max change from the initial weights {moved:.2e}")
    assert moved > 1e-4
    assert worst <= 1e-5, worst


def test_adamw_capturable_follows_the_eager_losses():
    data = batches(4)
    ref, ref_opt = make(adam=True)
    want = eager_losses(ref, ref_opt, [data[0], data[0]] + data[1:], clip=False)[1:]  # the warm-up step first
    model, opt = make(capturable=True, adam=True)
    step = CUDAGraphTrainStep(loss_of(model), opt, warmup=1)
    got = torch.stack([step(*b).clone() for b in data])
    print("graph losses", got.tolist(), "eager", want.tolist())
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_new_shapes_are_refused():
    model, opt = make(capturable=True, adam=True)
    step = CUDAGraphTrainStep(loss_of(model), opt, warmup=1)
    x, t, eps = batches(1)[0]
    step(x, t, eps)
    with pytest.raises(ValueError, match="differ from the captured"):
        step(x[:2], t[:2], eps[:2])
