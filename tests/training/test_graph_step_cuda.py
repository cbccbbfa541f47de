"""CUDAGraphTrainStep and ``Trainer(cuda_graph=True)`` on a GPU.

Replayed steps of a UNet2DModel (fused GroupNorm+SiLU and attention, forward and backward) are
compared with the same steps run eagerly through :meth:`CUDAGraphTrainStep.eager_step` (the
operations the graph records) on a twin model: equal bit for bit, with and without gradient
accumulation and with noise from a generator of the test's own; the warm-up leaves no trace. The
Trainer's graph path follows its eager path (which uses the foreach AdamW, not the fused one, so
within rounding) and resumes from a checkpoint to the weights of an uninterrupted run."""

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
    # bit-for-bit comparisons need deterministic convolutions (cuDNN's weight gradient may use atomics)
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def make(seed=0, adam=True):
    torch.manual_seed(seed)
    model = UNet2DModel(**CONFIG).cuda().train()
    if adam:
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), fused=True, capturable=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt


def batches(n, size=4):
    g = torch.Generator("cuda").manual_seed(1)
    return [(torch.randn(size, 3, 16, 16, device="cuda", generator=g),
             torch.randint(0, 1000, (size,), device="cuda", generator=g),
             torch.randn(size, 3, 16, 16, device="cuda", generator=g)) for _ in range(n)]


def loss_of(model):
    return lambda x, t, eps: F.mse_loss(model(x, t).sample, eps)


def run_eager(step: CUDAGraphTrainStep, plan) -> torch.Tensor:
    losses = []
    for b in plan:
        step.optimizer.zero_grad(set_to_none=True)
        losses.append(step.eager_step(*b))
    return torch.stack(losses)


def weight_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("adam", [True, False], ids=["adamw-fused-capturable", "sgd-momentum"])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_replays_equal_eager_steps_bit_for_bit(adam, grad_accum):
    data = batches(4)
    ref, ref_opt = make(adam=adam)
    model, opt = make(adam=adam)
    step = CUDAGraphTrainStep(loss_of(model), opt, clip_grad_norm=1.0, warmup=3, grad_accum=grad_accum)
    got = torch.stack([step(*b).clone() for b in data])
    want = run_eager(CUDAGraphTrainStep(loss_of(ref), ref_opt, clip_grad_norm=1.0, grad_accum=grad_accum), data)
    worst = weight_diff(model, ref)
    moved = weight_diff(model, make(adam=adam)[0])
    print(f"losses graph {got.tolist()} eager {want.tolist()}; max weight diff {worst:.2e}, moved {moved:.2e}")
    assert len(set(got.tolist())) == len(data), "replays did not see new batches"
    assert moved > 1e-4
    assert torch.equal(got, want)
    assert worst == 0.0


def test_accumulated_micro_batches_follow_the_full_batch():
    """grad_accum=2 over a batch of 8 against one pass over the 8 (SGD, which does not magnify rounding)."""
    data = batches(3, size=8)
    results = []
    for accum in (1, 2):
        model, opt = make(adam=False)
        step = CUDAGraphTrainStep(loss_of(model), opt, clip_grad_norm=1.0, grad_accum=accum)
        results.append((torch.stack([step(*b).clone() for b in data]), model))
    (l1, m1), (l2, m2) = results
    print("losses", l1.tolist(), l2.tolist(), "weights", weight_diff(m1, m2))
    torch.testing.assert_close(l2, l1, rtol=1e-4, atol=1e-6)
    assert weight_diff(m1, m2) <= 1e-5


def test_noise_from_an_own_generator_advances_as_in_eager():
    def with_noise(model, gen):
        def loss_fn(x, t):
            eps = torch.randn(x.shape, device=x.device, generator=gen)
            drop = torch.rand(x.shape[0], device=x.device) < 0.5  # the default generator as well
            return F.mse_loss(model(x * drop[:, None, None, None], t).sample, eps)
        return loss_fn

    data = [b[:2] for b in batches(3)]
    runs = []
    for graphed in (True, False):
        model, opt = make()
        gen = torch.Generator("cuda").manual_seed(7)
        torch.cuda.manual_seed(3)
        step = CUDAGraphTrainStep(with_noise(model, gen), opt, generators=(gen,), warmup=2)
        losses = torch.stack([step(*b).clone() for b in data]) if graphed else run_eager(step, data)
        runs.append((losses, model, gen.get_state(), torch.cuda.get_rng_state()))
    (lg, mg, sg, dg), (le, me, se, de) = runs
    print("graph", lg.tolist(), "eager", le.tolist())
    assert torch.equal(lg, le) and weight_diff(mg, me) == 0.0
    assert torch.equal(sg, se) and torch.equal(dg, de), "the generators did not end where eager leaves them"


def test_new_shapes_are_refused():
    model, opt = make()
    step = CUDAGraphTrainStep(loss_of(model), opt, warmup=1)
    x, t, eps = batches(1)[0]
    step(x, t, eps)
    with pytest.raises(ValueError, match="differ from the captured"):
        step(x[:2], t[:2], eps[:2])


# -- the Trainer ----------------------------------------------------------------------------------------------
@pytest.fixture
def trainer(make_sampler, digits):
    """``trainer(out_dir, cuda_graph, **config)``: a class-conditional tiny UNet (label drop on the trainer's
    generator), 2 micro-steps of 4, bf16 autocast, on 16 digits."""
    from fusediff.training.trainer import Trainer, TrainConfig

    def build(out, cuda_graph, **kw):
        _, sampler = make_sampler(conditional=True)
        cfg = TrainConfig(**{**dict(steps=4, batch_size=8, grad_accum=2, lr=1e-3, warmup=1, log_every=1,
                                    mixed_precision="bf16", cuda_graph=cuda_graph), **kw})
        return Trainer(sampler.cuda(), digits(16, labels=True), cfg, out, progress=False)
    return build


def test_trainer_graph_steps_follow_the_eager_trainer(tmp_path, trainer):
    eager = trainer(tmp_path / "eager", False)
    graph = trainer(tmp_path / "graph", True)
    eager.train(until=3)
    graph.train(until=3)
    le = torch.tensor([v for _, v in eager.history])
    lg = torch.tensor([v for _, v in graph.history])
    diff = max((a - b).abs().max().item() for a, b in zip(eager.params, graph.params))
    print("eager losses", le.tolist(), "graph losses", lg.tolist(), "max weight diff", diff)
    torch.testing.assert_close(lg, le, rtol=2e-2, atol=1e-3)  # foreach vs fused AdamW, bf16 autocast
    assert diff <= 1e-2


def test_trainer_graph_resume_reaches_the_uninterrupted_weights(tmp_path, trainer):
    whole = trainer(tmp_path / "whole", True)
    whole.train()
    first = trainer(tmp_path / "part", True, checkpoint_every=2)
    first.train(until=2)  # writes the checkpoint of step 2
    second = trainer(tmp_path / "part", True, checkpoint_every=2)
    second.resume("latest")
    second.train()
    diff = max((a - b).abs().max().item() for a, b in zip(whole.params, second.params))
    print("whole", whole.history, "resumed", second.history, "max weight diff", diff)
    assert [v for _, v in second.history] == [v for _, v in whole.history][2:]
    assert diff == 0.0
