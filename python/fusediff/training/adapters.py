"""Adapters: a UNet as a training model ``model(sample, timestep, **cond) -> tensor``, its conditioning,
and classifier-free guidance, as stackable nn.Modules.

- :class:`UNetAdapter`: any diffusers-style UNet (``.sample`` output) as a plain-tensor model.
- :class:`ClassConditioning`: a class-conditional UNet2DModel (``num_class_embeds = num_classes + 1``), with
  label ``num_classes`` as the unconditional ("null") class.
- :class:`TextConditioning`: a cross-attention UNet fed ``encoder_hidden_states``, or ``input_ids`` through a
  (by default frozen) text encoder.
- :class:`ClassifierFreeGuidance`: wraps one of the above. In training it replaces each item's condition by
  the null one with probability ``drop_prob``; in evaluation it returns
  eps_u + s (eps_c - eps_u) from one batched call on [cond, null] (Ho & Salimans 2022, eq. 6 and alg. 1).

Limits: guidance combines the raw model outputs (any prediction type) with one scale for the whole batch;
no guidance rescale (Lin et al. 2024) and no negative prompts other than a fixed null condition.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..sampling import combine
from .losses import draw


def _plain(output: Any) -> torch.Tensor:
    """The tensor of a UNet's output: ``.sample``, the first entry of a tuple, or the tensor itself."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the wrapped model returned {type(output).__name__}; expected a tensor or an output with .sample")


def _hidden_states(output: Any) -> torch.Tensor:
    """A text encoder's hidden states: the tensor, ``last_hidden_state`` (transformers), or the first entry."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(getattr(output, "last_hidden_state", None), torch.Tensor):
        return output.last_hidden_state
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the text encoder returned {type(output).__name__}; expected a tensor, a tuple, or an "
                    "output with last_hidden_state")


class UNetAdapter(nn.Module):
    """A diffusers-style UNet called as ``model(sample, timestep, **cond)`` returning a plain tensor.

    Condition keywords (``class_labels``, ``encoder_hidden_states``, ...) are passed through when not None.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        if not isinstance(unet, nn.Module):
            raise TypeError(f"unet must be an nn.Module; got {type(unet).__name__}")
        self.unet = unet
        try:
            params = inspect.signature(unet.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self._return_dict = "return_dict" in params  # ask for a tuple: no output dataclass in compiled graphs

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        kwargs = {k: v for k, v in cond.items() if v is not None}
        if self._return_dict:
            kwargs["return_dict"] = False
        return _plain(self.unet(sample, timestep, **kwargs))


class ClassConditioning(UNetAdapter):
    """A UNet2DModel built with ``num_class_embeds = num_classes + 1``, conditioned on ``class_labels``.

    Labels 0 .. num_classes-1 are the classes; label ``num_classes`` is the null class that classifier-free
    guidance trains and samples as "unconditional". Without ``class_labels`` every item gets the null class.
    """

    def __init__(self, unet: nn.Module, num_classes: int) -> None:
        super().__init__(unet)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
        config = getattr(unet, "config", None)
        embeds = getattr(config, "num_class_embeds", None) if config is not None else None
        if config is not None and embeds != num_classes + 1:
            raise ValueError(f"ClassConditioning with num_classes={num_classes} needs a UNet built with "
                             f"num_class_embeds={num_classes + 1} (the classes and a null class); got {embeds!r}")
        self.num_classes = num_classes

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"

    def null_cond(self) -> dict[str, Any]:
        """The unconditional condition: the null label."""
        return {"class_labels": self.num_classes}

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None,
                **cond: Any) -> torch.Tensor:
        if class_labels is None:
            class_labels = torch.full((sample.shape[0],), self.num_classes, dtype=torch.long, device=sample.device)
        return super().forward(sample, timestep, class_labels=class_labels, **cond)


