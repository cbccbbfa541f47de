"""Exact resume: N steps in one run = N/2 steps, a checkpoint, a new process state, and N/2 more, bit for bit;
and checkpoints that are atomic: a crash while writing one leaves the previous ``latest`` in force."""

from __future__ import annotations

import pytest
import torch

from fusediff.training import checkpoint as C
from fusediff.training import trainer as T
from fusediff.training.trainer import Trainer, TrainConfig

STEPS = 6


def _config(**kw) -> TrainConfig:
    base = dict(steps=STEPS, batch_size=8, grad_accum=2, lr=2e-3, warmup=2, ema_decay=0.9, ema_warmup=True,
                log_every=1, checkpoint_every=STEPS // 2, keep_checkpoints=2, seed=5)
    return TrainConfig(**{**base, **kw})


def _state(trainer: Trainer) -> dict:
    return {"weights": {k: v.clone() for k, v in trainer.unet.state_dict().items()},
            "ema": [s.clone() for s in trainer.ema.shadow_params], "ema_step": trainer.ema.optimization_step,
            "optimizer": trainer.optimizer.state_dict(), "position": (trainer.step, trainer.epoch, trainer.index),
            "rng": (torch.get_rng_state(), trainer.generator.get_state())}


def _assert_bitwise_equal(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, f"{where}: kind differs"
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.double() - b.double()).abs().max().item()})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_resume_is_bitwise_exact(tmp_path, make_sampler, digits):
    """fp32, grad_accum 2, EMA warm-up, a class-conditional model whose label drop uses the global RNG,
    and 20 items (epochs end inside a step)."""
    data = digits(20, labels=True)
    _, sampler = make_sampler(seed=0, conditional=True, drop_prob=0.5)
    whole = Trainer(sampler, data, _config(checkpoint_every=0), tmp_path / "whole", progress=False)
    whole.train()
    expected = _state(whole)

    _, sampler = make_sampler(seed=0, conditional=True, drop_prob=0.5)
    first = Trainer(sampler, data, _config(), tmp_path / "split", progress=False)
    first.train(until=STEPS // 2)
    assert (tmp_path / "split" / "checkpoints" / "step_000003").is_dir()
    torch.manual_seed(12345)  # a new process: other global RNG state ...
    _, sampler = make_sampler(seed=99, conditional=True, drop_prob=0.5)  # ... and other initial weights
    second = Trainer(sampler, data, _config(), tmp_path / "split", progress=False)
    where = second.resume("latest")
    assert where.name == "step_000003" and second.step == STEPS // 2
    second.train()
    _assert_bitwise_equal(expected, _state(second))
    assert expected["position"] == (STEPS, 2, 8)  # 48 items of 20: two epochs and 8


def test_resume_from_a_named_checkpoint_and_its_errors(tmp_path, make_sampler, digits):
    _, sampler = make_sampler()
    trainer = Trainer(sampler, digits(8), _config(steps=4, checkpoint_every=1, keep_checkpoints=2), tmp_path,
                      progress=False)
    trainer.train()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000003", "step_000004"], names  # pruned to the newest 2
    _, sampler = make_sampler(seed=1)
    again = Trainer(sampler, digits(8), _config(steps=4), tmp_path, progress=False)
    again.resume(tmp_path / "checkpoints" / "step_000003")
    assert again.step == 3
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        again.resume(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        C.resolve_checkpoint(tmp_path / "elsewhere", "latest")
    with pytest.raises(ValueError, match="past steps"):
        Trainer(make_sampler()[1], digits(8), _config(steps=2), tmp_path, progress=False).resume("latest")


def test_a_crash_while_checkpointing_leaves_the_previous_latest(tmp_path, make_sampler, digits, monkeypatch):
    _, sampler = make_sampler()
    trainer = Trainer(sampler, digits(8), _config(steps=4, checkpoint_every=2), tmp_path, progress=False)
    trainer.train(until=2)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000002"

    def crash(path, state):  # half a file written, then the process dies
        with open(path, "wb") as f:
            f.write(b"\x80\x02half")
        raise KeyboardInterrupt("killed while writing the checkpoint")

    monkeypatch.setattr(T, "save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(until=4)
    monkeypatch.undo()
    assert not (root / "step_000004").exists()
    assert (root / "latest").read_text().strip() == "step_000002"
    assert C.resolve_checkpoint(tmp_path, "latest") == root / "step_000002"

    # a kill -9 leaves the temporary directory behind: it is never taken, and the next save removes it
    leftover = root / ".step_000004.tmp-crashed"
    (leftover / "unet").mkdir(parents=True)
    (leftover / C.STATE_FILE).write_bytes(b"\x80\x02half")
    assert C.resolve_checkpoint(tmp_path, "latest") == root / "step_000002"
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [2]

    # a marker naming a directory that is gone: the newest complete checkpoint is taken
    (root / "latest").write_text("step_000009\n")
    assert C.resolve_checkpoint(tmp_path, "latest") == root / "step_000002"

    _, sampler = make_sampler(seed=3)
    resumed = Trainer(sampler, digits(8), _config(steps=4, checkpoint_every=2), tmp_path, progress=False)
    resumed.resume("latest")
    resumed.train()
    assert not leftover.exists()
    assert (root / "latest").read_text().strip() == "step_000004"
    state = C.load_state(root / "step_000004" / C.STATE_FILE)
    assert state["step"] == 4


def test_training_state_is_weights_only_loadable(tmp_path):
    """The state file holds no pickled code: torch.load(weights_only=True) refuses an object that would need it."""
    C.save_state(tmp_path / "ok.pt", {"step": 3, "rng": [torch.get_rng_state()], "betas": [0.9, 0.99]})
    assert C.load_state(tmp_path / "ok.pt")["step"] == 3
    torch.save({"config": TrainConfig()}, tmp_path / "bad.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        C.load_state(tmp_path / "bad.pt")
