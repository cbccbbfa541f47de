"""A whole training step (forward, loss, backward, gradient clipping, optimizer step) as one CUDA graph.

An eager training step of a diffusion UNet launches hundreds of kernels, and at small batches the
host cannot issue them as fast as the GPU runs them. :class:`CUDAGraphTrainStep` records one step
with ``torch.cuda.CUDAGraph`` and replays it: one launch per step, as in PyTorch's "whole network
capture" recipe (docs, CUDA semantics, "CUDA Graphs"). Each call copies the batch into the static
input tensors the graph reads, replays, and returns the static loss tensor (overwritten by the
next call: clone what you keep, and read it with ``.item()`` only when you log, as that waits).

Requirements and limits:
- An optimizer that keeps a step count (Adam, AdamW, ...) must be built with ``capturable=True``
  (use ``fused=True`` too for one kernel), so the count lives on the device; SGD needs nothing. A learning-rate
  schedule must write the rate into a tensor ``lr`` in place (``group["lr"].fill_(value)``),
  since a Python float would be baked into the graph.
- Inputs are CUDA tensors of fixed shapes, dtypes and strides: a different signature raises
  (build another step for it). The loss function must not synchronise with the host (no
  ``.item()``, no data-dependent Python branches). Random numbers drawn inside it on the CUDA
  default generator (``torch.randn(..., device="cuda")``) advance on every replay, as in eager.
- Gradients are recomputed on every replay, not accumulated: gradient accumulation over
  micro-batches and ``no_sync`` of DistributedDataParallel are not supported here.
- Replacing a parameter tensor (rather than updating it in place) after capture makes the graph
  read stale memory: build a new step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class CUDAGraphTrainStep:
    """``loss = step(*batch)``: forward, backward and optimizer step of ``loss_fn`` replayed from a CUDA graph.

    Args:
        loss_fn: called as ``loss_fn(*batch)``; runs the model and returns a scalar loss tensor.
        optimizer: a torch optimizer over the parameters ``loss_fn`` trains; ``capturable=True`` where it
            has that option.
        clip_grad_norm: if set, gradients are clipped to this total L2 norm before the step
            (``torch.nn.utils.clip_grad_norm_``, which stays on the device).
        warmup: eager steps on a side stream before capture (cuDNN/Triton autotuning and lazy
            allocations happen there); they are real training steps and update the weights.
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer, *,
                 clip_grad_norm: float | None = None, warmup: int = 3) -> None:
        if "capturable" in optimizer.defaults and not all(g["capturable"] for g in optimizer.param_groups):
            raise ValueError("CUDAGraphTrainStep: the optimizer must be built with capturable=True "
                             "(e.g. torch.optim.AdamW(params, lr=torch.tensor(1e-4), fused=True, capturable=True))")
        if warmup < 1:
            raise ValueError(f"CUDAGraphTrainStep: warmup must be at least 1; got {warmup}")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"CUDAGraphTrainStep: clip_grad_norm must be > 0 or None; got {clip_grad_norm}")
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.clip_grad_norm = clip_grad_norm
        self.warmup = warmup
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._loss: torch.Tensor | None = None

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _eager_step(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """One step as the graph records it: loss, backward, clip, optimizer step (grads start at None)."""
        loss = self.loss_fn(*batch)
        loss.backward()
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._params(), self.clip_grad_norm)
        self.optimizer.step()
        return loss

    @staticmethod
    def _signature(batch: Sequence[torch.Tensor]) -> list[tuple]:
        return [(tuple(t.shape), t.stride(), t.dtype, t.device) for t in batch]

    def _capture(self, batch: Sequence[torch.Tensor]) -> None:
        for i, t in enumerate(batch):
            if not isinstance(t, torch.Tensor) or not t.is_cuda:
                raise TypeError(f"CUDAGraphTrainStep: input {i} must be a CUDA tensor; got "
                                f"{t.device if isinstance(t, torch.Tensor) else type(t).__name__}")
        self._inputs = tuple(t.clone() for t in batch)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.optimizer.zero_grad(set_to_none=True)
                self._eager_step(self._inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients it writes
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._loss = self._eager_step(self._inputs).detach()
        self._graph = graph

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        """Run one training step on ``batch`` and return the (static) loss tensor."""
        if self._graph is None:
            self._capture(batch)
        elif self._signature(batch) != self._signature(self._inputs):
            raise ValueError("CUDAGraphTrainStep: the inputs' shapes, strides, dtypes or devices differ from the "
                             f"captured ones ({self._signature(self._inputs)}); build another step for them")
        for static, new in zip(self._inputs, batch):
            static.copy_(new, non_blocking=True)
        self._graph.replay()
        return self._loss
