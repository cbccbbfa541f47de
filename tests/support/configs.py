"""Model configs shared by several test files: tiny CPU ones, and SD-like widths for the GPU tests."""

TINY_UNET = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=4, attention_head_dim=4)
TINY_COND_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                      norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2)
TINY_AUTOENCODER = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4)

# SD 1.5's widths (320/640, 768-wide context, 8 heads) and the SD VAE's (128/256/512) at two or three levels
SD_LIKE_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320, 640),
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                    cross_attention_dim=768, attention_head_dim=8)
SD_LIKE_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512),
                   down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                   layers_per_block=1)

# small pipelines on the GPU: widths the Triton kernels take (32 groups, 8 heads)
GPU_PIPE_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                     attention_head_dim=8, norm_num_groups=32)
GPU_PIPE_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    norm_num_groups=32, sample_size=32)

# the SD 1.x and 2.x UNet shapes at small widths, for the fused-against-reference GPU tests
SD_SHAPED_UNETS = {
    # SD 1.x shape: head count 8, conv projections, cross-attention on 77 tokens
    "sd1": dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=96, attention_head_dim=8,
                norm_num_groups=32),
    # SD 2.x shape: a per-block list in attention_head_dim (head counts 2 and 4, as diffusers reads it: head
    # width 40 at both levels), linear projections, upcast attention
    "sd2": dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(80, 160),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=96,
                attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True, norm_num_groups=16),
}
