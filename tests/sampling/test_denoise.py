"""fusediff.sampling.denoise against the loop written out with HF diffusers' schedulers (tests/sampling/toy.py):
toy denoisers of rank 1, 2 and 3, classifier-free guidance (both half orders, rescale), img2img starts,
inpainting blends, callbacks that replace tensors, the progress bar, and bad arguments."""

from __future__ import annotations

import pytest
import torch
from sampling.toy import SCHEDULERS, ToyDenoiser, reference_loop, schedulers, spatial_shape

from fusediff.sampling import Guidance, denoise, rescale_guidance, set_timesteps

STEPS = 6


def _noise(rank: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 2, *spatial_shape(rank), generator=torch.Generator().manual_seed(seed))


def _model(rank: int) -> ToyDenoiser:
    torch.manual_seed(rank)
    return ToyDenoiser(rank).eval()


def _close(ours: torch.Tensor, theirs: torch.Tensor, what: str, tol: float = 2e-5) -> None:
    diff = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    print(f"{what}: max |ours - diffusers| {diff:.3e} (max |x| {scale:.3g})")
    assert ours.shape == theirs.shape and diff <= tol * max(1.0, scale), f"{what}: {diff:.3e}"


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_one_loop_drives_every_sample_rank(rank, name):
    model, noise = _model(rank), _noise(rank)
    ours, theirs = schedulers(name)
    stochastic = name == "euler_a"  # its step noise comes from the generator, the same draws in both
    with torch.no_grad():
        got = denoise(ours, model, noise, num_inference_steps=STEPS, progress=False,
                      generator=torch.Generator().manual_seed(5) if stochastic else None)
        want = reference_loop(theirs, model, noise, STEPS,
                              step_kwargs={"generator": torch.Generator().manual_seed(5)} if stochastic else None)
    _close(got, want, f"rank {rank} {name}")


@pytest.mark.parametrize("name", ["ddim", "euler_a"])
def test_step_noise_comes_from_the_generator(name):
    model, noise = _model(2), _noise(2)
    ours, theirs = schedulers(name)
    with torch.no_grad():
        got = denoise(ours, model, noise, num_inference_steps=STEPS, eta=0.7, generator=torch.Generator().manual_seed(3),
                      progress=False)
        kwargs = {"generator": torch.Generator().manual_seed(3), **({"eta": 0.7} if name == "ddim" else {})}
        want = reference_loop(theirs, model, noise, STEPS, step_kwargs=kwargs)
    _close(got, want, f"{name} with step noise")


@pytest.mark.parametrize("uncond_first", [True, False])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guidance_is_one_batched_call(uncond_first, rescale):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    model, noise = _model(1), _noise(1)
    cond, uncond = torch.full((2, 2, 1), 0.3), torch.full((2, 2, 1), -0.2)
    calls = []

    def predict(x, t, cond):
        calls.append(x.shape[0])
        return model(x, t, cond)

    both = torch.cat([uncond, cond] if uncond_first else [cond, uncond])
    ours, theirs = schedulers("euler")
    with torch.no_grad():
        got = denoise(ours, predict, noise, num_inference_steps=STEPS, model_kwargs={"cond": both},
                      guidance=Guidance(4.0, rescale=rescale, uncond_first=uncond_first), progress=False)
        theirs.set_timesteps(STEPS)
        x = noise * theirs.init_noise_sigma
        for t in theirs.timesteps:
            x_in = theirs.scale_model_input(x, t)
            eps_u, eps_c = model(x_in, t, uncond), model(x_in, t, cond)
            eps = eps_u + 4.0 * (eps_c - eps_u)
            if rescale:
                eps = rescale_noise_cfg(eps, eps_c, guidance_rescale=rescale)
            x = theirs.step(eps, t, x).prev_sample
    assert calls == [4] * STEPS, f"expected one call of the doubled batch per step, got {calls}"
    _close(got, x, f"guidance uncond_first={uncond_first} rescale={rescale}")