class TextConditioning(UNetAdapter):
    """A cross-attention UNet (UNet2DConditionModel) conditioned on text.

    Args:
        unet: the UNet; called with ``encoder_hidden_states`` (B, S, D).
        text_encoder: optional module mapping ``input_ids`` (B, S) to hidden states (its ``last_hidden_state``, as
            CLIPTextModel's, or its first output); then ``input_ids`` is accepted as the condition.
        train_text_encoder: train the text encoder too; by default it is frozen (no gradients, eval mode,
            run under ``torch.no_grad``).
        null_embedding: (S, D) or (1, S, D) hidden states of the empty condition (e.g. the encoded empty
            prompt); None means zeros.
        null_input_ids: (S,) token ids of the empty prompt; with a text encoder, the null condition is then
            given as ids rather than as an embedding.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None, train_text_encoder: bool = False,
                 null_embedding: torch.Tensor | None = None, null_input_ids: torch.Tensor | None = None) -> None:
        super().__init__(unet)
        if text_encoder is not None and not isinstance(text_encoder, nn.Module):
            raise TypeError(f"text_encoder must be an nn.Module or None; got {type(text_encoder).__name__}")
        if null_input_ids is not None and text_encoder is None:
            raise ValueError("null_input_ids needs a text_encoder to encode them")
        for name, value in (("null_embedding", null_embedding), ("null_input_ids", null_input_ids)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a tensor or None; got {type(value).__name__}")
        if null_embedding is not None and null_embedding.dim() not in (2, 3):
            raise ValueError(f"null_embedding must be (S, D) or (1, S, D); got shape {tuple(null_embedding.shape)}")
        self.text_encoder = text_encoder
        self.train_text_encoder = bool(train_text_encoder)
        if text_encoder is not None and not self.train_text_encoder:
            text_encoder.requires_grad_(False)
            text_encoder.eval()
        self.register_buffer("null_embedding", null_embedding, persistent=False)
        self.register_buffer("null_input_ids", null_input_ids, persistent=False)

    def train(self, mode: bool = True) -> TextConditioning:
        super().train(mode)
        if self.text_encoder is not None and not self.train_text_encoder:
            self.text_encoder.eval()  # a frozen encoder stays in eval mode (no dropout)
        return self

    def null_cond(self) -> dict[str, Any]:
        """The unconditional condition: the null ids with a text encoder that has them, else the null
        embedding (None: zeros of the condition's shape)."""
        if self.text_encoder is not None and self.null_input_ids is not None:
            return {"input_ids": self.null_input_ids}
        return {"encoder_hidden_states": self.null_embedding}

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, S, D) of ``input_ids`` (B, S) from the text encoder."""
        if self.text_encoder is None:
            raise ValueError("input_ids given, but this TextConditioning has no text_encoder; pass "
                             "encoder_hidden_states instead")
        if self.train_text_encoder:
            return _hidden_states(self.text_encoder(input_ids))
        with torch.no_grad():
            return _hidden_states(self.text_encoder(input_ids))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None, **cond: Any) -> torch.Tensor:
        if input_ids is not None:
            if encoder_hidden_states is not None:
                raise ValueError("pass encoder_hidden_states or input_ids, not both")
            encoder_hidden_states = self.encode(input_ids)
        elif encoder_hidden_states is None:
            if self.null_embedding is None:
                raise ValueError("TextConditioning needs encoder_hidden_states or input_ids (or a null_embedding "
                                 "for unconditional calls)")
            null = self.null_embedding if self.null_embedding.dim() == 3 else self.null_embedding[None]
            encoder_hidden_states = null.to(sample.device).expand(sample.shape[0], *null.shape[1:])
        return super().forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, **cond)


def _null_like(value: Any, like: torch.Tensor) -> torch.Tensor:
    """The null condition ``value`` (None: zeros; a number; or a tensor without or with a size-1 batch
    dimension) as a tensor of ``like``'s shape, dtype and device."""
    if value is None:
        return torch.zeros_like(like)
    if isinstance(value, (bool, int, float)):  # a fill on the device: no host-to-device copy (CUDA graphs)
        return torch.full_like(like, value)
    null = torch.as_tensor(value, device=like.device)
    null = null.to(like.dtype) if null.dtype != like.dtype else null
    while null.dim() < like.dim():
        null = null[None]
    return null.expand_as(like)


