"""EMAModel against diffusers.training_utils.EMAModel: the same decay after every step and the same shadow
parameters after N steps, for each schedule option; fp32 shadows of bf16 weights; state dicts that
round-trip through torch.load(weights_only=True) and load across the two libraries; copy/store/restore."""

from __future__ import annotations

import diffusers.training_utils as dtu
import pytest
import torch
from torch import nn

from fusediff.training import EMAModel
from support.parity import assert_close, one_thread  # noqa: F401  (one_thread: autouse)

SETTINGS = [
    dict(decay=0.9999),
    dict(decay=0.9, min_decay=0.5),
    dict(decay=0.999, update_after_step=5),
    dict(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3),
    dict(decay=0.95, use_ema_warmup=True, inv_gamma=2.0, power=0.75, update_after_step=3, min_decay=0.1),
]


def _model(seed=0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3)).to(dtype)
    model[2].bias.requires_grad_(False)  # a frozen parameter: its shadow copies it
    return model


def _perturb(model, step):
    g = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_matches_diffusers(settings):
    model = _model()
    ours, theirs = EMAModel(model.parameters(), **settings), dtu.EMAModel(model.parameters(), **settings)
    for step in range(25):
        _perturb(model, step)
        ours.step(model.parameters())
        theirs.step(model.parameters())
        assert ours.cur_decay_value == pytest.approx(theirs.cur_decay_value, rel=1e-12, abs=0), f"decay at {step}"
        assert ours.optimization_step == theirs.optimization_step
    for i, (a, b) in enumerate(zip(ours.shadow_params, theirs.shadow_params)):
        assert_close(a, b, f"shadow {i}", rtol=1e-6)
    assert torch.equal(ours.shadow_params[-1], model[2].bias), "frozen parameter copied"
    # the decay formula written out, after 25 steps
    k = 25 - settings.get("update_after_step", 0) - 1
    if settings.get("use_ema_warmup"):
        value = 1 - (1 + k / settings["inv_gamma"]) ** -settings["power"]
    else:
        value = (1 + k) / (10 + k)
    value = max(min(value, settings["decay"]), settings.get("min_decay", 0.0))
    assert ours.cur_decay_value == pytest.approx(value, rel=1e-12)


def test_fp32_shadows_of_bf16_weights():
    model = _model(dtype=torch.bfloat16)
    ours = EMAModel(model.parameters(), decay=0.9, shadow_dtype=torch.float32)
    assert all(s.dtype == torch.float32 for s in ours.shadow_params)
    # reference: diffusers' EMA over float32 copies of the same bf16 weights
    upcast = [p.detach().float().requires_grad_(p.requires_grad) for p in model.parameters()]
    theirs = dtu.EMAModel(upcast, decay=0.9)
    for step in range(10):
        _perturb(model, step)
        ours.step(model.parameters())
        with torch.no_grad():
            for u, p in zip(upcast, model.parameters()):
                u.copy_(p.float())
        theirs.step(upcast)
    for i, (a, b) in enumerate(zip(ours.shadow_params, theirs.shadow_params)):
        assert_close(a, b, f"fp32 shadow {i}", rtol=1e-6)
    target = _model(dtype=torch.bfloat16)
    ours.copy_to(target.parameters())
    assert target[0].weight.dtype == torch.bfloat16
    assert torch.equal(target[0].weight, ours.shadow_params[0].to(torch.bfloat16))


def test_state_dict_round_trip_and_resume(tmp_path):
    model = _model()
    ema = EMAModel(model.parameters(), decay=0.99, update_after_step=2, use_ema_warmup=True, power=0.75)
    for step in range(7):
        _perturb(model, step)
        ema.step(model.parameters())
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    state = torch.load(tmp_path / "ema.pt", weights_only=True)
    resumed = EMAModel(_model(seed=1).parameters())
    resumed.load_state_dict(state)
    assert resumed.optimization_step == 7 and resumed.power == 0.75 and resumed.use_ema_warmup is True
    for step in range(7, 12):
        _perturb(model, step)
        ema.step(model.parameters())
        resumed.step(model.parameters())
    for i, (a, b) in enumerate(zip(resumed.shadow_params, ema.shadow_params)):
        assert torch.equal(a, b), f"resumed shadow {i}"


def test_state_dicts_load_across_libraries():
    model = _model()
    theirs = dtu.EMAModel(model.parameters(), decay=0.9, min_decay=0.2)
    for step in range(4):
        _perturb(model, step)
        theirs.step(model.parameters())
    ours = EMAModel(_model(seed=2).parameters())
    ours.load_state_dict(theirs.state_dict())
    assert ours.decay == 0.9 and ours.min_decay == 0.2 and ours.optimization_step == 4
    assert all(torch.equal(a, b) for a, b in zip(ours.shadow_params, theirs.shadow_params))
    back = dtu.EMAModel(_model(seed=3).parameters())
    back.load_state_dict(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.shadow_params, theirs.shadow_params))


def test_copy_store_restore():
    model = _model()
    ema = EMAModel(model.parameters(), decay=0.5)
    for step in range(3):
        _perturb(model, step)
        ema.step(model.parameters())
    live = [p.detach().clone() for p in model.parameters()]
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow_params))
    ema.restore(model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), live))
    with ema.average_parameters(model.parameters()):
        assert torch.equal(model[0].weight, ema.shadow_params[0])
    assert torch.equal(model[0].weight, live[0])
    with pytest.raises(RuntimeError, match="store"):
        ema.restore(model.parameters())
    assert ema.to(dtype=torch.float64) is ema and ema.shadow_params[0].dtype == torch.float64


def test_bad_input():
    model = _model()
    with pytest.raises(TypeError, match="parameters"):
        EMAModel(model)
    with pytest.raises(ValueError, match="decay"):
        EMAModel(model.parameters(), decay=1.5)
    with pytest.raises(TypeError, match="shadow_dtype"):
        EMAModel(model.parameters(), shadow_dtype=torch.int32)
    ema = EMAModel(model.parameters())
    with pytest.raises(ValueError, match="tracks 4"):
        ema.step(list(model.parameters())[:2])
    state = ema.state_dict()
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict({**state, "shadow_params": [torch.zeros(1)] * 4})
    with pytest.raises(ValueError, match="optimization_step"):
        ema.load_state_dict({**state, "optimization_step": 1.5})
