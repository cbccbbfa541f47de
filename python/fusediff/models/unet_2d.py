"""UNet2DModel: the unconditional (or class-conditional) image UNet of DDPM, DDIM and ADM.

    emb    = MLP(embed(t)) [+ class embedding]                       (B, 4 C_0)
    h      = conv_in(x)                                              (B, C_0, H, W)
    h, ... = down blocks (kept outputs), mid block, up blocks (concat kept outputs)
    out    = conv_out(SiLU(GroupNorm(h)))                            (B, C_out, H, W)

The network of DDPM (Ho et al. 2020, arXiv:2006.11239, Appendix B), with the options of its
successors: scale-shift time conditioning (AdaGN, Dhariwal & Nichol 2021, arXiv:2105.05233,
Sec. 3) and a class-label embedding added to the time embedding, as in that paper's
class-conditional models; a Fourier noise-level embedding with the output divided by sigma
(NCSN++, Song et al. 2021, arXiv:2011.13456); a learned timestep embedding. GroupNorm+SiLU,
attention and the timestep embedding run through :mod:`fusediff.kernels`; the sinusoidal
embedding and its MLP run as one fused op (``timestep_mlp``) where its kernels run.

The constructor takes exactly diffusers 0.42.1's ``UNet2DModel`` arguments with the same
defaults, and the module tree has diffusers' parameter names, so ``config.json`` and the
weights load in either library. Not supported (ValueError): the Skip* blocks (NCSN++), mid
block types other than ``UNetMidBlock2D``, ``resnet_time_scale_shift="spatial"``,
``norm_num_groups=None``. Gradient checkpointing is not implemented.

Deliberate difference: a Python float timestep keeps its fraction (diffusers truncates it to
an integer); integer timesteps and tensors behave as in diffusers.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..configuration import register_to_config
from ..modeling import ModelMixin
from ..utils.outputs import BaseOutput
from .activations import check_activation
from .attention import convert_legacy_attention_keys
from .embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps, class_embedding, embed_timesteps
from .normalization import GroupNorm
from .resnet import TIME_EMBEDDING_NORMS
from .time_projections import project_time
from .unet_2d_blocks import DOWN_BLOCK_TYPES, MID_BLOCK_TYPES, UP_BLOCK_TYPES, UNetMidBlock2D, get_down_block, \
    get_up_block
from .unet_2d_checks import check_config, check_index_range, timesteps_for_batch

TIME_EMBEDDING_TYPES = ("positional", "fourier", "learned")
CLASS_EMBED_TYPES = (None, "timestep", "identity")


@dataclasses.dataclass
class UNet2DOutput(BaseOutput):
    """Output of :class:`UNet2DModel`: ``sample`` of shape (B, out_channels, H, W)."""

    sample: torch.Tensor


class UNet2DModel(ModelMixin):
    """A 2-D UNet mapping a noisy sample (B, C_in, H, W) and timestep(s) to (B, C_out, H, W).

    Args (diffusers' names and defaults):
        sample_size: nominal H (= W) or (H, W); recorded, not enforced.
        in_channels, out_channels: channels of the input and the output.
        center_input_sample: map the input x to 2x - 1 first.
        time_embedding_type: ``"positional"`` (sinusoidal), ``"fourier"`` (Gaussian Fourier
            features of log sigma; the output is divided by sigma) or ``"learned"`` (a table of
            ``num_train_timesteps`` vectors).
        time_embedding_dim: width of the time embedding; ``4 * block_out_channels[0]`` when None.
        freq_shift, flip_sin_to_cos: frequency spacing and sin/cos order of the positional embedding.
        down_block_types, up_block_types: block names per resolution (see
            :mod:`fusediff.models.unet_2d_blocks`); as many as ``block_out_channels``.
        mid_block_type: ``"UNetMidBlock2D"`` or None (no mid block).
        block_out_channels: width at each resolution, highest resolution first.
        layers_per_block: resnets per down block (up blocks get one more).
        mid_block_scale_factor: output scale factor of the mid block's resnets and attention.
        downsample_padding: padding of the stride-2 downsampling convs (0: pad bottom/right).
        downsample_type, upsample_type: ``"conv"`` or ``"resnet"`` resampling in the attention blocks.
        dropout: dropout in the resnets.
        act_fn: activation of the resnets (``silu``, ``swish``, ``mish``, ``gelu``, ``relu``).
        attention_head_dim: width of one attention head; None for one head over all channels.
        norm_num_groups: GroupNorm groups everywhere except the mid block's attention.
        attn_norm_num_groups: GroupNorm groups of the mid block's attention (see UNetMidBlock2D).
        norm_eps: GroupNorm epsilon.
        resnet_time_scale_shift: ``"default"`` or ``"scale_shift"`` time conditioning.
        add_attention: whether the mid block has attention.
        class_embed_type: None (a table of ``num_class_embeds`` vectors, if that is set),
            ``"timestep"`` (labels embedded like timesteps) or ``"identity"`` (labels are
            already (B, time_embed_dim) embeddings).
        num_class_embeds: number of classes for the table embedding.
        num_train_timesteps: size of the ``"learned"`` time embedding table.
    """

    @register_to_config
    def __init__(self, sample_size: int | tuple[int, int] | None = None, in_channels: int = 3, out_channels: int = 3,
                 center_input_sample: bool = False, time_embedding_type: str = "positional",
                 time_embedding_dim: int | None = None, freq_shift: int = 0, flip_sin_to_cos: bool = True,
                 down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                                      "AttnDownBlock2D"),
                 mid_block_type: str | None = "UNetMidBlock2D",
                 up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                 block_out_channels: tuple[int, ...] = (224, 448, 672, 896), layers_per_block: int = 2,
                 mid_block_scale_factor: float = 1, downsample_padding: int = 1, downsample_type: str = "conv",
                 upsample_type: str = "conv", dropout: float = 0.0, act_fn: str = "silu",
                 attention_head_dim: int | None = 8, norm_num_groups: int = 32,
                 attn_norm_num_groups: int | None = None, norm_eps: float = 1e-5,
                 resnet_time_scale_shift: str = "default", add_attention: bool = True,
                 class_embed_type: str | None = None, num_class_embeds: int | None = None,
                 num_train_timesteps: int | None = None) -> None:
        super().__init__()
        check_config(self.config, down_types=DOWN_BLOCK_TYPES, up_types=UP_BLOCK_TYPES, mid_types=MID_BLOCK_TYPES,
                     time_embedding_types=TIME_EMBEDDING_TYPES, class_embed_types=CLASS_EMBED_TYPES,
                     time_embedding_norms=TIME_EMBEDDING_NORMS)
        check_activation(act_fn)
        channels = list(block_out_channels)
        self.sample_size = sample_size
        time_embed_dim = time_embedding_dim or channels[0] * 4

        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=(1, 1))

        # time: t -> (B, timestep_input_dim) -> MLP -> (B, time_embed_dim)
        if time_embedding_type == "fourier":
            self.time_proj = GaussianFourierProjection(embedding_size=channels[0], scale=16)
            timestep_input_dim = 2 * channels[0]
        elif time_embedding_type == "positional":
            self.time_proj = Timesteps(channels[0], flip_sin_to_cos, freq_shift)
            timestep_input_dim = channels[0]
        else:
            self.time_proj = nn.Embedding(num_train_timesteps, channels[0])
            timestep_input_dim = channels[0]
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim)

        # class labels: summed with the time embedding
        self.class_embedding = class_embedding(class_embed_type, num_class_embeds, timestep_input_dim, time_embed_dim)

        common = dict(temb_channels=time_embed_dim, resnet_eps=norm_eps, resnet_act_fn=act_fn,
                      resnet_groups=norm_num_groups, resnet_time_scale_shift=resnet_time_scale_shift, dropout=dropout)
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()  # registered before mid_block: diffusers' state-dict key order
        output_channel = channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, channels[i]
            self.down_blocks.append(get_down_block(
                block_type, num_layers=layers_per_block, in_channels=input_channel, out_channels=output_channel,
                add_downsample=i < len(channels) - 1, downsample_padding=downsample_padding,
                attention_head_dim=attention_head_dim if attention_head_dim is not None else output_channel,
                downsample_type=downsample_type, **common))

        self.mid_block = None if mid_block_type is None else UNetMidBlock2D(
            in_channels=channels[-1], temb_channels=time_embed_dim, dropout=dropout, resnet_eps=norm_eps,
            resnet_act_fn=act_fn, output_scale_factor=mid_block_scale_factor,
            resnet_time_scale_shift=resnet_time_scale_shift,
            attention_head_dim=attention_head_dim if attention_head_dim is not None else channels[-1],
            resnet_groups=norm_num_groups, attn_groups=attn_norm_num_groups, add_attention=add_attention)

        reversed_channels = channels[::-1]
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, len(channels) - 1)]
            self.up_blocks.append(get_up_block(
                block_type, num_layers=layers_per_block + 1, in_channels=input_channel, out_channels=output_channel,
                prev_output_channel=prev_output_channel, add_upsample=i < len(channels) - 1,
                attention_head_dim=attention_head_dim if attention_head_dim is not None else output_channel,
                upsample_type=upsample_type, **common))

        # out: GroupNorm and SiLU in one op, then a 3x3 conv
        self.conv_norm_out = GroupNorm(norm_num_groups, channels[0], eps=norm_eps, activation="silu")
        self.conv_out = nn.Conv2d(channels[0], out_channels, kernel_size=3, padding=1)

    def _time_embedding(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, time_embed_dim) in the model's dtype."""
        if self.config.time_embedding_type == "learned":
            check_index_range(timesteps, self.config.num_train_timesteps, "timestep")
            timesteps = timesteps.long()
        if isinstance(self.time_proj, Timesteps):  # sinusoid + MLP, one fused op where the kernels run
            return embed_timesteps(self.time_proj, self.time_embedding, timesteps, self.dtype)
        t_emb = self.time_proj(timesteps).to(dtype=self.dtype)  # (B, timestep_input_dim)
        return self.time_embedding(t_emb)

    def _class_embedding(self, class_labels: torch.Tensor | None, batch: int,
                         device: torch.device) -> torch.Tensor | None:
        """Class labels -> (B or 1, time_embed_dim), or None for a model without class conditioning."""
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError(f"class_labels were given, but this {type(self).__name__} has no class "
                                 "embedding (set class_embed_type or num_class_embeds)")
            return None
        if class_labels is None:
            raise ValueError(f"this {type(self).__name__} is class-conditional: pass class_labels")
        if not isinstance(class_labels, torch.Tensor):
            raise TypeError(f"class_labels must be a torch.Tensor; got {type(class_labels).__name__}")
        kind = self.config.class_embed_type
        if kind == "identity":
            if class_labels.dim() != 2 or class_labels.shape[0] not in (1, batch) \
                    or class_labels.shape[1] != self.time_embedding.linear_2.out_features:
                raise ValueError(f"class_labels for class_embed_type='identity' must have shape ({batch}, "
                                 f"{self.time_embedding.linear_2.out_features}); got {tuple(class_labels.shape)}")
            return class_labels.to(device=device, dtype=self.dtype)
        labels = timesteps_for_batch(class_labels, batch, device, "class_labels")  # (B,)
        if kind == "timestep":
            if self.config.time_embedding_type == "learned":
                check_index_range(labels, self.config.num_train_timesteps, "class label")
                labels = labels.long()
            if isinstance(self.time_proj, Timesteps):
                return embed_timesteps(self.time_proj, self.class_embedding, labels, self.dtype).to(dtype=self.dtype)
            return self.class_embedding(self.time_proj(labels).to(dtype=self.dtype)).to(dtype=self.dtype)
        if labels.is_floating_point():
            raise TypeError(f"class_labels must be integer class indices; got {labels.dtype}")
        check_index_range(labels, self.config.num_class_embeds, "class label")
        return self.class_embedding(labels.long()).to(dtype=self.dtype)

    @classmethod
    def convert_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoints of the old ``AttentionBlock`` (query/key/value/proj_attn) load under today's names."""
        return convert_legacy_attention_keys(state)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                class_labels: torch.Tensor | None = None, return_dict: bool = True) -> UNet2DOutput | tuple:
        """Predict from ``sample`` (B, in_channels, H, W) at ``timestep``; H and W divisible by 2^(levels - 1).

        ``timestep`` is a Python number, a 0-d tensor, or a (1,) or (B,) tensor; one value is
        used for the whole batch. ``class_labels`` (B,) class indices or timesteps, or
        (B, time_embed_dim) embeddings for ``class_embed_type="identity"``, is required
        exactly when the model is class-conditional. Returns :class:`UNet2DOutput` or, with
        ``return_dict=False``, the tuple ``(sample,)``.
        """
        self._check_sample(sample)
        batch = sample.shape[0]
        timesteps = timesteps_for_batch(timestep, batch, sample.device, "timestep")  # (B,)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. conditioning: emb (B, time_embed_dim)
        emb = self._time_embedding(timesteps)
        class_emb = self._class_embedding(class_labels, batch, sample.device)
        if class_emb is not None:
            emb = emb + class_emb
        emb = project_time(self, emb)  # every ResNet block's time projection in one matmul, where it can be

        # 2. down: keep every block output for the skip connections
        h = self.conv_in(sample)  # (B, C_0, H, W)
        kept: tuple[torch.Tensor, ...] = (h,)
        for block in self.down_blocks:
            h, outputs = block(h, emb)
            kept += outputs

        # 3. mid
        if self.mid_block is not None:
            h = self.mid_block(h, emb)

        # 4. up: each block takes as many kept outputs as it has resnets, last first
        for block in self.up_blocks:
            n = len(block.resnets)
            h, kept = block(h, kept[-n:], emb), kept[:-n]

        # 5. out
        h = self.conv_out(self.conv_norm_out(h))  # (B, C_out, H, W)
        if self.config.time_embedding_type == "fourier":
            h = h / timesteps.reshape(batch, 1, 1, 1)  # predict the score: divide by sigma
        if not return_dict:
            return (h,)
        return UNet2DOutput(sample=h)

    def _check_sample(self, sample: torch.Tensor) -> None:
        """ValueError/TypeError unless ``sample`` is a float (B, in_channels, H, W) tensor of a size the UNet halves."""
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"sample must be a torch.Tensor; got {type(sample).__name__}")
        if not sample.is_floating_point():
            raise TypeError(f"sample must be a floating-point tensor; got {sample.dtype}")
        in_channels = self.config.in_channels
        if sample.dim() != 4 or sample.shape[1] != in_channels:
            raise ValueError(f"sample must have shape (B, {in_channels}, H, W); got {tuple(sample.shape)}")
        if sample.shape[0] == 0:
            raise ValueError("sample has an empty batch")
        factor = 2 ** sum(block.downsamplers is not None for block in self.down_blocks)
        if sample.shape[2] % factor or sample.shape[3] % factor or sample.shape[2] == 0 or sample.shape[3] == 0:
            raise ValueError(f"sample height and width must be positive multiples of {factor} (the UNet halves them "
                             f"{factor.bit_length() - 1} times); got {tuple(sample.shape[2:])}")
