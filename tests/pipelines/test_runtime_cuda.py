"""The sampling loops on a CUDA device: no host synchronisation inside any loop (checked with
``torch.cuda.set_sync_debug_mode("error")``, which raises on every synchronising call), CUDA-graph
replay equal to the eager loop without new captures when prompts, seeds, guidance scale or step
count change, the fallback where capture fails, and channels-last pipelines."""

from __future__ import annotations

import functools

import pytest
import torch

import fusediff
from fusediff.utils.cuda_graph import CUDAGraphCallable
from support.configs import GPU_PIPE_UNET, GPU_PIPE_VAE
from support.cuda_sync import no_sync

pytestmark = pytest.mark.gpu

UNET, VAE = GPU_PIPE_UNET, GPU_PIPE_VAE
IMAGE_UNET = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  norm_num_groups=32)
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
SCHEDULERS = {"ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
              "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
              "heun": ("HeunDiscreteScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
              "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
              "dpmpp_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
              "deis": ("DEISMultistepScheduler", {}), "unipc": ("UniPCMultistepScheduler", {}),
              "ddpm": ("DDPMScheduler", {})}


@functools.lru_cache(maxsize=None)
def _models(dtype: torch.dtype):
    torch.manual_seed(0)
    unet = fusediff.UNet2DConditionModel(**UNET).eval().to("cuda", dtype)
    vae = fusediff.AutoencoderKL(**VAE).eval().to("cuda", dtype)
    return unet, vae


def _sd(scheduler: str, dtype=torch.float16, cls=fusediff.StableDiffusionPipeline):
    unet, vae = _models(dtype)
    name, extra = SCHEDULERS[scheduler]
    pipe = cls(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
               scheduler=getattr(fusediff, name)(**SD, **extra), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, seed=0, embeds_seed=1, guidance_scale=5.0, steps=4, images=1, generator=None, **kwargs):
    g = torch.Generator().manual_seed(embeds_seed)
    dtype = pipe.unet.dtype
    cond, uncond = (torch.randn(1, 77, 64, generator=g).to("cuda", dtype) for _ in range(2))
    size = {} if "image" in kwargs and "mask_image" not in kwargs else dict(height=32, width=32)
    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=guidance_scale,
                num_inference_steps=steps, num_images_per_prompt=images,
                generator=torch.Generator().manual_seed(seed) if generator is None else generator,
                output_type="latent", **size, **kwargs).images




def _sync_checked(fn):
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        with no_sync():
            return fn(*args, **kwargs)
    return checked


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_denoising_loop_never_synchronises(scheduler, monkeypatch):
    pipe = _sd(scheduler)
    monkeypatch.setattr(pipe, "_denoise", _sync_checked(pipe._denoise))
    _call(pipe)  # raises "called a synchronizing CUDA operation" on any host read in the loop
    if scheduler in ("ddim", "euler_a", "dpmpp_2m_karras"):
        pipe.enable_cuda_graph()
        _call(pipe)  # the capture (first call) may synchronise: it runs outside the check below
        _call(pipe, seed=3)


@pytest.mark.parametrize("cls", ["StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"])
def test_image_to_image_loops_never_synchronise(cls, monkeypatch):
    pipe = _sd("euler_a", cls=getattr(fusediff, cls))
    monkeypatch.setattr(pipe, "_denoise", _sync_checked(pipe._denoise))
    image = torch.rand(1, 3, 32, 32, device="cuda")
    extra = {"mask_image": torch.rand(1, 1, 32, 32, device="cuda")} if "Inpaint" in cls else {}
    _call(pipe, image=image, strength=0.7, **extra)


@pytest.mark.parametrize("cls", ["DDPMPipeline", "DDIMPipeline", "PNDMPipeline"])
def test_unconditional_loops_never_synchronise(cls):
    torch.manual_seed(0)
    pipe = getattr(fusediff, cls)(unet=fusediff.UNet2DModel(**IMAGE_UNET).eval().to("cuda", torch.float16),
                                  scheduler=fusediff.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    with no_sync():
        images = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                      output_type="pt").images  # "pt" stays on the device: no copy back
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler_a", "heun", "lms", "dpmpp_2m_karras", "unipc"])
def test_cuda_graph_loop_equals_eager(scheduler, dtype):
    pipe = _sd(scheduler, dtype)
    eager = _call(pipe, eta=0.5) if scheduler == "ddim" else _call(pipe)
    pipe.enable_cuda_graph()
    graphed = _call(pipe, eta=0.5) if scheduler == "ddim" else _call(pipe)
    again = _call(pipe, eta=0.5) if scheduler == "ddim" else _call(pipe)
    print(f"{scheduler} {dtype}: graph vs eager max |diff| {_max_diff(graphed, eager):.3e}, "
          f"replay vs eager {_max_diff(again, eager):.3e}")
    assert torch.equal(graphed, eager) and torch.equal(again, eager)


def test_cuda_graph_is_captured_once_per_shape():
    pipe = _sd("dpmpp_2m_karras")
    pipe.enable_cuda_graph()
    _call(pipe)
    graphs = pipe._cuda_graphs["unet step"][1]
    assert graphs.num_graphs == 1
    variants = [dict(seed=7), dict(embeds_seed=9), dict(guidance_scale=2.5), dict(steps=7)]
    for kwargs in variants:  # new seed, prompt, guidance scale, step count: replayed, never re-captured
        pipe.enable_cuda_graph()
        graphed = _call(pipe, **kwargs)
        pipe.disable_cuda_graph()
        eager = _call(pipe, **kwargs)
        pipe.enable_cuda_graph()
        print(kwargs, f"max |diff| {_max_diff(graphed, eager):.3e}")
        assert torch.equal(graphed, eager), kwargs
    # disable_cuda_graph freed the graphs above; the run below captures one and then replays it
    _call(pipe)
    _call(pipe, guidance_scale=9.0, steps=3)
    assert pipe._cuda_graphs["unet step"][1].num_graphs == 1
    _call(pipe, images=2)  # a new batch is a new shape: one more graph
    assert pipe._cuda_graphs["unet step"][1].num_graphs == 2


