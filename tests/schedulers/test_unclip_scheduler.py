"""UnCLIPScheduler against diffusers' UnCLIPScheduler, step by step, and its refusals of bad input."""

from __future__ import annotations

import diffusers
import pytest
import torch

from fusediff import UnCLIPScheduler

from .parity import FakeModel, run_parity, start_sample, twins

CONFIGS = {
    "fixed_small_log_sample": dict(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0),
    "learned_range_eps": dict(variance_type="learned_range", prediction_type="epsilon"),
    "fixed_small_log_eps_noclip": dict(variance_type="fixed_small_log", prediction_type="epsilon", clip_sample=False),
}
ATOL = 1e-5


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("pass_prev", [True, False], ids=["prev_timestep", "t_minus_1"])
@pytest.mark.parametrize("steps", [2, 6, 1000])
def test_steps_match_diffusers(name: str, pass_prev: bool, steps: int) -> None:
    """Each step against diffusers' float32 scheduler and its float64 twin (tests/schedulers/parity.py's rule)."""
    config = CONFIGS[name]
    ours, theirs = UnCLIPScheduler(**config), twins(diffusers.UnCLIPScheduler, **config)
    for s in (ours, *theirs):
        s.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs[0].timesteps)
    timesteps = theirs[0].timesteps.tolist()
    if steps == 1000:  # the first and last steps of the full chain (t' = t - 1 on the table)
        timesteps = timesteps[:8] + timesteps[-8:]
    learned = "learned_range" if config["variance_type"] == "learned_range" else None

    def prev(i: int) -> dict:
        if not pass_prev:
            return {}
        return {"prev_timestep": timesteps[i + 1] if i + 1 < len(timesteps) else None}

    run_parity(ours, theirs, FakeModel(variance=learned), timesteps, noise_seed=3, per_step_kwargs=prev,
               what=f"UnCLIP {name} n={steps}")


def test_two_dim_samples_match_diffusers() -> None:
    """The prior's (B, D) embeddings go through the same step."""
    config = CONFIGS["fixed_small_log_sample"]
    ours, theirs = UnCLIPScheduler(**config), twins(diffusers.UnCLIPScheduler, **config)
    for s in (ours, *theirs):
        s.set_timesteps(5)
    timesteps = ours.timesteps.tolist()
    run_parity(ours, theirs, FakeModel(shape=(3, 16)), timesteps, noise_seed=9, x=start_sample((3, 16)),
               per_step_kwargs=lambda i: {"prev_timestep": timesteps[i + 1] if i + 1 < len(timesteps) else None},
               what="UnCLIP (B, D)")


def test_last_step_has_no_noise_and_tuple_output() -> None:
    ours, theirs = UnCLIPScheduler(), diffusers.UnCLIPScheduler()
    x, m = torch.randn(2, 8), torch.randn(2, 8)
    a = ours.step(m, 0, x, return_dict=False)  # t = 0: no noise drawn
    b = theirs.step(m, 0, x, return_dict=False)
    assert isinstance(a, tuple) and (a[0] - b[0]).abs().max() < ATOL


def test_add_noise_matches_diffusers() -> None:
    ours, theirs = UnCLIPScheduler(), diffusers.UnCLIPScheduler()
    x, n, t = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 500, 999])
    assert (ours.add_noise(x, n, t) - theirs.add_noise(x, n, t)).abs().max() < 1e-6


def test_config_round_trip_both_ways(tmp_path) -> None:
    ours = UnCLIPScheduler(variance_type="learned_range", clip_sample_range=2.0)
    ours.save_pretrained(tmp_path / "ours")
    theirs = diffusers.UnCLIPScheduler.from_pretrained(tmp_path / "ours")
    assert theirs.config.variance_type == "learned_range" and theirs.config.clip_sample_range == 2.0
    theirs.save_pretrained(tmp_path / "theirs")
    back = UnCLIPScheduler.from_pretrained(tmp_path / "theirs")
    assert {k: back.config[k] for k in theirs.config if not k.startswith("_")} == \
        {k: v for k, v in theirs.config.items() if not k.startswith("_")}


def test_registered_without_compatibles() -> None:
    assert UnCLIPScheduler._compatibles == () and UnCLIPScheduler().compatibles == [UnCLIPScheduler]


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta_schedule="linear"), "squaredcos_cap_v2"),
    (dict(variance_type="fixed_small"), "variance_type"),
    (dict(prediction_type="v_prediction"), "prediction_type"),
])
def test_bad_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UnCLIPScheduler(**kwargs)


def test_bad_steps_and_timesteps_raise() -> None:
    s = UnCLIPScheduler()
    for n in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(n)
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="timestep 1000"):
        s.step(x, 1000, x)
    with pytest.raises(ValueError, match="prev_timestep 1200"):
        s.step(x, 10, x, prev_timestep=1200)
    learned = UnCLIPScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="twice the sample's channels"):
        learned.step(torch.zeros(1, 3, 2, 2), 10, torch.zeros(1, 3, 2, 2))
