"""fusediff.sampling: the one denoising loop, under every pipeline and the trainer's sampler.

:func:`denoise` runs a scheduler from noise with a ``predict(x, t, **model_kwargs)`` it is given
(a scheduler never calls a model), over samples of any rank: 1-D audio, 2-D images, 3-D video
latents. Its options cover what the pipelines need: classifier-free guidance as one batched call
(:class:`Guidance`, with guidance rescale), img2img and inpainting starts (``strength``,
``image_latents``, ``mask`` blending), diffusers' ``callback_on_step_end``, a progress bar, the
CUDA-graph runtime (:class:`ModelCallGraphs`, the pipelines' ``enable_cuda_graph``) and
channels-last latents. The loop never reads a value back from the device.

Layering: sampling imports models (layouts), schedulers' API and utils; pipelines and training
import sampling; sampling imports neither.

    import torch
    from fusediff import DDIMScheduler, UNet2DModel
    from fusediff.sampling import denoise

    unet, scheduler = UNet2DModel(sample_size=16, in_channels=1, out_channels=1), DDIMScheduler()
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    x0 = denoise(scheduler, lambda x, t: unet(x, t).sample, noise, num_inference_steps=20, progress=False)
"""

from .guidance import Guidance, combine, guided_prediction, rescale_guidance, scale_tensor
from .loop import denoise, model_call, step_arguments
from .loop_graph import LoopGraphs
from .noise import check_generators, initial_noise
from .runtime import ModelCallGraphs, SamplingRuntime, in_layout, module_memory_format
from .timesteps import Timesteps, check_steps, check_strength, host_timesteps, loop_timesteps, set_timesteps

__all__ = [
    "Guidance",
    "LoopGraphs",
    "ModelCallGraphs",
    "SamplingRuntime",
    "Timesteps",
    "check_generators",
    "check_steps",
    "check_strength",
    "combine",
    "denoise",
    "guided_prediction",
    "host_timesteps",
    "in_layout",
    "initial_noise",
    "loop_timesteps",
    "model_call",
    "module_memory_format",
    "rescale_guidance",
    "scale_tensor",
    "set_timesteps",
    "step_arguments",
]
