"""A whole training step (forward, loss, backward, gradient clipping, optimizer step) as one CUDA graph.

An eager training step of a diffusion UNet launches hundreds of kernels, and at small batches the
host cannot issue them as fast as the GPU runs them. :class:`CUDAGraphTrainStep` records one step
with ``torch.cuda.CUDAGraph`` and replays it: one launch per step, as in PyTorch's "whole network
capture" recipe (docs, CUDA semantics, "CUDA Graphs"). Each call copies the batch into the static
input tensors the graph reads, replays, and returns the static loss tensor (overwritten by the
next call: clone what you keep, and read it with ``.item()`` only when you log, as that waits).

Gradient accumulation: with ``grad_accum=K`` each input is cut along dim 0 into K equal
micro-batches; the graph holds K forward/backward passes (each loss divided by K, the gradients
summed in the parameters' ``.grad`` as in eager accumulation), then the clipping and the optimizer
step, and the returned loss is the mean of the K micro-batch losses. The activations of one
micro-batch are freed before the next one runs, so the graph's memory is about one micro-batch's.

The first call prepares and records the graph: ``warmup`` eager steps on a side stream (cuDNN and
Triton autotuning, the optimizer's lazily created state), after which the parameters, the
optimizer state and the random generators are put back as they were, so the warm-up leaves no
trace; then the capture, then the replay that is the call's step. A replayed step therefore has the
effect of one eager step (:meth:`eager_step`, the same operations), bit for bit where the kernels are
deterministic, and the first call is not several steps.

Requirements and limits:
- An optimizer that keeps a step count (Adam, AdamW, ...) must be built with ``capturable=True``
  (use ``fused=True`` too for one kernel), so the count lives on the device; SGD needs nothing. A learning-rate
  schedule must write the rate into a tensor ``lr`` in place (``group["lr"].fill_(value)``),
  since a Python float would be baked into the graph.
- Inputs are CUDA tensors of fixed shapes, dtypes and strides: a different signature raises
  (build another step for it). The loss function must not synchronise with the host (no
  ``.item()``, no data-dependent Python branches, no CPU-to-GPU copies). Random numbers drawn in it
  advance on every replay, as in eager: those of the default CUDA generator always, those of a
  ``torch.Generator`` of your own when it is passed in ``generators`` (the graph must register it).
- Under autocast use ``torch.autocast(..., cache_enabled=False)`` inside ``loss_fn`` (the weight
  cast cache would otherwise hold tensors of the capture). fp16 with a GradScaler is not capturable
  (its inf check reads the device); use bf16.
- State that the warm-up creates in a fresh optimizer is reset to zeros, which is the initial state of
  Adam/AdamW and of SGD's momentum with ``dampening=0``; an optimizer whose fresh state is
  something else takes a different first step than eager.
- DistributedDataParallel (its bucketing and ``no_sync``) is not supported here.
- Replacing a parameter or optimizer-state tensor (rather than updating it in place, e.g. by
  ``optimizer.load_state_dict``) after capture makes the graph read stale memory: build a new step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..utils.cuda_graph import capture


class CUDAGraphTrainStep:
    """``loss = step(*batch)``: forward, backward and optimizer step of ``loss_fn`` replayed from a CUDA graph.

    Args:
        loss_fn: called as ``loss_fn(*micro_batch)``; runs the model and returns a scalar loss tensor.
        optimizer: a torch optimizer over the parameters ``loss_fn`` trains; ``capturable=True`` where it
            has that option.
        clip_grad_norm: if set, gradients are clipped to this total L2 norm before the step
            (``torch.nn.utils.clip_grad_norm_``, which stays on the device).
        warmup: eager steps on a side stream before capture (autotuning, lazy allocations); their effect on
            the weights, the optimizer state and the generators is undone.
        grad_accum: micro-batches per step: every input's dim 0 is cut into this many equal parts.
        generators: CUDA ``torch.Generator`` objects (besides the default one) that ``loss_fn`` draws from.
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer, *,
                 clip_grad_norm: float | None = None, warmup: int = 3, grad_accum: int = 1,
                 generators: Sequence[torch.Generator] = ()) -> None:
        if "capturable" in optimizer.defaults and not all(g["capturable"] for g in optimizer.param_groups):
            raise ValueError("CUDAGraphTrainStep: the optimizer must be built with capturable=True "
                             "(e.g. torch.optim.AdamW(params, lr=torch.tensor(1e-4), fused=True, capturable=True))")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"CUDAGraphTrainStep: warmup must be an integer >= 1; got {warmup!r}")
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
            raise ValueError(f"CUDAGraphTrainStep: grad_accum must be an integer >= 1; got {grad_accum!r}")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"CUDAGraphTrainStep: clip_grad_norm must be > 0 or None; got {clip_grad_norm}")
        for g in generators:
            if not isinstance(g, torch.Generator) or g.device.type != "cuda":
                raise TypeError(f"CUDAGraphTrainStep: generators must be CUDA torch.Generator objects; got {g!r}")
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.clip_grad_norm = clip_grad_norm
        self.warmup = warmup
        self.grad_accum = grad_accum
        self.generators = tuple(generators)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._loss: torch.Tensor | None = None

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _micro_batches(self, batch: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        k = self.grad_accum
        for i, t in enumerate(batch):
            if t.dim() == 0 or t.shape[0] % k:
                raise ValueError(f"CUDAGraphTrainStep: input {i} of shape {tuple(t.shape)} cannot be cut into "
                                 f"grad_accum={k} equal micro-batches along dim 0")
        parts = [t.chunk(k) for t in batch]
        return [tuple(p[m] for p in parts) for m in range(k)]

    def eager_step(self, *batch: torch.Tensor) -> torch.Tensor:
        """One step without the graph, the operations the graph records: for each micro-batch the loss over
        ``grad_accum`` and its backward (gradients summed), then clipping and the optimizer step. The
        gradients must start at None (``optimizer.zero_grad(set_to_none=True)``); returns the mean loss."""
        total = None
        for micro in self._micro_batches(batch):
            loss = self.loss_fn(*micro)
            if loss.dim() != 0:
                raise ValueError(f"CUDAGraphTrainStep: loss_fn must return a scalar; got shape {tuple(loss.shape)}")
            (loss / self.grad_accum).backward()
            loss = loss.detach().float()
            total = loss if total is None else total + loss
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._params(), self.clip_grad_norm)
        self.optimizer.step()
        return total / self.grad_accum

    @staticmethod
    def _signature(batch: Sequence[torch.Tensor]) -> list[tuple]:
        return [(tuple(t.shape), t.stride(), t.dtype, t.device) for t in batch]

    def _snapshot(self, device: torch.device) -> tuple:
        """Copies of the parameters, the optimizer state and the generator states (undone after the warm-up)."""
        params = [p.detach().clone() for p in self._params()]
        state = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
                 for p, s in self.optimizer.state.items()}
        rng = [g.get_state() for g in self.generators] + [torch.cuda.get_rng_state(device)]
        return params, state, rng, device

    def _restore(self, snap: tuple) -> None:
        """Put back what :meth:`_snapshot` copied, in place; state the warm-up created goes back to zeros."""
        params, state, rng, device = snap
        with torch.no_grad():
            for p, saved in zip(self._params(), params):
                p.copy_(saved)
        for p, s in self.optimizer.state.items():
            saved = state.get(id(p), {})
            for k, v in s.items():
                if k in saved and isinstance(v, torch.Tensor):
                    v.copy_(saved[k])  # in place: the graph records these addresses
                elif k in saved:
                    s[k] = saved[k]
                elif isinstance(v, torch.Tensor):  # created by the warm-up: Adam's moments and step start at 0
                    v.zero_()
        for g, s in zip(self.generators, rng):
            g.set_state(s)
        torch.cuda.set_rng_state(rng[-1], device)

    def _capture(self, batch: Sequence[torch.Tensor]) -> None:
        if not batch:
            raise TypeError("CUDAGraphTrainStep: the step needs at least one input tensor")
        for i, t in enumerate(batch):
            if not isinstance(t, torch.Tensor) or not t.is_cuda:
                raise TypeError(f"CUDAGraphTrainStep: input {i} must be a CUDA tensor; got "
                                f"{t.device if isinstance(t, torch.Tensor) else type(t).__name__}")
        self._micro_batches(batch)  # the shapes must cut before anything runs
        self._inputs = tuple(t.clone() for t in batch)
        snap = self._snapshot(batch[0].device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.optimizer.zero_grad(set_to_none=True)
                self.eager_step(*self._inputs)
        torch.cuda.current_stream().wait_stream(side)
        self._restore(snap)
        self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients it writes
        graph = torch.cuda.CUDAGraph()
        for g in self.generators:
            graph.register_generator_state(g)
        with capture(graph):
            self._loss = self.eager_step(*self._inputs)
        self._graph = graph

    def __call__(self, *batch: torch.Tensor) -> torch.Tensor:
        """Run one training step on ``batch`` and return the (static) mean loss tensor."""
        if self._graph is None:
            self._capture(batch)
        elif self._signature(batch) != self._signature(self._inputs):
            raise ValueError("CUDAGraphTrainStep: the inputs' shapes, strides, dtypes or devices differ from the "
                             f"captured ones ({self._signature(self._inputs)}); build another step for them")
        for static, new in zip(self._inputs, batch):
            static.copy_(new, non_blocking=True)
        self._graph.replay()
        return self._loss
