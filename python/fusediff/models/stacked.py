"""Several linear layers that read one input, applied as one matmul by their stacked weights.

An eager call pays its host cost per launch, so where several projections of one tensor are taken in a row
(self-attention's q, k and v of h; cross-attention's k and v of the context; every ResNet block's projection
of the time embedding) one matmul by [W_1; W_2; ...] does the work of many. The stacked weight is built
once and kept while the layers are unchanged: the key holds each parameter's id, data pointer, version
counter and dtype, so an in-place update (an optimiser step, ``load_state_dict``, ``.to()``) rebuilds it,
while a write through ``.data`` bumps no version counter and is not seen (clear the owner's cache
attribute after such writes). Under autograd the stack is built anew at every call, so gradients reach
each layer. Each output element is the same dot product as the separate matmul's, but the matmul library
may block a wider product differently, so results can differ in the last bits. The weights keep their
layers' names on disk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def capturing(device: torch.device) -> bool:
    """Whether work on ``device`` is being recorded into a CUDA graph now."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def stack_linears(owner: nn.Module, cache: str, layers: Sequence[nn.Linear], anew: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([W_1; W_2; ...] (sum of out_features, in_features), the stacked biases or None) of ``layers``, which
    all have a bias or none has. Kept in ``owner``'s attribute ``cache`` between calls while no gradient is
    recorded and the layers are unchanged; built anew (and not kept) with ``anew`` or under autograd."""
    params = [m.weight for m in layers] + ([m.bias for m in layers] if layers[0].bias is not None else [])
    n = len(layers)
    if anew or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        return torch.cat(params[:n]), (torch.cat(params[n:]) if len(params) > n else None)
    # the parameters themselves are kept with the key, so their ids cannot be reused while it is held
    key = tuple((id(p), p.data_ptr(), p._version, p.dtype) for p in params)
    kept = getattr(owner, cache, None)
    if kept is None or kept[0] != key:
        with torch.no_grad():
            stacked = (torch.cat(params[:n]), torch.cat(params[n:]) if len(params) > n else None)
        kept = (key, *stacked, params)
        setattr(owner, cache, kept)
    return kept[1], kept[2]
