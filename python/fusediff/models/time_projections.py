"""Every ResNet block's projection of the time embedding in one matmul.

Each :class:`~fusediff.models.resnet.ResnetBlock2D` of a UNet projects the same time embedding:
``time_emb_proj(silu(temb))``, two launches per block (22 blocks, 44 launches, in SD 1.5's UNet). Eager, on
CUDA, without autograd, outside torch.compile and CUDA-graph captures, :func:`project_time` takes silu(temb)
once and multiplies it by the stacked weights of all those blocks ([W_1; W_2; ...], kept as
:mod:`fusediff.models.stacked` keeps stacks), and hands the blocks a :class:`TimeProjections`, from which
each takes its columns (a strided view). Blocks with another activation or with ``skip_time_act`` project
their own from ``TimeProjections.temb``. The SiLU is the same op; each projected element is the same dot
product as the block's own matmul, though the matmul library may block the wider product differently
(last-bit differences on CUDA). In a capture or under torch.compile each block projects its own: launches
are free in a graph, and stacking there would copy every weight per replay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .stacked import capturing, stack_linears

STACK_DEVICES = ("cuda",)  # device types where the blocks' time projections are one matmul
CACHE = "_time_projection_stack"  # the owner's attribute holding the stacked weights
BLOCKS = "_time_projection_blocks"  # the owner's attribute holding the blocks and their column ranges


class TimeProjections:
    """One model call's time embedding ``temb`` (B, C_t) and, for each listed block, its projection
    time_emb_proj(silu(temb)) as a (B, C_i) view of one matmul's output."""

    __slots__ = ("temb", "_columns")

    def __init__(self, temb: torch.Tensor, columns: dict[int, torch.Tensor]) -> None:
        self.temb = temb
        self._columns = columns

    def of(self, block: nn.Module) -> torch.Tensor | None:
        """``block``'s projection, or None when the block was not stacked (it projects ``temb`` itself)."""
        return self._columns.get(id(block))


def _stackable(block: nn.Module, temb_channels: int) -> bool:
    proj = getattr(block, "time_emb_proj", None)
    return (type(proj) is nn.Linear and proj.in_features == temb_channels and proj.bias is not None
            and not getattr(block, "skip_time_act", True) and isinstance(getattr(block, "nonlinearity", None), nn.SiLU))


def _blocks(owner: nn.Module, temb_channels: int) -> tuple[list[nn.Module], list[tuple[int, int]]]:
    """The owner's stackable blocks (found once; the module tree does not change) and their column ranges."""
    found = owner.__dict__.get(BLOCKS)
    if found is None or found[0] != temb_channels:
        blocks = [m for m in owner.modules() if _stackable(m, temb_channels)]
        ranges, start = [], 0
        for m in blocks:
            ranges.append((start, start + m.time_emb_proj.out_features))
            start = ranges[-1][1]
        found = owner.__dict__[BLOCKS] = (temb_channels, blocks, ranges)
    return found[1], found[2]


def project_time(owner: nn.Module, temb: torch.Tensor) -> torch.Tensor | TimeProjections:
    """What ``owner`` (a UNet) passes its blocks as the time embedding: ``temb`` itself, or, where the
    projections are stacked (see the module docstring), a :class:`TimeProjections` of it."""
    if temb.device.type not in STACK_DEVICES or temb.dim() != 2 or torch.compiler.is_compiling() \
            or capturing(temb.device):
        return temb
    blocks, ranges = _blocks(owner, temb.shape[1])
    layers = [m.time_emb_proj for m in blocks]
    if not all(type(m) is nn.Linear for m in layers):  # a projection was replaced (an adapter): find them anew
        owner.__dict__.pop(BLOCKS, None)
        blocks, ranges = _blocks(owner, temb.shape[1])
        layers = [m.time_emb_proj for m in blocks]
    if len(blocks) < 2:
        return temb
    if torch.is_grad_enabled() and (temb.requires_grad or any(p.requires_grad for m in layers
                                                               for p in m.parameters())):
        return temb  # autograd: each block's own projection
    weight, bias = stack_linears(owner, CACHE, layers)
    if weight.dtype != temb.dtype:
        return temb  # the blocks' own matmuls raise the dtype error, as they would without stacking
    out = F.linear(F.silu(temb), weight, bias)  # (B, sum of C_i)
    return TimeProjections(temb, {id(m): out[:, a:b] for m, (a, b) in zip(blocks, ranges)})
