"""The Trainer on a tiny UNet on the CPU: learning, gradient accumulation, bf16 autocast, checkpoint files,
sample grids, and the EMA weights it keeps and saves (checked against diffusers' EMAModel)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fusediff import DDPMPipeline, DiffusionPipeline
from fusediff.training.checkpoint import STATE_FILE
from fusediff.training.trainer import Trainer, TrainConfig, lr_at

FAST = dict(warmup=0, log_every=1, sample_steps=2, num_samples=4)


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{**FAST, **kw})


def test_loss_is_finite_and_falls_on_a_repeated_batch(tmp_path, make_sampler, digits):
    _, sampler = make_sampler()
    trainer = Trainer(sampler, digits(8, fixed_noise=True), _config(steps=12, batch_size=8, lr=1e-2,
                                                                    lr_schedule="constant"), tmp_path, progress=False)
    trainer.train()
    losses = [loss for _, loss in trainer.history]
    print("losses:", [f"{v:.4f}" for v in losses])
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13)) and log[-1]["loss"] == pytest.approx(losses[-1])


def _adamw_reference(sampler, data, cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Plain autograd + AdamW on the whole batch at once: what the trainer must compute. Returns the
    weights after ``cfg.steps`` steps and the (clipped) gradients of the first step."""
    params = [p for p in sampler.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sampler.train()
    first = None
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        sampler(data).backward()
        if cfg.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
        first = first or [p.grad.clone() for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in sampler.state_dict().items()}, first


def _record_grads(trainer: Trainer) -> list[list[torch.Tensor]]:
    """The gradients the optimizer sees at each step (after clipping)."""
    seen, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append([p.grad.clone() for p in trainer.params])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return seen


def test_grad_accumulation_matches_the_full_batch(tmp_path, make_sampler, digits):
    """2 micro-steps of 4 = one batch of 8 = plain autograd on the 8 items (fixed noise per item, so the
    loss is a function of the weights alone), within fp32 rounding: the first step's gradients, and the
    weights after 3 AdamW steps (except where the exact gradient is 0, e.g. attention's key bias, whose
    rounding noise AdamW scales up to full steps)."""
    data = digits(8, fixed_noise=True)
    cfg = _config(steps=3, batch_size=8, lr=1e-3, warmup=2, clip_grad_norm=None)  # clipping would hide a scale error
    weights, grads = {}, {}
    for accum in (1, 2):
        _, sampler = make_sampler()
        trainer = Trainer(sampler, data, _config(**{**cfg.__dict__, "grad_accum": accum}), tmp_path / f"a{accum}",
                          progress=False)
        seen = _record_grads(trainer)
        trainer.train()
        weights[accum], grads[accum] = sampler.state_dict(), seen[0]
    _, sampler = make_sampler()
    ref_weights, ref_grads = _adamw_reference(sampler, data, cfg)
    scale = max(g.abs().max() for g in ref_grads)
    names = [n for n, p in sampler.named_parameters() if p.requires_grad]
    for accum in (1, 2):
        for name, ours, ref in zip(names, grads[accum], ref_grads):
            err = (ours - ref).abs().max().item()
            assert err <= 1e-5 * scale, f"{name}: grad_accum {accum} gradient differs from autograd's by {err}"
    live = [n for n, g in zip(names, ref_grads) if g.abs().max() > 1e-4 * scale]
    print(f"weights compared: {len(live)} of {len(names)} (the others have no gradient but rounding)")
    assert len(live) > 0.8 * len(names)
    _, initial = make_sampler()
    for name in live:
        ref = ref_weights[name]
        moved = (ref - initial.state_dict()[name]).abs().max()
        assert moved > 0, name
        for accum in (1, 2):
            err = (weights[accum][name] - ref).abs().max().item()
            assert err <= 1e-6 + 1e-2 * moved, f"{name}: grad_accum {accum} weights differ from the reference by {err}"


def test_bf16_autocast_runs_on_cpu(tmp_path, make_sampler, digits):
    unet, sampler = make_sampler()
    before = copy.deepcopy(unet.state_dict())
    seen = []
    unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer = Trainer(sampler, digits(8), _config(steps=2, batch_size=4, mixed_precision="bf16"), tmp_path,
                      progress=False)
    trainer.train()
    assert seen and all(d == torch.bfloat16 for d in seen), seen
    assert all(torch.isfinite(torch.tensor(v)) for _, v in trainer.history)
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    assert any(not torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_fp16_with_grad_scaler_and_channels_last(tmp_path, make_sampler, digits):
    """fp16 autocast with a GradScaler, NHWC weights and inputs; the scaler's state is checkpointed and resumed."""
    unet, sampler = make_sampler()
    seen = []
    unet.conv_in.register_forward_hook(lambda m, i, o: seen.append((o.dtype, i[0].is_contiguous(
        memory_format=torch.channels_last))))
    cfg = _config(steps=2, batch_size=4, mixed_precision="fp16", channels_last=True, checkpoint_every=2)
    trainer = Trainer(sampler, digits(8), cfg, tmp_path, progress=False)
    trainer.train()
    assert seen and all(s == (torch.float16, True) for s in seen), seen
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.isfinite(torch.tensor(v)) for _, v in trainer.history)
    saved = trainer.scaler.state_dict()
    assert saved["_growth_tracker"] == 2, saved
    _, sampler = make_sampler(seed=1)
    resumed = Trainer(sampler, digits(8), cfg, tmp_path, progress=False)
    resumed.resume("latest")
    assert resumed.scaler.state_dict() == saved


def test_checkpoint_files_load_in_diffusers(tmp_path, make_sampler, digits):
    import diffusers

    unet, sampler = make_sampler()
    trainer = Trainer(sampler, digits(8), _config(steps=2, batch_size=4, checkpoint_every=2), tmp_path,
                      progress=False)
    trainer.train()
    ckpt = tmp_path / "checkpoints" / "step_000002"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000002"
    raw = diffusers.UNet2DModel.from_pretrained(ckpt / "unet")
    ema = diffusers.UNet2DModel.from_pretrained(ckpt / "unet_ema")
    for (name, p), shadow in zip(unet.named_parameters(), trainer.ema.shadow_params):
        assert torch.equal(raw.state_dict()[name], p.detach()), name
        assert torch.equal(ema.state_dict()[name], shadow), name
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    assert (state["step"], state["world_size"]) == (2, 1) and state["index"] == 0 and state["epoch"] == 1
    assert set(state) >= {"optimizer", "scaler", "ema", "rng", "config"}


def test_sample_grid_is_the_samples_of_the_ema_weights(tmp_path, make_sampler, digits):
    _, sampler = make_sampler()
    trainer = Trainer(sampler, digits(8), _config(steps=2, batch_size=4, sample_every=2, ema_decay=0.9), tmp_path,
                      progress=False)
    trainer.train()
    grid = torch.from_numpy(np.array(Image.open(tmp_path / "samples" / "step_000002.png")))
    assert grid.shape == (2 * 10 + 2, 2 * 10 + 2)  # 4 images of 8x8 in a 2x2 grid, 2 px apart
    # the same samples again: EMA weights copied into a deep copy, the sampler's own loop, the grid's seed
    expected_sampler = copy.deepcopy(sampler)
    params = [p for p in expected_sampler.parameters() if p.requires_grad]
    trainer.ema.copy_to(params)
    expected_sampler.eval()
    with torch.no_grad():
        images = expected_sampler.sample(4, shape=(1, 8, 8), generator=torch.Generator().manual_seed(0),
                                         num_inference_steps=2)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for i in range(4):
        y, x = 2 + (i // 2) * 10, 2 + (i % 2) * 10
        assert torch.equal(grid[y:y + 8, x:x + 8], pixels[i, 0]), f"tile {i} differs"
    assert sampler.training, "the sampler must be back in train mode"


def test_ema_matches_diffusers_and_is_what_the_pipeline_holds(tmp_path, make_sampler, digits):
    from diffusers.training_utils import EMAModel as DiffusersEMA

    unet, sampler = make_sampler()
    cfg = _config(steps=4, batch_size=4, ema_decay=0.9, ema_warmup=True)
    trainer = Trainer(sampler, digits(8), cfg, tmp_path, progress=False)
    params = [p for p in unet.parameters()]
    reference = DiffusersEMA(params, decay=0.9, min_decay=0.0, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)
    for _ in range(3):
        trainer.train_step()
        reference.step(params)
    trainer.train()  # the last step, then the final pipeline
    reference.step(params)
    for p, ours, theirs in zip(params, trainer.ema.shadow_params, reference.shadow_params):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-7), (ours - theirs).abs().max()
    assert any(not torch.equal(p.detach(), s) for p, s in zip(params, trainer.ema.shadow_params))
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe, DDPMPipeline)
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    for (name, p), shadow in zip(unet.named_parameters(), trainer.ema.shadow_params):
        assert torch.equal(pipe.unet.state_dict()[name], shadow), name
    assert any(not torch.equal(pipe.unet.state_dict()[name], p.detach()) for name, p in unet.named_parameters())


