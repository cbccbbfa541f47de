"""A pipeline written on top of fusediff.sampling in under 60 lines (tests/sampling/audio_pipeline.py) gives the
audio of diffusers' Dance Diffusion loop: diffusers' UNet1DModel, the same seed, DDIM in both (Dance Diffusion's
own IPNDM scheduler is not in fusediff)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sampling.audio_pipeline import UnconditionalAudioPipeline

import fusediff

UNET_1D = dict(block_out_channels=(32, 32, 64), extra_in_channels=16, time_embedding_dim=16, sample_size=512,
               sample_rate=16000,
               in_channels=2, out_channels=2, flip_sin_to_cos=True, use_timestep_embedding=False,
               time_embedding_type="fourier", mid_block_type="UNetMidBlock1D",
               down_block_types=("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
               up_block_types=("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"))
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def _unet():
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet1DModel(**UNET_1D).eval()


def _dance_diffusion_loop(unet, steps: int, seed: int, batch: int, length_s: float) -> np.ndarray:
    """Dance Diffusion's __call__ (diffusers 0.42.1) with diffusers' DDIMScheduler."""
    import diffusers
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = diffusers.DDIMScheduler(**SCHEDULE)
    sample_size = length_s * unet.config.sample_rate
    factor = 2 ** len(unet.up_blocks)
    original = int(sample_size)
    if sample_size % factor != 0:
        sample_size = (length_s * unet.config.sample_rate // factor + 1) * factor
    audio = randn_tensor((batch, unet.config.in_channels, int(sample_size)),
                         generator=torch.Generator().manual_seed(seed), dtype=unet.dtype)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            audio = scheduler.step(unet(audio, t).sample, t, audio).prev_sample
    return audio.clamp(-1, 1).float().numpy()[:, :, :original]


def test_the_pipeline_is_short():
    lines = Path(__file__).with_name("audio_pipeline.py").read_text().splitlines()
    assert len(lines) < 60, f"the pipeline takes {len(lines)} lines"


@pytest.mark.parametrize("length_s", [0.032, 0.025])  # 512 samples, and 400 padded to 448 then cut
def test_audio_matches_diffusers_dance_diffusion_loop(length_s):
    unet = _unet()
    pipe = UnconditionalAudioPipeline(unet=unet, scheduler=fusediff.DDIMScheduler(**SCHEDULE))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(3),
               audio_length_in_s=length_s)
    want = _dance_diffusion_loop(unet, 8, 3, 2, length_s)
    diff = np.abs(out.audios - want).max()
    print(f"{length_s} s: audio {out.audios.shape}, max |ours - diffusers| {diff:.3e}")
    assert out.audios.shape == want.shape == (2, 2, int(length_s * 16000)) and out.sample_rate == 16000
    assert diff <= 1e-5 and np.abs(want).max() > 0.1


def test_any_scheduler_and_clear_errors():
    pipe = UnconditionalAudioPipeline(unet=_unet(), scheduler=fusediff.DPMSolverMultistepScheduler(**SCHEDULE))
    pipe.set_progress_bar_config(disable=True)
    audio, = pipe(num_inference_steps=4, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert audio.shape == (1, 2, 512) and np.isfinite(audio).all() and np.abs(audio).max() <= 1
    with pytest.raises(ValueError, match="audio_length_in_s"):
        pipe(audio_length_in_s=0.001)
    with pytest.raises(ValueError, match="generators"):
        pipe(batch_size=2, generator=[torch.Generator()])
