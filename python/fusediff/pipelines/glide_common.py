"""What the GLIDE pipelines share: timestep respacing, tokens, the model call of the loop, input images.

Respacing (glide-text2im's ``respace.py``, ``space_timesteps``): "100" keeps 100 of the 1000 trained
timesteps, evenly strided with rounding; "10,10,3,2,2" splits the chain in equal sections and strides
each; "fast27" is that split with timestep 999 swapped for 997; "ddimN" takes an integer stride. Its
``SpacedDiffusion`` recomputes the betas from the kept alpha-bars, beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}},
and runs the model at the original timesteps t_i. fusediff's DDPMScheduler given the kept timesteps as
custom timesteps steps t_i -> t_{i-1} with exactly that beta (``1 - alpha_prod_t / alpha_prod_t_prev``), the
same posterior mean coefficients and the same learned-range interval [log beta-tilde'_i, log beta'_i]; it
differs only where no noise is drawn (the last step, whose log-variance glide-text2im clips to step 1's)
and in precision: its alpha-bar table is float32 (diffusers'), glide-text2im's float64 rounded per use.

Tokens (glide-text2im's ``tokenizer/bpe.py``): the text lower-cased, byte-level BPE (GPT-2's), no start or
end token, cut at ``text_ctx`` (128) and padded with the last id of the vocabulary; the mask is True on
the text. transformers' ``GPT2Tokenizer`` computes the same ids when called with
``split_special_tokens=True`` (glide-text2im's encoder has no special tokens: "<|endoftext|>" in a prompt
is text).

The loop's model call (:func:`glide_prediction`): classifier-free guidance as glide-text2im's notebooks do
it, rows [cond; uncond], eps guided and the variance channels of the conditional half kept; inpainting as
its ``denoised_fn`` does it, the predicted x0 replaced by the known image where the mask keeps it, here
by rewriting eps there to eps' = (x_t - sqrt(abar_t) x_known) / sqrt(1 - abar_t), whose x0 is x_known
(up to float32 rounding), so the scheduler's fused step is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """The kept timesteps of glide-text2im's ``space_timesteps``, in descending order (a run's order)."""
    if isinstance(section_counts, int) and not isinstance(section_counts, bool):
        section_counts = str(section_counts)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return sorted(range(0, num_timesteps, stride), reverse=True)
            raise ValueError(f"cannot take exactly {desired} steps of {num_timesteps} with an integer stride")
        if section_counts == "fast27":
            steps = set(space_timesteps(num_timesteps, "10,10,3,2,2"))
            steps.remove(num_timesteps - 1)  # glide-text2im: fewer DDIM artifacts from the noisiest step
            steps.add(num_timesteps - 3)
            return sorted(steps, reverse=True)
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"timestep_respacing must be 'N', 'N,N,...', 'ddimN' or 'fast27'; got "
                             f"{section_counts!r}") from None
    counts = list(section_counts)
    if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
        raise ValueError(f"timestep_respacing sections must be positive ints; got {counts!r}")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):  # accumulated as glide-text2im does (not stride * j), for the same rounding
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept), reverse=True)


def tokens_and_mask(tokenizer: Any, texts: Sequence[str], text_ctx: int, pad_id: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, text_ctx) token ids and their mask of ``texts``, as glide-text2im's ``encode`` and
    ``padded_tokens_and_mask``; an empty text gives the unconditional tokens (all padding)."""
    rows, masks = [], []
    for text in texts:
        ids = tokenizer(text.lower(), add_special_tokens=False, split_special_tokens=True)["input_ids"] if text \
            else []
        ids = list(ids)[:text_ctx]
        rows.append(ids + [pad_id] * (text_ctx - len(ids)))
        masks.append([True] * len(ids) + [False] * (text_ctx - len(ids)))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool)


def glide_prediction(unet: Any, x: torch.Tensor, t: torch.Tensor, text_embeds: torch.Tensor,
                     text_states: torch.Tensor, conditioning: torch.Tensor | None = None,
                     known: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                     alphas_cumprod: torch.Tensor | None = None, *, guided: bool) -> torch.Tensor:
    """The UNet's [eps | v] for x at t: a loop's ``predict``.

    ``conditioning``: the channels after x (:func:`~fusediff.models.glide_unet.glide_conditioning`).
    Guided, the rows are [cond; uncond] and the uncond rows get the cond rows' variance channels, so the
    loop's guidance (cond first) leaves them unchanged. ``known``, ``keep`` (1 = known) and the scheduler's
    ``alphas_cumprod`` (on x's device): eps is rewritten where ``keep`` is 1 so that x0 = ``known`` there.
    """
    h = x if conditioning is None else torch.cat([x, conditioning], dim=1)
    out = unet(h, t, encoder_hidden_states=text_states, class_labels=text_embeds).sample
    channels = x.shape[1]
    if guided:
        cond, uncond = out.chunk(2)
        out = torch.cat([cond, torch.cat([uncond[:, :channels], cond[:, channels:]], dim=1)])
    if keep is None:
        return out
    abar = alphas_cumprod[t].to(torch.float32)
    eps_known = (x.float() - abar.sqrt() * known.float()) / (1 - abar).sqrt()
    eps = out[:, :channels] * (1 - keep) + eps_known.to(out.dtype) * keep
    return torch.cat([eps, out[:, channels:]], dim=1)


def quantize(image: torch.Tensor) -> torch.Tensor:
    """An image in [-1, 1] rounded to the 256 levels of 8 bits, as glide-text2im's notebooks round the
    64 x 64 sample before upsampling it: ((x + 1) 127.5).round() / 127.5 - 1."""
    return ((image + 1) * 127.5).round() / 127.5 - 1


def mask_tensor(mask: Any) -> torch.Tensor:
    """(B, 1, H, W) float mask, 1 = repaint: PIL images (L, > 127 is 1), arrays ((H, W), (B, H, W) or
    (B, H, W, 1)) and tensors ((H, W), (B, H, W), (B, 1, H, W)) of values in [0, 1], or lists of them."""
    masks = mask if isinstance(mask, list) else [mask]
    if not masks:
        raise TypeError("mask_image must be a PIL image, array or tensor (or a list of them); got an empty list")
    out = []
    for m in masks:
        if isinstance(m, PIL.Image.Image):
            m = torch.from_numpy((np.asarray(m.convert("L")) > 127).astype(np.float32))
        elif isinstance(m, np.ndarray):
            m = torch.from_numpy(np.ascontiguousarray(m).astype(np.float32))
        elif not isinstance(m, torch.Tensor):
            raise TypeError(f"mask_image must be a PIL image, array or tensor; got {type(m).__name__}")
        m = m.float()
        if m.dim() == 4 and m.shape[-1] == 1 and m.shape[1] != 1:
            m = m.permute(0, 3, 1, 2)
        m = m.reshape(-1, 1, *m.shape[-2:]) if m.dim() in (2, 3) else m
        if m.dim() != 4 or m.shape[1] != 1:
            raise ValueError(f"mask_image must be (H, W), (B, H, W) or (B, 1, H, W); got {tuple(m.shape)}")
        out.append(m)
    batch = torch.cat(out)
    if batch.min() < 0 or batch.max() > 1:
        raise ValueError("mask_image values must lie in [0, 1] (1 = repaint)")
    return batch