@pytest.mark.parametrize("bad, message", [
    (dict(batch_size=6, grad_accum=4), "divisible"),
    (dict(mixed_precision="fp8"), "mixed_precision"),
    (dict(steps=0), "steps"),
    (dict(lr_schedule="linear"), "lr_schedule"),
    (dict(cuda_graph=True, mixed_precision="fp16"), "fp16"),
    (dict(cuda_graph=True, compile=True), "exclusive"),
    (dict(cuda_graph=True), "needs the model on a CUDA device"),
])
def test_bad_config_is_a_value_error(tmp_path, make_sampler, digits, bad, message):
    _, sampler = make_sampler()
    with pytest.raises(ValueError, match=message):
        Trainer(sampler, digits(8), _config(**{"batch_size": 4, **bad}), tmp_path, progress=False)


def test_cuda_graph_is_refused_under_ddp():
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        _config(cuda_graph=True, batch_size=4).validate(world_size=2)


def test_data_order_is_seeded_epochs_in_global_batches(tmp_path, make_sampler):
    """Steps take consecutive slices of randperm(N) seeded with seed + epoch, across epoch ends."""
    _, sampler = make_sampler()
    data = {"sample": torch.arange(10.0).view(10, 1, 1, 1).expand(10, 1, 8, 8).contiguous()}
    trainer = Trainer(sampler, data, _config(steps=5, batch_size=4, seed=3), tmp_path, progress=False)
    taken = torch.cat([trainer._take(4) for _ in range(5)])
    stream = torch.cat([torch.randperm(10, generator=torch.Generator().manual_seed(3 + e)) for e in range(2)])
    assert torch.equal(taken, stream), (taken, stream)
    assert (trainer.epoch, trainer.index) == (2, 0)