def test_guidance_rescale_is_diffusers_formula():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    guided, cond = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    torch.testing.assert_close(rescale_guidance(guided, cond, 0.7), rescale_noise_cfg(guided, cond, 0.7))


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m", "heun"])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_image_start_runs_the_last_steps_from_the_noised_image(name, strength):
    model, noise = _model(2), _noise(2)
    image = torch.randn(2, 2, 6, 5, generator=torch.Generator().manual_seed(7))
    ours, theirs = schedulers(name)
    with torch.no_grad():
        got = denoise(ours, model, noise, num_inference_steps=STEPS, strength=strength, image_latents=image,
                      progress=False)
        start = STEPS - int(STEPS * strength)
        want = reference_loop(theirs, model, noise, STEPS, start_index=start, image_latents=image, from_noise=False)
    _close(got, want, f"{name} strength {strength}")


@pytest.mark.parametrize("name", ["ddim", "euler_a"])
def test_mask_blend_keeps_the_unmasked_image(name):
    model, noise = _model(2), _noise(2)
    image = torch.randn(2, 2, 6, 5, generator=torch.Generator().manual_seed(7))
    mask = (torch.rand(1, 1, 6, 5, generator=torch.Generator().manual_seed(8)) > 0.5).float()
    ours, theirs = schedulers(name)
    with torch.no_grad():
        got = denoise(ours, model, noise, num_inference_steps=STEPS, image_latents=image, start_from_noise=True,
                      mask=torch.cat([mask, mask]), generator=torch.Generator().manual_seed(1), progress=False)
        kwargs = {"generator": torch.Generator().manual_seed(1)} if name == "euler_a" else {}
        want = reference_loop(theirs, model, noise, STEPS, image_latents=image, mask=mask, step_kwargs=kwargs)
    _close(got, want, f"{name} inpainting blend")
    kept = (1 - mask).bool().expand_as(got)
    assert torch.equal(got[kept], image[kept]), "the unmasked region must be the image's latents"


def test_callback_replaces_latents_and_conditions():
    model, noise = _model(3), _noise(3)
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((pipe, i, sorted(tensors)))
        return {"latents": tensors["latents"] * 0.5, "cond": torch.full((1,), float(i))} if i == 1 else None

    def reference_callback(i, x, cond):
        return (x * 0.5, torch.full((1,), float(i))) if i == 1 else (x, cond)

    ours, theirs = schedulers("dpmpp_2m")
    owner = object()
    with torch.no_grad():
        got = denoise(ours, model, noise, num_inference_steps=STEPS, model_kwargs={"cond": torch.zeros(1)},
                      callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "cond"],
                      pipeline=owner, progress=False)
        want = reference_loop(theirs, model, noise, STEPS, cond=torch.zeros(1), callback=reference_callback)
    assert seen == [(owner, i, ["cond", "latents"]) for i in range(STEPS)]
    _close(got, want, "callback replacements")


def test_callback_object_names_its_tensors():
    class Callback:  # diffusers' PipelineCallback objects carry tensor_inputs
        tensor_inputs = ["extra"]

        def __init__(self):
            self.seen = []

        def __call__(self, pipe, i, t, tensors):
            self.seen.append(sorted(tensors))

    callback = Callback()
    ours, _ = schedulers("ddim")
    denoise(ours, _model(1), _noise(1), num_inference_steps=3, callback_on_step_end=callback,
            callback_tensors={"extra": torch.ones(1)}, progress=False)
    assert callback.seen == [["extra"]] * 3


def test_prepared_timesteps_and_the_progress_bar():
    model, noise = _model(2), _noise(2)
    plain, _ = schedulers("heun")
    with torch.no_grad():
        want = denoise(plain, model, noise, num_inference_steps=STEPS, progress=False)
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.n = total, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            self.n += n

    ours, _ = schedulers("heun")
    run = set_timesteps(ours, STEPS)
    assert len(run) == 2 * STEPS - 1 and run.num_inference_steps == STEPS  # Heun: two calls per step
    with torch.no_grad():
        got = denoise(ours, model, noise, timesteps=run, progress=Bar)
    assert torch.equal(got, want)
    assert [(b.total, b.n) for b in bars] == [(STEPS, STEPS)], "the bar counts steps, not model calls"


