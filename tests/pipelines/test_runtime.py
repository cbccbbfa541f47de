"""The sampling loops' run-time behaviour on the CPU: no host reads in any loop, channels-last latents,
and the CUDA-graph switch's fallback where there is no GPU.

No host reads: the pipelines run with their models on the "meta" device, whose tensors have no
values, so any read of a value on the host inside the loop (``.item()``, ``int(t)``, ``.tolist()``,
a copy to the CPU, Python branching on a tensor, a data-dependent shape) raises. On a GPU each of
those would make the host wait for the device. The loop may read the host's own tables.
"""

from __future__ import annotations

import contextlib
import gc
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from pipelines.tiny_sd import SCHEDULERS, SD_SCHEDULER, UNET, VAE

import fusediff
from fusediff.sampling import in_layout, loop_timesteps, module_memory_format
from fusediff.utils import cuda_graph

TINY_UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=4)


def test_meta_tensors_refuse_host_reads():
    """The premise of the tests below: reading a meta tensor's value raises."""
    t = torch.zeros((), device="meta")
    for read in (lambda: t.item(), lambda: int(t), lambda: t.cpu(), lambda: bool(t > 0),
                 lambda: torch.zeros(3, device="meta").nonzero().shape[0] + 0):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


def _sd(cls, scheduler: str, unet_in_channels: int = 4):
    torch.manual_seed(0)
    name, extra = SCHEDULERS[scheduler]
    pipe = cls(vae=fusediff.AutoencoderKL(**VAE).eval(), text_encoder=None, tokenizer=None,
               unet=fusediff.UNet2DConditionModel(**dict(UNET, in_channels=unet_in_channels)).eval(),
               scheduler=getattr(fusediff, name)(**SD_SCHEDULER, **extra), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(device):
    return torch.zeros(1, 77, UNET["cross_attention_dim"], device=device)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_text_to_image_loop_reads_nothing_back(scheduler):
    pipe = _sd(fusediff.StableDiffusionPipeline, scheduler).to("meta")
    out = pipe(prompt_embeds=_embeds("meta"), negative_prompt_embeds=_embeds("meta"), num_inference_steps=4,
               guidance_scale=5.0, guidance_rescale=0.5, generator=torch.Generator().manual_seed(0),
               output_type="latent")
    assert out.images.device.type == "meta" and out.images.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m_karras"])
@pytest.mark.parametrize("cls, channels", [(fusediff.StableDiffusionImg2ImgPipeline, 4),
                                           (fusediff.StableDiffusionInpaintPipeline, 4),
                                           (fusediff.StableDiffusionInpaintPipeline, 9)])
def test_image_to_image_loops_read_nothing_back(cls, channels, scheduler):
    pipe = _sd(cls, scheduler, channels).to("meta")
    image = PIL.Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8))
    extra = {"mask_image": image.convert("L")} if cls is fusediff.StableDiffusionInpaintPipeline else {}
    out = pipe(image=image, strength=0.7, prompt_embeds=_embeds("meta"), negative_prompt_embeds=_embeds("meta"),
               num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent", **extra)
    assert out.images.device.type == "meta"


@pytest.mark.parametrize("cls", [fusediff.DDPMPipeline, fusediff.DDIMPipeline, fusediff.PNDMPipeline])
def test_unconditional_loops_read_nothing_back(cls):
    torch.manual_seed(0)
    pipe = cls(unet=fusediff.UNet2DModel(**TINY_UNET).eval(), scheduler=fusediff.DDPMScheduler()).to("meta")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.device.type == "meta" and out.images.shape == (2, 3, 8, 8)


def test_a_host_read_in_the_loop_is_caught(monkeypatch):
    """Negative control: a scheduler handed the device timestep (as a loop written the obvious way
    would) reads it back, and the meta run says so."""
    pipe = _sd(fusediff.StableDiffusionPipeline, "ddim").to("meta")
    step = pipe.scheduler.step
    monkeypatch.setattr(pipe.scheduler, "step", lambda m, t, x, **kw: step(m, t.to("meta"), x, **kw))
    with pytest.raises(RuntimeError, match="meta"):
        pipe(prompt_embeds=_embeds("meta"), negative_prompt_embeds=_embeds("meta"), num_inference_steps=2,
             output_type="latent")


def test_loop_timesteps_and_layout_helpers():
    host, dev = loop_timesteps(torch.tensor([981, 500, 1]), torch.device("meta"))
    assert host.device.type == "cpu" and host.tolist() == [981, 500, 1] and dev.device.type == "meta"
    unet = fusediff.UNet2DModel(**TINY_UNET)
    x = torch.randn(2, 3, 8, 8)
    assert module_memory_format(unet) == torch.contiguous_format and in_layout(x, unet) is x
    unet.to(memory_format=torch.channels_last)
    assert module_memory_format(unet) == torch.channels_last
    assert in_layout(x, unet).is_contiguous(memory_format=torch.channels_last)
    assert module_memory_format(object()) == torch.contiguous_format


def _seeded_sd_call(pipe, **kwargs):
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(1, 77, 16, generator=g), torch.randn(1, 77, 16, generator=g)
    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=3, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images


@pytest.mark.parametrize("scheduler", ["euler_a", "unipc"])
def test_channels_last_pipeline_gives_the_contiguous_images(scheduler):
    pipe = _sd(fusediff.StableDiffusionPipeline, scheduler)
    plain = _seeded_sd_call(pipe)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    seen = []
    last = _seeded_sd_call(pipe, callback_on_step_end=lambda p, i, t, d: seen.append(
        d["latents"].is_contiguous(memory_format=torch.channels_last)) or {})
    assert all(seen) and len(seen) == 3, f"latents left channels-last at steps {seen}"
    diff = (last - plain).abs().max().item()
    print(f"{scheduler}: channels-last vs contiguous max |diff| {diff:.2e}")
    assert diff <= 1e-5 * plain.abs().max().item()


def test_cuda_graph_switch_falls_back_on_the_cpu():
    pipe = _sd(fusediff.StableDiffusionPipeline, "ddim")
    eager = _seeded_sd_call(pipe)
    assert not pipe.cuda_graph_enabled
    pipe.enable_cuda_graph()
    assert pipe.cuda_graph_enabled
    with pytest.warns(RuntimeWarning, match="CUDA graph capture is not possible.*cpu"):
        first = _seeded_sd_call(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per signature, not every call
        second = _seeded_sd_call(pipe)
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    torch.testing.assert_close(second, eager, rtol=0, atol=0)
    pipe.disable_cuda_graph()
    assert not pipe.cuda_graph_enabled and "_cuda_graphs" not in pipe.__dict__
    assert "cuda_graph" not in str(pipe.config)  # a run-time choice, never saved (DESIGN.md, decision 8)


def test_cuda_graph_callable_checks_its_arguments():
    from fusediff.utils.cuda_graph import CUDAGraphCallable

    with pytest.raises(TypeError, match="callable"):
        CUDAGraphCallable(3)
    with pytest.raises(ValueError, match="warmup"):
        CUDAGraphCallable(torch.sin, warmup=0)
    graphed = CUDAGraphCallable(torch.sin)
    with pytest.warns(RuntimeWarning, match="one CUDA device"):
        out = graphed(torch.ones(3))
    torch.testing.assert_close(out, torch.sin(torch.ones(3)))
    assert graphed.num_graphs == 0


def test_capture_pauses_the_garbage_collector(monkeypatch):
    seen = []

    @contextlib.contextmanager
    def fake_graph(graph, pool=None):
        seen.append(("enter", gc.isenabled(), graph, pool))
        yield
        seen.append(("exit", gc.isenabled()))

    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    assert gc.isenabled()
    with cuda_graph.capture("g", "p"):
        inside = gc.isenabled()
    with pytest.raises(RuntimeError, match="boom"), cuda_graph.capture("g"):
        raise RuntimeError("boom")
    print(seen)
    assert not inside and gc.isenabled()
    assert seen[0] == ("enter", False, "g", "p") and seen[1] == ("exit", False) and seen[2][:2] == ("enter", False)
    gc.disable()  # a caller that had it off keeps it off
    try:
        with cuda_graph.capture("g"):
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