def test_digits_data_and_the_missing_scikit_learn_message(monkeypatch):
    from sklearn.datasets import load_digits

    from fusediff.training.digits import DigitsDataset, TensorDataset, load_digits_images

    raw = load_digits()
    images, labels = load_digits_images(8)  # no resampling at 8x8: the raw pixels mapped 0..16 -> -1..1
    assert images.shape == (len(raw.images), 1, 8, 8) and images.dtype == torch.float32
    assert torch.equal(images[:, 0], torch.from_numpy(raw.images).float() / 16 * 2 - 1)
    assert labels.dtype == torch.int64 and torch.equal(labels, torch.from_numpy(raw.target).long())
    big, _ = load_digits_images(16)
    assert big.shape[-2:] == (16, 16) and big.min() == -1 and big.max() == 1
    dataset = DigitsDataset(size=8)
    batch = dataset[torch.tensor([3, 0])]
    assert torch.equal(batch["sample"], images[[3, 0]]) and torch.equal(batch["class_labels"], labels[[3, 0]])
    with pytest.raises(ValueError, match="differ in length"):
        TensorDataset(sample=images, class_labels=labels[:5])
    with pytest.raises(ValueError, match="size"):
        load_digits_images(0)
    monkeypatch.setitem(__import__("sys").modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'pip install "fusediff\[train\]"'):
        load_digits_images()