class ClassifierFreeGuidance(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022) around a conditional model.

    Args:
        model: a conditioning adapter (:class:`ClassConditioning`, :class:`TextConditioning`) or any model
            taking the condition keywords.
        drop_prob: training only: the probability that an item's condition is replaced by the null one.
        guidance_scale: evaluation only: s in eps_u + s (eps_c - eps_u); 1 is a plain conditional call.
        null_cond: the null condition, ``{key: value}`` (value None means zeros); default ``model.null_cond()``.

    The model's forward takes ``generator=`` (keyword) for the training drops; the Sampler passes its
    own (``uses_generator``).
    """

    uses_generator = True

    def __init__(self, model: nn.Module, drop_prob: float = 0.1, guidance_scale: float = 1.0,
                 null_cond: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        if isinstance(drop_prob, bool) or not isinstance(drop_prob, (int, float)) or not 0 <= drop_prob <= 1:
            raise ValueError(f"drop_prob must be a number in [0, 1]; got {drop_prob!r}")
        if null_cond is None:
            if not hasattr(model, "null_cond"):
                raise ValueError(f"{type(model).__name__} has no null_cond(); pass null_cond={{key: value}}")
            null_cond = model.null_cond()
        if not isinstance(null_cond, Mapping) or not null_cond:
            raise ValueError(f"null_cond must be a non-empty mapping of condition keys; got {null_cond!r}")
        self.model = model
        self.drop_prob = float(drop_prob)
        self.guidance_scale = guidance_scale
        self.null_cond = dict(null_cond)

    @property
    def guidance_scale(self) -> float:
        """s, the guidance scale used in evaluation mode."""
        return self._guidance_scale

    @guidance_scale.setter
    def guidance_scale(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"guidance_scale must be a number; got {value!r}")
        self._guidance_scale = float(value)

    @property
    def unet(self) -> nn.Module:
        """The wrapped model's UNet."""
        return self.model.unet

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, guidance_scale={self.guidance_scale}, null_keys={list(self.null_cond)}"

    def _check_keys(self, cond: Mapping[str, Any]) -> None:
        if not any(cond.get(k) is not None for k in self.null_cond):
            raise ValueError(f"classifier-free guidance needs the condition {' or '.join(self.null_cond)}; "
                             f"got keys {sorted(cond)}")

    def drop(self, cond: Mapping[str, Any], batch: int, device: torch.device,
             generator: torch.Generator | None = None) -> dict[str, Any]:
        """``cond`` with each item's condition replaced by the null one with probability ``drop_prob``
        (one uniform draw per item, shared by all condition keys)."""
        self._check_keys(cond)
        keep = draw((batch,), device, generator) >= self.drop_prob  # (B,)
        out = dict(cond)
        for key, value in self.null_cond.items():
            current = cond.get(key)
            if current is None:
                continue
            mask = keep.reshape((batch,) + (1,) * (current.dim() - 1))
            out[key] = torch.where(mask, current, _null_like(value, current))
        return out

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, generator: torch.Generator | None = None,
                **cond: Any) -> torch.Tensor:
        if self.training:
            if self.drop_prob > 0:
                cond = self.drop(cond, sample.shape[0], sample.device, generator)
            return self.model(sample, timestep, **cond)
        s = self.guidance_scale
        if s == 1.0:
            return self.model(sample, timestep, **cond)
        self._check_keys(cond)
        # 1. one call on [cond, null]: the batch twice, the null condition in the second half
        both: dict[str, Any] = {}
        for key, value in cond.items():
            if key in self.null_cond and value is not None:
                both[key] = torch.cat([value, _null_like(self.null_cond[key], value)])
            elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == sample.shape[0]:
                both[key] = torch.cat([value, value])
            else:
                both[key] = value
        t = timestep
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == sample.shape[0] and t.shape[0] > 1:
            t = torch.cat([t, t])
        out = self.model(torch.cat([sample, sample]), t, **both)
        # 2. eps_u + s (eps_c - eps_u)
        out_c, out_u = out.chunk(2)
        return combine(out_u, out_c, s)
