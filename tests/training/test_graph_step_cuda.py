"""CUDAGraphTrainStep on a GPU: replayed steps of a UNet2DModel (fused GroupNorm+SiLU and attention,
forward and backward) give the weights of the same steps run eagerly; new batches are read; a new
input shape is refused."""

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


def make(seed=0, capturable=False):
    torch.manual_seed(seed)
    model = UNet2DModel(**CONFIG).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda") if capturable else 1e-3,
                            fused=True, capturable=capturable)
    return model, opt


def batches(n):
    g = torch.Generator("cuda").manual_seed(1)
    return [(torch.randn(4, 3, 16, 16, device="cuda", generator=g),
             torch.randint(0, 1000, (4,), device="cuda", generator=g),
             torch.randn(4, 3, 16, 16, device="cuda", generator=g)) for _ in range(n)]


def loss_of(model):
    return lambda x, t, eps: F.mse_loss(model(x, t).sample, eps)


def test_replays_match_eager_steps():
    data = batches(4)
    ref, ref_opt = make()
    # the graph's first call runs `warmup` eager steps on its first batch, then replays on it
    plan = [data[0], data[0]] + data[1:]
    for x, t, eps in plan:
        ref_opt.zero_grad(set_to_none=True)
        loss = loss_of(ref)(x, t, eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
    model, opt = make(capturable=True)
    step = CUDAGraphTrainStep(loss_of(model), opt, clip_grad_norm=1.0, warmup=1)
    losses = [step(*b).clone() for b in data]
    assert torch.isfinite(torch.stack(losses)).all()
    assert len({float(v) for v in losses}) == len(losses), f"replays did not see new batches: {losses}"
    worst = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), make()[0].parameters()))
    print(f"max |graph - eager| weight difference {worst:.2e}; max change from the initial weights {moved:.2e}")
    assert moved > 1e-4
    assert worst <= 1e-5, worst


def test_new_shapes_are_refused():
    model, opt = make(capturable=True)
    step = CUDAGraphTrainStep(loss_of(model), opt, warmup=1)
    x, t, eps = batches(1)[0]
    step(x, t, eps)
    with pytest.raises(ValueError, match="differ from the captured"):
        step(x[:2], t[:2], eps[:2])