def test_channels_last_latents():
    model, noise = _model(2), _noise(2)
    ours, _ = schedulers("euler")
    seen = []
    denoise(ours, model, noise, num_inference_steps=3, memory_format=torch.channels_last, progress=False,
            callback_on_step_end=lambda p, i, t, d: seen.append(d["latents"].is_contiguous(
                memory_format=torch.channels_last)))
    assert seen == [True] * 3


def test_no_autograd_graph_unless_asked():
    model, noise = _model(2), _noise(2)
    plain = denoise(schedulers("ddim")[0], model, noise, num_inference_steps=3, progress=False)
    assert not plain.requires_grad, "the loop keeps no autograd graph by default"
    differentiable = denoise(schedulers("ddim")[0], model, noise, num_inference_steps=3, progress=False, grad=True)
    assert differentiable.requires_grad
    differentiable.sum().backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0
    assert torch.allclose(plain, differentiable.detach(), rtol=0, atol=0)


def test_cuda_graph_falls_back_on_the_cpu():
    model, noise = _model(1), _noise(1)
    eager_s, graph_s = schedulers("ddim")[0], schedulers("ddim")[0]
    with torch.no_grad():
        eager = denoise(eager_s, model, noise, num_inference_steps=3, progress=False)
        with pytest.warns(RuntimeWarning, match="CUDA graph capture is not possible"):
            graphed = denoise(graph_s, model, noise, num_inference_steps=3, progress=False, cuda_graph=True)
    assert torch.equal(eager, graphed)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("name", ["ddim", "euler_a", "dpmpp_2m", "unipc"])
def test_loop_reads_nothing_back_from_the_device(rank, name):
    """On the meta device any read of a value on the host raises (tests/pipelines/test_runtime.py)."""
    model, noise = _model(rank).to("meta"), _noise(rank).to("meta")
    ours, _ = schedulers(name)
    options = dict(image_latents=torch.zeros_like(noise), strength=0.7)
    if rank == 1:  # guided, conditions of both halves
        options.update(model_kwargs={"cond": torch.zeros(4, 2, 1, device="meta")}, guidance=Guidance(3.0, rescale=0.5))
    else:  # inpainting blend
        options.update(mask=torch.ones_like(noise))
    with torch.no_grad():
        out = denoise(ours, model, noise, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                      progress=False, **options)
    assert out.device.type == "meta" and out.shape == noise.shape


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(noise=[1.0]), TypeError, "noise must be a tensor"),
    (dict(predict=3), TypeError, "predict must be callable"),
    (dict(guidance=4.0), TypeError, "Guidance"),
    (dict(mask=torch.ones(1)), ValueError, "image_latents"),
    (dict(start_from_noise=False), ValueError, "image_latents"),
    (dict(strength=1.5), ValueError, "strength"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(timesteps=[900, 500], sigmas=[1.0, 0.0]), ValueError, "not both"),
    (dict(sigmas=[2.0, 1.0, 0.0]), ValueError, "takes no custom sigmas"),
    (dict(callback_on_step_end=lambda *a: None, callback_on_step_end_tensor_inputs=["nope"]), ValueError,
     "callback_on_step_end_tensor_inputs"),
])
def test_bad_arguments_are_clear_errors(kwargs, error, match):
    ours, _ = schedulers("ddim")
    call = dict(scheduler=ours, predict=_model(1), noise=_noise(1), progress=False)
    call.update(kwargs)
    with pytest.raises(error, match=match):
        denoise(call.pop("scheduler"), call.pop("predict"), call.pop("noise"), **call)


def test_guidance_checks_its_numbers():
    with pytest.raises(ValueError, match="scale"):
        Guidance(float("nan"))
    with pytest.raises(ValueError, match="rescale"):
        Guidance(3.0, rescale="a")
