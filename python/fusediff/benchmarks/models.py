"""Model configurations the benchmarks share, and FLOP counting.

The configurations are constructor arguments taken by both fusediff's and diffusers' classes, so a
benchmark builds each library's model from the same dict and loads one set of random weights into
both. They follow the public checkpoints' ``config.json`` files (weights are never downloaded):

    SD15_UNET          UNet2DConditionModel of runwayml/stable-diffusion-v1-5 (860M)
    SD_VAE             AutoencoderKL of Stable Diffusion 1.x/2.x (83.7M; the decoder is 49.5M)
    SD15_SCHEDULER     its scheduler_config.json less the PNDM-only keys, for any scheduler class
    DDPM_CIFAR10_UNET  UNet2DModel of google/ddpm-cifar10-32 (Ho et al. 2020; 35.7M)
"""

from __future__ import annotations

from collections.abc import Callable

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, sample_size=512)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1)
DDPM_CIFAR10_UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                         block_out_channels=(128, 256, 256, 256),
                         down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                         attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                         norm_eps=1e-6, norm_num_groups=32)


def flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of ``fn`` (matmuls, convolutions, attention), by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())
