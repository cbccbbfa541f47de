"""A new pipeline on top of fusediff.sampling, as a user would write one: unconditional audio from a 1-D UNet
(diffusers' ``UNet1DModel`` layout, Dance Diffusion's call), in under 60 lines."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from fusediff.pipelines import DiffusionPipeline
from fusediff.pipelines.pipeline_utils import unet_prediction
from fusediff.sampling import check_generators, denoise, initial_noise
from fusediff.utils.outputs import BaseOutput


@dataclasses.dataclass
class AudioOutput(BaseOutput):
    audios: np.ndarray  # (B, channels, samples) in [-1, 1]
    sample_rate: int


class UnconditionalAudioPipeline(DiffusionPipeline):
    """Audio clips from noise: any fusediff scheduler, any length (padded to the UNet's factor, then cut)."""

    def __init__(self, unet, scheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 50, generator=None,
                 audio_length_in_s: float | None = None, return_dict: bool = True) -> AudioOutput | tuple:
        rate = self.unet.config.sample_rate
        length = audio_length_in_s * rate if audio_length_in_s is not None else self.unet.config.sample_size
        factor = 2 ** len(self.unet.up_blocks)
        if length < 3 * factor:
            raise ValueError(f"audio_length_in_s must be at least {3 * factor / rate} s; got {length / rate}")
        check_generators(generator, batch_size)
        padded = math.ceil(length / factor) * factor
        noise = initial_noise((batch_size, self.unet.config.in_channels, padded), generator, self.device,
                              self.unet.dtype)
        audio = denoise(self.scheduler, lambda x, t: unet_prediction(self.unet, x, t), noise,
                        num_inference_steps=num_inference_steps, generator=generator, progress=self.progress_bar,
                        cuda_graph=self.model_call_graphs("unet step", self.unet))
        audio = audio.clamp(-1, 1).float().cpu().numpy()[:, :, :int(length)]
        return AudioOutput(audios=audio, sample_rate=rate) if return_dict else (audio,)
