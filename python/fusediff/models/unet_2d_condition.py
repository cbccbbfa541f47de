"""UNet2DConditionModel: the text-conditioned UNet of Stable Diffusion 1.x/2.x, LDM and DeepFloyd IF (stages I, II).

    emb    = MLP(embed(t) [+ W timestep_cond]) [+ class embedding]   (B, 4 C_0); the class embedding
             concatenated instead with class_embeddings_concat       (B, 8 C_0)
    emb    = act(emb [+ TextTimeEmbedding(c)])                       pooled text, act optional
    c      = W_hid c                                                 with encoder_hid_dim (text_proj)
    h      = conv_in(z)                                              (B, C_0, H, W)
    h, ... = down blocks (kept outputs), mid block, up blocks (concat kept outputs), each
             cross-attention block attending to the context c         c: (B, L, cross_attention_dim)
    out    = conv_out(act(GroupNorm(h)))                              (B, C_out, H, W)

The denoiser eps_theta(z_t, t, tau(y)) of latent diffusion (Rombach et al. 2022,
arXiv:2112.10752, Sec. 3.3, eq. 3): a DDPM UNet over the autoencoder's latents z whose
intermediate maps attend to the text encoding tau(y) through spatial transformers
(:mod:`fusediff.models.transformer_2d`, attention of Vaswani et al. 2017, arXiv:1706.03762).
GroupNorm(+SiLU), both attentions and the timestep embedding run through
:mod:`fusediff.kernels`; the sinusoidal embedding and its MLP run as one fused op
(``timestep_mlp``) where its kernels run, as in :class:`~fusediff.models.UNet2DModel`.

DeepFloyd IF's pixel-space UNets (an Imagen-style cascade, Saharia et al. 2022, arXiv:2205.11487,
built on GLIDE's ADM UNet, Nichol et al. 2021, arXiv:2112.10741) use the same class with other
keys: Resnet*/SimpleCrossAttn* blocks (residual resampling and added-KV attention,
:mod:`fusediff.models.unet_2d_simple_blocks`), scale-shift resnets, the T5 context projected by
``encoder_hid_proj`` and pooled into the time embedding (``addition_embed_type="text"``), and for
the super-resolution stage the noise level of the low-resolution image as ``class_labels``
embedded like a timestep (``class_embed_type="timestep"``).

The constructor takes exactly diffusers 0.42.1's ``UNet2DConditionModel`` arguments with the
same defaults, and the module tree has diffusers' parameter names, so ``config.json`` and the
weights load in either library. Odd latent sizes work as in diffusers: the up blocks are told the
size of the skip they meet (except the residual upsamplers of the Resnet*/SimpleCrossAttn* up
blocks, which double exactly: with them H and W must be multiples of 2^levels, a ValueError
otherwise, where diffusers fails inside a concatenation). Note diffusers' naming quirk, kept for
compatibility: the head count of each transformer is ``attention_head_dim`` (its head width is
channels // heads), and ``num_attention_heads`` must stay None (diffusers refuses it too).

Not supported (NotImplementedError naming the key): the SDXL/Kandinsky conditioning
(``addition_embed_type`` other than "text", ``encoder_hid_dim_type`` other than "text_proj"),
``class_embed_type`` "projection" and "simple_projection", ``cross_attention_norm="layer_norm"``,
``timestep_post_act``, dual cross-attention, GLIGEN ``attention_type``; at call time
``encoder_attention_mask``, ``cross_attention_kwargs``, ``added_cond_kwargs`` and ControlNet/T2I-Adapter
residuals. ``attention_mask`` (B, L), 1 = keep, masks the context tokens of the SimpleCrossAttn
blocks' attentions (unCLIP's decoder: the text padding), turned into diffusers' bias
(1 - m) * -10000 in the sample's dtype; with transformer (CrossAttn*) blocks it raises
NotImplementedError.
Block types: see :mod:`fusediff.models.unet_2d_condition_blocks`. Gradient checkpointing is not
implemented.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..configuration import register_to_config
from ..modeling import ModelMixin
from ..utils.outputs import BaseOutput
from .activations import get_activation, is_silu
from .attention import Attention
from .attention_added_kv import AddedKVAttention
from .attention_mask import mask_bias
from .embeddings import GaussianFourierProjection, TextTimeEmbedding, TimestepEmbedding, Timesteps, class_embedding, \
    embed_timesteps
from .normalization import GroupNorm
from .time_projections import project_time
from .transformer_2d import refuse_unsupported
from .unet_2d import UNet2DModel
from .unet_2d_checks import is_int, timesteps_for_batch
from .unet_2d_condition_blocks import MODEL, check_config, get_down_block, get_mid_block, get_up_block, per_block


@dataclasses.dataclass
class UNet2DConditionOutput(BaseOutput):
    """Output of :class:`UNet2DConditionModel`: ``sample`` of shape (B, out_channels, H, W)."""

    sample: torch.Tensor


class UNet2DConditionModel(ModelMixin):
    """A 2-D UNet mapping a noisy latent (B, C_in, H, W), timestep(s) and a context (B, L, C_ctx) to (B, C_out, H, W).

    Args (diffusers' names and defaults; the keys of
    :data:`~fusediff.models.unet_2d_condition_blocks.UNSUPPORTED` must keep the values given there):
        sample_size: nominal latent H (= W) or (H, W); recorded, not enforced.
        in_channels, out_channels: channels of the input and the output.
        center_input_sample: map the input x to 2x - 1 first.
        flip_sin_to_cos, freq_shift: sin/cos order and frequency spacing of the timestep embedding.
        down_block_types, up_block_types, mid_block_type: block names (see
            :mod:`fusediff.models.unet_2d_condition_blocks`); one down and up block per resolution.
        only_cross_attention: per block (or for all): the transformers' first attention attends to
            the context too, instead of self-attention; the simple blocks' attention attends to the
            context only.
        mid_block_only_cross_attention: ``only_cross_attention`` of the simple mid block; when None,
            ``only_cross_attention`` if that is a single bool, else False.
        block_out_channels: width at each resolution, highest resolution first.
        layers_per_block: resnets per down block, per block or for all (up blocks get one more).
        downsample_padding: padding of the stride-2 downsampling convs (0: pad bottom/right).
        mid_block_scale_factor: output scale factor of the mid block's resnets.
        dropout, act_fn: the resnets' dropout and activation (also the time MLP's and the output's).
        norm_num_groups, norm_eps: GroupNorm groups and epsilon everywhere.
        cross_attention_dim: width C_ctx of the context, per block or for all.
        transformer_layers_per_block: BasicTransformerBlocks per transformer, per block (an int or
            a list per layer) or for all; ``reverse_transformer_layers_per_block`` gives the up
            blocks' when the entries are lists.
        attention_head_dim: the transformers' HEAD COUNT, per block or for all (diffusers' quirk);
            for the simple blocks the head WIDTH (up block i takes entry i, not n - 1 - i, as in diffusers).
        encoder_hid_dim, encoder_hid_dim_type: a Linear ``encoder_hid_proj`` from the context's
            width ``encoder_hid_dim`` to ``cross_attention_dim`` (type ``"text_proj"``, also recorded
            when the type is None and the dim is set, as diffusers does).
        addition_embed_type, addition_embed_type_num_heads: ``"text"``: the context (before
            ``encoder_hid_proj``) pooled by a :class:`~fusediff.models.embeddings.TextTimeEmbedding`
            of that many heads and added to the time embedding.
        cross_attention_norm: None or ``"group_norm"``: the simple blocks' attention normalises the
            context first (32 groups).
        resnet_skip_time_act: the Resnet*/SimpleCrossAttn* blocks' resnets project the embedding
            without applying the activation first.
        resnet_out_scale_factor: divides the outputs of the Resnet*/SimpleCrossAttn* down and up
            blocks' resnets.
        class_embeddings_concat: concatenate the class embedding to the time embedding instead of
            adding it (the blocks then take an embedding twice as wide).
        use_linear_projection: Linear instead of 1x1 conv projections in the transformers (SD 2.x).
        upcast_attention: diffusers' fp32-attention flag; fusediff's kernel always computes in fp32.
        class_embed_type, num_class_embeds: None (a table of ``num_class_embeds`` vectors, if set),
            ``"timestep"`` (labels embedded like timesteps) or ``"identity"`` (labels are
            (B, time_embed_dim) embeddings); summed with the time embedding.
        resnet_time_scale_shift: ``"default"`` or ``"scale_shift"`` time conditioning.
        time_embedding_type: ``"positional"`` (sinusoidal) or ``"fourier"`` (Gaussian Fourier features).
        time_embedding_dim: width of the time embedding; 4 C_0 (positional) or 2 C_0 (fourier) when None.
        time_embedding_act_fn: an activation applied once to the summed embedding.
        time_cond_proj_dim: width of ``timestep_cond``, projected and added to embed(t) (LCM).
        conv_in_kernel, conv_out_kernel: odd kernel sizes of the first and last convs.
        projection_class_embeddings_input_dim, addition_time_embed_dim: used only by embeddings
            fusediff does not have; recorded (diffusers ignores them too without those embeddings).
    """

    @register_to_config
    def __init__(self, sample_size: int | tuple[int, int] | None = None, in_channels: int = 4, out_channels: int = 4,
                 center_input_sample: bool = False, flip_sin_to_cos: bool = True, freq_shift: int = 0,
                 down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                      "CrossAttnDownBlock2D", "DownBlock2D"),
                 mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
                 up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                    "CrossAttnUpBlock2D"),
                 only_cross_attention: bool | tuple[bool] = False,
                 block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280), layers_per_block: int | tuple[int] = 2,
                 downsample_padding: int = 1, mid_block_scale_factor: float = 1, dropout: float = 0.0,
                 act_fn: str = "silu", norm_num_groups: int | None = 32, norm_eps: float = 1e-5,
                 cross_attention_dim: int | tuple[int] = 1280,
                 transformer_layers_per_block: int | tuple[int] | tuple[tuple] = 1,
                 reverse_transformer_layers_per_block: tuple[tuple[int]] | None = None,
                 encoder_hid_dim: int | None = None, encoder_hid_dim_type: str | None = None,
                 attention_head_dim: int | tuple[int] = 8, num_attention_heads: int | tuple[int] | None = None,
                 dual_cross_attention: bool = False, use_linear_projection: bool = False,
                 class_embed_type: str | None = None, addition_embed_type: str | None = None,
                 addition_time_embed_dim: int | None = None, num_class_embeds: int | None = None,
                 upcast_attention: bool = False, resnet_time_scale_shift: str = "default",
                 resnet_skip_time_act: bool = False, resnet_out_scale_factor: float = 1.0,
                 time_embedding_type: str = "positional", time_embedding_dim: int | None = None,
                 time_embedding_act_fn: str | None = None, timestep_post_act: str | None = None,
                 time_cond_proj_dim: int | None = None, conv_in_kernel: int = 3, conv_out_kernel: int = 3,
                 projection_class_embeddings_input_dim: int | None = None, attention_type: str = "default",
                 class_embeddings_concat: bool = False, mid_block_only_cross_attention: bool | None = None,
                 cross_attention_norm: str | None = None, addition_embed_type_num_heads: int = 64) -> None:
        super().__init__()
        check_config(self.config)
        if encoder_hid_dim_type is None and encoder_hid_dim is not None:  # diffusers records the type it implies
            encoder_hid_dim_type = "text_proj"
            self.register_to_config(encoder_hid_dim_type=encoder_hid_dim_type)
        if mid_block_only_cross_attention is None:
            mid_block_only_cross_attention = only_cross_attention if isinstance(only_cross_attention, bool) else False
        self.sample_size = sample_size
        channels = list(block_out_channels)
        n = len(channels)
        each = {key: per_block(self.config, key, n)  # one value per block
                for key in ("only_cross_attention", "layers_per_block", "attention_head_dim", "cross_attention_dim",
                            "transformer_layers_per_block")}

        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=conv_in_kernel,
                                 padding=(conv_in_kernel - 1) // 2)

        # time: t -> (B, timestep_input_dim) -> MLP -> (B, time_embed_dim)
        if time_embedding_type == "fourier":
            time_embed_dim = time_embedding_dim or 2 * channels[0]
            if time_embed_dim % 2:
                raise ValueError(f"time_embedding_dim must be even for fourier embeddings; got {time_embed_dim}")
            self.time_proj = GaussianFourierProjection(time_embed_dim // 2, log=False, flip_sin_to_cos=flip_sin_to_cos)
            timestep_input_dim = time_embed_dim
        else:
            time_embed_dim = time_embedding_dim or 4 * channels[0]
            self.time_proj = Timesteps(channels[0], flip_sin_to_cos, freq_shift)
            timestep_input_dim = channels[0]
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim, act_fn,
                                                           cond_proj_dim=time_cond_proj_dim)

        # the context (B, L, encoder_hid_dim) -> (B, L, cross_attention_dim) before the blocks see it
        self.encoder_hid_proj = None if encoder_hid_dim is None else nn.Linear(encoder_hid_dim, cross_attention_dim)
        self.class_embedding = class_embedding(class_embed_type, num_class_embeds, timestep_input_dim,
                                               time_embed_dim, act_fn)  # summed with (or concatenated to) emb
        if addition_embed_type == "text":  # pools the context as given, before encoder_hid_proj
            self.add_embedding = TextTimeEmbedding(encoder_hid_dim or cross_attention_dim, time_embed_dim,
                                                   num_heads=addition_embed_type_num_heads)
        else:
            self.add_embedding = None
        self.time_embed_act = None if time_embedding_act_fn is None else get_activation(time_embedding_act_fn)

        blocks_time_embed_dim = 2 * time_embed_dim if class_embeddings_concat else time_embed_dim
        resnet = dict(temb_channels=blocks_time_embed_dim, resnet_eps=norm_eps, resnet_act_fn=act_fn,
                      resnet_groups=norm_num_groups, resnet_time_scale_shift=resnet_time_scale_shift, dropout=dropout,
                      resnet_skip_time_act=resnet_skip_time_act)
        adm = dict(resnet_out_scale_factor=resnet_out_scale_factor, cross_attention_norm=cross_attention_norm)
        transformer = dict(use_linear_projection=use_linear_projection, upcast_attention=upcast_attention)

        def at(i: int) -> dict:  # block i's transformer arguments, from the per-block lists
            return dict(transformer, num_attention_heads=each["attention_head_dim"][i],
                        cross_attention_dim=each["cross_attention_dim"][i])

        # down block i: channels[i - 1] -> channels[i], then halve (all but the last)
        self.down_blocks = nn.ModuleList([get_down_block(
            block_type, num_layers=each["layers_per_block"][i], in_channels=channels[max(i - 1, 0)],
            out_channels=channels[i], add_downsample=i < n - 1, downsample_padding=downsample_padding,
            transformer_layers_per_block=each["transformer_layers_per_block"][i],
            only_cross_attention=each["only_cross_attention"][i], attention_head_dim=each["attention_head_dim"][i],
            **at(i), **resnet, **adm)
            for i, block_type in enumerate(down_block_types)])
        self.up_blocks = nn.ModuleList()  # registered before mid_block: diffusers' state-dict key order

        depth = each["transformer_layers_per_block"][-1]
        self.mid_block = get_mid_block(
            mid_block_type, in_channels=channels[-1], output_scale_factor=mid_block_scale_factor,
            transformer_layers_per_block=depth if is_int(depth) else depth[0], **at(-1), **resnet,
            cross_attention_norm=cross_attention_norm, attention_head_dim=each["attention_head_dim"][-1],
            only_cross_attention=mid_block_only_cross_attention)

        # up block i mirrors down block j = n - 1 - i: channels[j + 1] (+ skips) -> channels[j], then double
        reversed_depths = reverse_transformer_layers_per_block or each["transformer_layers_per_block"][::-1]
        self.num_upsamplers = n - 1
        for i, block_type in enumerate(up_block_types):
            j = n - 1 - i
            self.up_blocks.append(get_up_block(
                block_type, num_layers=each["layers_per_block"][j] + 1, in_channels=channels[max(j - 1, 0)],
                out_channels=channels[j], prev_output_channel=channels[min(j + 1, n - 1)], add_upsample=i < n - 1,
                transformer_layers_per_block=reversed_depths[i], only_cross_attention=each["only_cross_attention"][j],
                attention_head_dim=each["attention_head_dim"][i],  # entry i, unreversed: diffusers' indexing
                **at(j), **resnet, **adm))

        # out: GroupNorm and the activation (one op when it is SiLU), then the last conv
        fused = is_silu(act_fn)
        self.conv_norm_out = GroupNorm(norm_num_groups, channels[0], eps=norm_eps, activation="silu" if fused else None)
        self.conv_act = None if fused else get_activation(act_fn)
        self.conv_out = nn.Conv2d(channels[0], out_channels, kernel_size=conv_out_kernel,
                                  padding=(conv_out_kernel - 1) // 2)
        # the context width(s) the model takes (one, unless the per-block dims differ): encoder_hid_dim, else
        # those the cross-attentions and the pooled text embedding project from
        widths = {m.cross_attention_dim for m in self.modules() if isinstance(m, Attention) and m.is_cross_attention}
        widths |= {m.added_kv_proj_dim for m in self.modules() if isinstance(m, AddedKVAttention)}
        if self.add_embedding is not None:
            widths.add(self.add_embedding.encoder_dim)
        self._context_widths = (encoder_hid_dim,) if encoder_hid_dim is not None else tuple(sorted(widths))

    # the class-label embedding is UNet2DModel's (table, "timestep" or "identity")
    _class_embedding = UNet2DModel._class_embedding

    def _time_embedding(self, timesteps: torch.Tensor, timestep_cond: torch.Tensor | None) -> torch.Tensor:
        """(B,) timesteps [and (B, time_cond_proj_dim) condition] -> (B, time_embed_dim) in the model's dtype."""
        if timestep_cond is None and isinstance(self.time_proj, Timesteps):  # one fused op where the kernels run
            return embed_timesteps(self.time_proj, self.time_embedding, timesteps, self.dtype)
        if timestep_cond is not None:
            timestep_cond = timestep_cond.to(dtype=self.dtype)
        return self.time_embedding(self.time_proj(timesteps).to(dtype=self.dtype), timestep_cond)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, encoder_hidden_states: torch.Tensor,
                class_labels: torch.Tensor | None = None, timestep_cond: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cross_attention_kwargs: dict[str, Any] | None = None,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None,
                down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
                encoder_attention_mask: torch.Tensor | None = None,
                return_dict: bool = True) -> UNet2DConditionOutput | tuple:
        """Predict from ``sample`` (B, in_channels, H, W) at ``timestep`` given ``encoder_hidden_states`` (B, L, C_ctx).

        ``timestep`` is a Python number, a 0-d tensor, or a (1,) or (B,) tensor. H and W may be
        any size (odd ones included). ``class_labels`` is required exactly when the model is
        class-conditional; ``timestep_cond`` (B, time_cond_proj_dim) only with ``time_cond_proj_dim``.
        ``attention_mask`` (B, L) keeps (1) or masks (0) context tokens of the SimpleCrossAttn blocks;
        ``encoder_attention_mask``, ``cross_attention_kwargs``, ``added_cond_kwargs`` and the
        ControlNet/adapter residuals must be None (or empty). Returns :class:`UNet2DConditionOutput` or, with
        ``return_dict=False``, ``(sample,)``.
        """
        refuse_unsupported(MODEL, encoder_attention_mask=encoder_attention_mask,
                           cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs,
                           down_block_additional_residuals=down_block_additional_residuals,
                           mid_block_additional_residual=mid_block_additional_residual,
                           down_intrablock_additional_residuals=down_intrablock_additional_residuals)
        self._check_inputs(sample, encoder_hidden_states, timestep_cond)
        batch = sample.shape[0]
        timesteps = timesteps_for_batch(timestep, batch, sample.device, "timestep")  # (B,)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. conditioning: emb (B, time_embed_dim); the context goes to the cross-attention blocks
        emb = self._time_embedding(timesteps, timestep_cond)
        class_emb = self._class_embedding(class_labels, batch, sample.device)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if self.config.class_embeddings_concat else emb + class_emb
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(encoder_hidden_states)  # (B, time_embed_dim)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        if self.encoder_hid_proj is not None:
            encoder_hidden_states = self.encoder_hid_proj(encoder_hidden_states)  # (B, L, cross_attention_dim)
        context = {"encoder_hidden_states": encoder_hidden_states}
        if attention_mask is not None:
            context["attention_mask"] = self._context_bias(attention_mask, sample.dtype)
        emb = project_time(self, emb)  # every ResNet block's time projection in one matmul, where it can be

        def cond(block: nn.Module) -> dict:
            return context if getattr(block, "has_cross_attention", False) else {}

        # 2. down: keep every block output for the skip connections
        h = self.conv_in(sample)  # (B, C_0, H, W)
        kept: tuple[torch.Tensor, ...] = (h,)
        for block in self.down_blocks:
            h, outputs = block(h, emb, **cond(block))
            kept += outputs

        # 3. mid
        if self.mid_block is not None:
            h = self.mid_block(h, emb, **cond(self.mid_block))

        # 4. up: each block takes as many kept outputs as it has resnets, last first; with sizes that
        #    do not halve evenly, each upsampler is told the size of the skip it will meet next
        odd = any(size % 2 ** self.num_upsamplers for size in sample.shape[-2:])
        for block in self.up_blocks:
            n = len(block.resnets)
            skips, kept = kept[-n:], kept[:-n]
            upsample_size = tuple(kept[-1].shape[2:]) if odd and block.upsamplers is not None else None
            h = block(h, skips, emb, upsample_size, **cond(block))

        # 5. out
        h = self.conv_norm_out(h)
        if self.conv_act is not None:
            h = self.conv_act(h)
        h = self.conv_out(h)  # (B, C_out, H, W)
        if not return_dict:
            return (h,)
        return UNet2DConditionOutput(sample=h)

    def _context_bias(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """diffusers' (B, 1, L) bias of a keep-mask; NotImplementedError unless every cross-attention block takes it."""
        blocks = [*self.down_blocks, *([self.mid_block] if self.mid_block is not None else []), *self.up_blocks]
        refused = sorted({type(b).__name__ for b in blocks
                          if getattr(b, "has_cross_attention", False) and not getattr(b, "takes_attention_mask", False)})
        if refused:
            raise NotImplementedError(f"{MODEL}: attention_mask is supported by the SimpleCrossAttn blocks only, "
                                      f"not by {', '.join(refused)}; pass None")
        return mask_bias(attention_mask, dtype).unsqueeze(1)

    def _check_inputs(self, sample: torch.Tensor, context: torch.Tensor, timestep_cond: torch.Tensor | None) -> None:
        """TypeError/ValueError naming the argument unless the inputs have the shapes this model takes."""
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
            got = sample.dtype if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise TypeError(f"sample must be a floating-point torch.Tensor; got {got}")
        shape = tuple(sample.shape)
        if len(shape) != 4 or shape[1] != self.config.in_channels or 0 in shape:
            raise ValueError(f"sample must have shape (B, {self.config.in_channels}, H, W), none of them 0; "
                             f"got {shape}")
        factor = 2 ** self.num_upsamplers
        if any(size % factor for size in shape[2:]) and any(getattr(block, "upsample_type", None) == "resnet"
                                                            for block in self.up_blocks):
            raise ValueError(f"sample H and W must be multiples of {factor}: the residual upsamplers of the "
                             f"Resnet*/SimpleCrossAttn* up blocks double exactly; got {shape[2:]}")
        widths = self._context_widths
        if widths and not (isinstance(context, torch.Tensor) and context.dim() == 3 and context.shape[0] == shape[0]
                           and (context.shape[2],) == widths and context.dtype == sample.dtype):
            got = (tuple(context.shape), context.dtype) if isinstance(context, torch.Tensor) else type(context)
            raise ValueError(f"encoder_hidden_states must be a ({shape[0]}, L, {'|'.join(map(str, widths))}) "
                             f"tensor of the sample's dtype {sample.dtype}; got {got}")
        cond_dim = self.config.time_cond_proj_dim
        if timestep_cond is None and cond_dim is None:
            return
        if cond_dim is None or not isinstance(timestep_cond, torch.Tensor) \
                or tuple(timestep_cond.shape) not in ((shape[0], cond_dim), (1, cond_dim)):
            got = tuple(timestep_cond.shape) if isinstance(timestep_cond, torch.Tensor) else timestep_cond
            raise ValueError(f"timestep_cond must be a ({shape[0]}, time_cond_proj_dim) tensor exactly when "
                             f"time_cond_proj_dim is set (it is {cond_dim}); got {got}")
