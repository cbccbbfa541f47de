"""EMAModel: an exponential moving average of a model's parameters, with diffusers' decay schedule.

After optimisation step n (counted from 1), with k = n - update_after_step - 1:
    decay_n = 0                                    if k <= 0 (the shadow copies the weights)
    decay_n = min(decay, (1 + k) / (10 + k))       without warmup
    decay_n = min(decay, 1 - (1 + k / inv_gamma)^-power)   with warmup (Karras et al.'s EMA warmup)
and then max(decay_n, min_decay); each trainable parameter's shadow moves as
    shadow <- shadow - (1 - decay_n) (shadow - param)
and a frozen parameter's shadow is copied from it. These are the semantics of
``diffusers.training_utils.EMAModel``, whose ``state_dict`` keys this class reads and writes.

Limits: the shadows live on one device per parameter as given (move them with ``.to``); ``state_dict``
holds references to the shadow tensors, as diffusers' does; no DeepSpeed ZeRO-3 gathering.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

_NUMBERS = {"decay": (int, float), "min_decay": (int, float), "inv_gamma": (int, float), "power": (int, float),
            "optimization_step": (int,), "update_after_step": (int,), "use_ema_warmup": (bool,)}


class EMAModel:
    """Shadow copies of ``parameters`` that follow them as an exponential moving average.

    Args:
        parameters: the parameters to average (``model.parameters()``).
        decay: the largest decay.
        min_decay: the smallest decay once averaging started.
        update_after_step: steps that copy the weights before averaging starts.
        use_ema_warmup: the warmup schedule 1 - (1 + k / inv_gamma)^-power instead of (1 + k) / (10 + k).
        inv_gamma, power: the warmup's parameters.
        shadow_dtype: the shadows' floating dtype (e.g. torch.float32 to average bf16 weights in fp32);
            None keeps each parameter's dtype.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float = 0.9999, min_decay: float = 0.0,
                 update_after_step: int = 0, use_ema_warmup: bool = False, inv_gamma: float = 1.0,
                 power: float = 2 / 3, shadow_dtype: torch.dtype | None = None) -> None:
        if isinstance(parameters, torch.nn.Module):
            raise TypeError("pass model.parameters(), not the module")
        parameters = list(parameters)
        if not all(isinstance(p, torch.Tensor) for p in parameters):
            raise TypeError("parameters must be tensors (model.parameters())")
        if shadow_dtype is not None and not (isinstance(shadow_dtype, torch.dtype) and shadow_dtype.is_floating_point):
            raise TypeError(f"shadow_dtype must be a floating torch.dtype or None; got {shadow_dtype!r}")
        self.shadow_params = [self._shadow_of(p, shadow_dtype) for p in parameters]
        self.shadow_dtype = shadow_dtype
        self._set_hyper(decay=decay, min_decay=min_decay, update_after_step=update_after_step,
                        use_ema_warmup=use_ema_warmup, inv_gamma=inv_gamma, power=power)
        self.optimization_step = 0
        self.cur_decay_value: float | None = None
        self.temp_stored_params: list[torch.Tensor] | None = None

    @staticmethod
    def _shadow_of(p: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        p = p.detach()
        if dtype is not None and p.is_floating_point():
            return p.to(dtype=dtype, copy=True)
        return p.clone()

    def _set_hyper(self, **values: Any) -> None:
        for name, value in values.items():
            kinds = _NUMBERS[name]
            if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
                raise ValueError(f"EMAModel: {name} must be {' or '.join(k.__name__ for k in kinds)}; got {value!r}")
        if "decay" in values and not 0.0 <= values["decay"] <= 1.0:
            raise ValueError(f"EMAModel: decay must lie in [0, 1]; got {values['decay']!r}")
        if "min_decay" in values and not 0.0 <= values["min_decay"] <= 1.0:
            raise ValueError(f"EMAModel: min_decay must lie in [0, 1]; got {values['min_decay']!r}")
        if values.get("update_after_step", 0) < 0 or values.get("optimization_step", 0) < 0:
            raise ValueError("EMAModel: update_after_step and optimization_step must be non-negative")
        if "inv_gamma" in values and not values["inv_gamma"] > 0:
            raise ValueError(f"EMAModel: inv_gamma must be positive; got {values['inv_gamma']!r}")
        for name, value in values.items():
            setattr(self, name, value)

    def get_decay(self, optimization_step: int) -> float:
        """decay_n after optimisation step ``optimization_step`` (see the module docstring)."""
        k = max(0, optimization_step - self.update_after_step - 1)
        if k <= 0:
            return 0.0
        if self.use_ema_warmup:
            value = 1 - (1 + k / self.inv_gamma) ** -self.power
        else:
            value = (1 + k) / (10 + k)
        return max(min(value, self.decay), self.min_decay)

    def _check(self, parameters: list[torch.Tensor]) -> None:
        if len(parameters) != len(self.shadow_params):
            raise ValueError(f"EMAModel tracks {len(self.shadow_params)} parameters; got {len(parameters)}")

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """One averaging step after an optimisation step: shadow <- shadow - (1 - decay_n) (shadow - param)."""
        parameters = list(parameters)
        self._check(parameters)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        trained = [(s, p) for s, p in zip(self.shadow_params, parameters) if p.requires_grad]
        for s, p in zip(self.shadow_params, parameters):
            if not p.requires_grad:
                s.copy_(p)
        if trained:
            shadows = [s for s, _ in trained]
            params = [p.to(s.dtype) for s, p in trained]
            diffs = torch._foreach_sub(shadows, params)  # shadow - param
            torch._foreach_sub_(shadows, diffs, alpha=1 - decay)

    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Write the averages into ``parameters`` (in their dtype and device)."""
        parameters = list(parameters)
        self._check(parameters)
        with torch.no_grad():
            for s, p in zip(self.shadow_params, parameters):
                p.copy_(s)

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Keep a CPU copy of ``parameters`` for :meth:`restore` (e.g. around evaluating the averages)."""
        self.temp_stored_params = [p.detach().cpu().clone() for p in parameters]

    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Put back the parameters kept by :meth:`store`, then forget them."""
        if self.temp_stored_params is None:
            raise RuntimeError("EMAModel.restore: nothing stored; call store(parameters) first")
        parameters = list(parameters)
        if len(parameters) != len(self.temp_stored_params):
            raise ValueError(f"EMAModel.restore: {len(self.temp_stored_params)} stored; got {len(parameters)}")
        with torch.no_grad():
            for c, p in zip(self.temp_stored_params, parameters):
                p.copy_(c)
        self.temp_stored_params = None

    @contextlib.contextmanager
    def average_parameters(self, parameters: Iterable[torch.nn.Parameter]) -> Iterator[None]:
        """Within the block, ``parameters`` hold the averages; their values are restored afterwards."""
        parameters = list(parameters)
        self.store(parameters)
        self.copy_to(parameters)
        try:
            yield
        finally:
            self.restore(parameters)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> EMAModel:
        """Move the shadows to ``device`` (and floating ones to ``dtype``); returns self."""
        self.shadow_params = [
            s.to(device=device, dtype=dtype, non_blocking=non_blocking) if s.is_floating_point()
            else s.to(device=device, non_blocking=non_blocking) for s in self.shadow_params]
        if dtype is not None:
            self.shadow_dtype = dtype
        return self

    def state_dict(self) -> dict[str, Any]:
        """diffusers' EMA state: the hyper-parameters, ``optimization_step`` and ``shadow_params`` (a list
        of tensors); numbers and tensors only, so ``torch.load(weights_only=True)`` reads it."""
        return {"decay": self.decay, "min_decay": self.min_decay, "optimization_step": self.optimization_step,
                "update_after_step": self.update_after_step, "use_ema_warmup": self.use_ema_warmup,
                "inv_gamma": self.inv_gamma, "power": self.power, "shadow_params": self.shadow_params}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (fusediff's or diffusers'). Shadows are copied into the current ones
        (keeping their device and dtype); a count or shape mismatch is a ValueError."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict; got {type(state_dict).__name__}")
        values = {k: state_dict[k] for k in _NUMBERS if k in state_dict}
        shadows = state_dict.get("shadow_params")
        if shadows is not None:
            if not isinstance(shadows, (list, tuple)) or not all(isinstance(s, torch.Tensor) for s in shadows):
                raise ValueError("state_dict['shadow_params'] must be a list of tensors")
            if len(shadows) != len(self.shadow_params):
                raise ValueError(f"state_dict holds {len(shadows)} shadow params; this EMAModel tracks "
                                 f"{len(self.shadow_params)}")
            for i, (new, old) in enumerate(zip(shadows, self.shadow_params)):
                if new.shape != old.shape:
                    raise ValueError(f"shadow_params[{i}] has shape {tuple(new.shape)}; expected {tuple(old.shape)}")
        self._set_hyper(**values)
        if shadows is not None:
            with torch.no_grad():
                for new, old in zip(shadows, self.shadow_params):
                    old.copy_(new)
        self.cur_decay_value = None