def test_cuda_graph_follows_model_changes():
    pipe = _sd("euler")
    pipe.enable_cuda_graph()
    before = _call(pipe)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.mul_(1.01)  # in place: the graph reads the new values
    after_inplace = _call(pipe)
    pipe.disable_cuda_graph()
    eager = _call(pipe)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.div_(1.01)
    assert not torch.equal(before, after_inplace) and torch.equal(after_inplace, eager)


def test_cuda_graph_falls_back_where_capture_fails():
    pipe = _sd("ddim")
    eager = _call(pipe)
    unet = pipe.unet

    class Syncing(torch.nn.Module):  # reads a value on the host each call: not capturable
        def __init__(self):
            super().__init__()
            self.inner = unet
            self.config, self.dtype = unet.config, unet.dtype

        def forward(self, x, t, **kwargs):
            if float(t) < 0:
                raise AssertionError
            return self.inner(x, t, **kwargs)

    pipe.unet = Syncing()
    pipe.enable_cuda_graph()
    with pytest.warns(RuntimeWarning, match="CUDA graph capture is not possible"):
        out = _call(pipe)
    assert torch.equal(out, eager)
    pipe.unet = unet


def test_channels_last_pipeline_on_cuda():
    pipe = _sd("dpmpp_2m_karras")
    plain = _call(pipe)
    unet, vae = pipe.unet, pipe.vae
    torch.manual_seed(0)
    pipe.unet = fusediff.UNet2DConditionModel(**UNET).eval().to("cuda", torch.float16)
    pipe.unet.load_state_dict(unet.state_dict())
    pipe.unet.to(memory_format=torch.channels_last)
    seen = []
    last = _call(pipe, callback_on_step_end=lambda p, i, t, d: seen.append(
        d["latents"].is_contiguous(memory_format=torch.channels_last)) or {})
    pipe.enable_cuda_graph()
    graphed = _call(pipe)
    print(f"channels-last vs contiguous max |diff| {_max_diff(last, plain):.3e}")
    assert all(seen)
    assert _max_diff(last, plain) <= 2e-2 * plain.float().abs().max().item()
    assert torch.equal(graphed, last)
    pipe.unet, pipe.vae = unet, vae


def test_cuda_graph_callable_replays_with_new_inputs():
    w = torch.randn(64, 64, device="cuda")

    def fn(x, y, shift):
        return torch.relu(x @ w + y) + shift

    graphed = CUDAGraphCallable(fn)
    for k in range(3):
        x, y = torch.randn(8, 64, device="cuda"), torch.randn(8, 64, device="cuda")
        out = graphed(x, y, 1.0)
        torch.testing.assert_close(out, fn(x, y, 1.0), rtol=0, atol=0)
    assert graphed.num_graphs == 1
    graphed(torch.randn(4, 64, device="cuda"), torch.randn(4, 64, device="cuda"), 1.0)  # new shape
    graphed(x, y, 2.0)  # a new non-tensor value is part of the signature
    assert graphed.num_graphs == 3
    graphed.reset()
    assert graphed.num_graphs == 0


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler", "heun", "lms", "dpmpp_2m_karras", "deis", "unipc"])
def test_whole_loop_graph_equals_eager(scheduler, monkeypatch):
    pipe = _sd(scheduler)
    eager = {seed: _call(pipe, seed=seed) for seed in (0, 3)}
    scaled = _call(pipe, guidance_scale=8.0)
    pipe.enable_cuda_graph(whole_loop=True)
    first, captured = _call(pipe), _call(pipe)  # eager, then captured and replayed
    monkeypatch.setattr(pipe, "_denoise", _sync_checked(pipe._denoise))  # a replay never synchronises
    replayed, rescaled = _call(pipe, seed=3), _call(pipe, guidance_scale=8.0)
    loops = pipe._cuda_graphs["unet step"][1]
    print(f"{scheduler}: whole loop vs eager {_max_diff(captured, eager[0]):.3e}, "
          f"new seed {_max_diff(replayed, eager[3]):.3e}")
    assert loops.num_graphs == 1 and loops.step_graphs.num_graphs == 0
    assert torch.equal(first, eager[0]) and torch.equal(captured, eager[0])
    assert torch.equal(replayed, eager[3]) and torch.equal(rescaled, scaled)


def test_whole_loop_graph_with_step_noise():
    pipe = _sd("euler_a")
    g = functools.partial(torch.Generator, "cuda")
    eager = _call(pipe, generator=g().manual_seed(4))
    pipe.enable_cuda_graph(whole_loop=True)
    got = [_call(pipe, generator=g().manual_seed(4)) for _ in range(3)]
    assert pipe._cuda_graphs["unet step"][1].num_graphs == 1
    assert all(torch.equal(x, eager) for x in got), [_max_diff(x, eager) for x in got]
    pipe.disable_cuda_graph()
    cpu_eager = _call(pipe)  # a CPU generator: the step's noise cannot be captured
    pipe.enable_cuda_graph(whole_loop=True)
    _call(pipe)
    with pytest.warns(RuntimeWarning, match="cannot be one CUDA graph"):
        fallback = _call(pipe)
    assert torch.equal(fallback, cpu_eager) and torch.equal(_call(pipe), cpu_eager)
