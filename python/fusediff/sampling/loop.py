"""The denoising loop that every pipeline and the trainer's sampler run.

    run = scheduler.set_timesteps(...)                     the last int(n * strength) steps for img2img
    x = noise * init_noise_sigma                           or add_noise(image_latents, noise, t_1)
    for t in run:
        m = predict(scheduler.scale_model_input(x, t), t, **model_kwargs)     guided: one call on [x; x]
        x = scheduler.step(m, t, x).prev_sample                               one fused launch
                                                  (+ prev_timestep=t_next where step takes it: unCLIP)
        x = (1 - mask) * add_noise(image_latents, noise, t_next) + mask * x   inpainting with a plain model
        callback_on_step_end(pipeline, i, t, {name: tensor})                  may replace tensors

``predict(x, t, **model_kwargs) -> tensor`` is the model call (a scheduler never calls a model);
x may have any rank, (B, C, L) audio, (B, C, H, W) images or (B, C, F, H, W) video latents, as
the schedulers' fused step works on any shape. The loop never reads a value back from the
device: the scheduler steps with the host copy of the timesteps, the model reads a device copy
made once (:func:`~fusediff.sampling.timesteps.loop_timesteps`), and seeded noise reaches the
device through pinned memory (:func:`fusediff.utils.torch_utils.randn_tensor`).

Random numbers: the loop draws none itself; the caller draws ``noise`` (and the scheduler its
step noise, from ``generator``) in diffusers' order, so a seeded run gives diffusers' images.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .guidance import Guidance, guided_prediction
from .loop_graph import LoopGraphs, generator_kind, generators_of, scheduler_signature
from .runtime import ModelCallGraphs, in_layout
from .timesteps import Timesteps, loop_timesteps, set_timesteps

Predict = Callable[..., torch.Tensor]


def step_arguments(scheduler: Any, generator: Any = None, eta: float = 0.0) -> dict[str, Any]:
    """``eta`` and ``generator`` for ``scheduler.step``, each only if the scheduler takes it."""
    import inspect

    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def takes_prev_timestep(scheduler: Any) -> bool:
    """Whether ``scheduler.step`` takes the step's target timestep (diffusers' UnCLIPScheduler API)."""
    return "prev_timestep" in inspect.signature(scheduler.step).parameters


def prev_timestep_of(host: torch.Tensor, i: int) -> dict[str, Any]:
    """``prev_timestep`` of step i: the run's next timestep, None after the last (as diffusers' unCLIP passes it)."""
    return {"prev_timestep": host[i + 1] if i + 1 < len(host) else None}


def model_call(predict: Predict, x: torch.Tensor, t: torch.Tensor,
               guidance: tuple[torch.Tensor, float, bool] | None, **model_kwargs: Any) -> torch.Tensor:
    """A step's model call, guided when ``guidance`` is given: what a CUDA graph of the loop captures."""
    if guidance is None:
        return predict(x, t, **model_kwargs)
    return guided_prediction(predict, x, t, guidance, **model_kwargs)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def _progress(progress: bool | Callable[..., Any], total: int) -> Any:
    if callable(progress):
        return progress(total=total)
    if progress:
        from tqdm.auto import tqdm

        return tqdm(total=total)
    return contextlib.nullcontext(_NoBar())


def _start(scheduler: Any, noise: torch.Tensor, run: Timesteps, image_latents: torch.Tensor | None,
           from_noise: bool) -> torch.Tensor:
    """x at the run's first timestep: scaled noise, or the image's latents noised to t_1."""
    if from_noise:
        sigma = scheduler.init_noise_sigma
        return noise if isinstance(sigma, float) and sigma == 1.0 else noise * sigma
    return scheduler.add_noise(image_latents, noise, run.host[:1].repeat(noise.shape[0]))


def denoise(scheduler: Any, predict: Predict, noise: torch.Tensor, *,
            num_inference_steps: int | None = 50, timesteps: Sequence[int] | Timesteps | None = None,
            sigmas: Sequence[float] | None = None, strength: float | None = None,
            model_kwargs: Mapping[str, Any] | None = None, guidance: Guidance | None = None,
            generator: Any = None, eta: float = 0.0, step_kwargs: Mapping[str, Any] | None = None,
            image_latents: torch.Tensor | None = None, start_from_noise: bool | None = None,
            mask: torch.Tensor | None = None,
            callback_on_step_end: Callable[..., Mapping[str, Any] | None] | None = None,
            callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
            callback_tensors: Mapping[str, torch.Tensor] | None = None, pipeline: Any = None,
            progress: bool | Callable[..., Any] = True,
            cuda_graph: ModelCallGraphs | LoopGraphs | bool | str | None = None,
            memory_format: torch.memory_format | None = None, grad: bool = False) -> torch.Tensor:
    """Run ``scheduler`` from ``noise`` with ``predict`` as the model; returns the final sample.

    Args:
        scheduler: any fusediff scheduler, or one with diffusers' ``set_timesteps`` / ``step`` API.
        predict: ``predict(x, t, **model_kwargs) -> tensor``, the model's output for x at timestep t
            (t a 0-d tensor on x's device).
        noise: unit-variance noise of the sample's shape, drawn by the caller (x_T / init_noise_sigma).
        num_inference_steps, timesteps, sigmas: the schedule: a step count, or custom timesteps or
            sigmas if the scheduler takes them; or a :class:`Timesteps` already set on the scheduler
            by :func:`~fusediff.sampling.set_timesteps` (then ``sigmas`` and ``strength`` are not used).
        strength: run only the last ``int(n * strength)`` steps (img2img, inpainting).
        model_kwargs: keyword arguments of every ``predict`` call (conditions); their tensors are
            loop state a callback may read and replace.
        guidance: classifier-free guidance (:class:`Guidance`): each call is one ``predict`` on [x; x]
            whose ``model_kwargs`` already hold both halves of the conditions.
        generator, eta, step_kwargs: ``generator`` and ``eta`` go to ``scheduler.step`` where it takes
            them; ``step_kwargs`` go to every step as they are.
        image_latents: the start's clean latents (img2img, inpainting): x starts at
            ``add_noise(image_latents, noise, t_1)`` unless ``start_from_noise``.
        start_from_noise: start from ``noise * init_noise_sigma`` (default: when no image latents).
        mask: inpainting with a plain model: after each step, x = (1 - m) add_noise(image_latents,
            noise, t_next) + m x with m the first B rows of ``mask`` (1 = repaint), and x = (1 - m)
            image_latents + m x after the last; loop state as "mask".
        callback_on_step_end: ``f(pipeline, i, t, {name: tensor})`` after each step, with the tensors
            named in ``callback_on_step_end_tensor_inputs`` (or the callback's ``tensor_inputs``);
            the dict it returns replaces loop tensors of those names (diffusers' semantics).
        callback_tensors: more tensors a callback may read (e.g. negative prompt embeddings).
        pipeline: the first argument of the callback.
        progress: a tqdm bar (True), none (False), or a factory ``progress(total=n)``.
        cuda_graph: replay the model call from CUDA graphs: a :class:`ModelCallGraphs` kept across
            loops, or True for graphs of this loop only; or the whole loop, model calls and scheduler
            updates, as one graph: a :class:`~fusediff.sampling.LoopGraphs` kept across loops (the
            first call of a loop signature runs eagerly, the second captures; see
            :mod:`fusediff.sampling.loop_graph` for the loops it holds). Outputs equal the eager loop's.
        memory_format: ``torch.channels_last`` converts 4-D latents once, before the loop.
        grad: leave autograd as the caller has it (differentiable sampling); by default the loop runs
            under ``torch.no_grad()``, as diffusers' pipelines do.
    """
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a tensor; got {type(noise).__name__}")
    if not callable(predict):
        raise TypeError(f"predict must be callable; got {type(predict).__name__}")
    if guidance is not None and not isinstance(guidance, Guidance):
        raise TypeError(f"guidance must be a fusediff.sampling.Guidance; got {type(guidance).__name__}")
    if mask is not None and image_latents is None:
        raise ValueError("mask blending needs the image_latents it keeps")
    model_kwargs = dict(model_kwargs or {})
    # 1. the run's timesteps, 2. x at the first of them
    if isinstance(timesteps, Timesteps):
        run = timesteps
    else:
        run = set_timesteps(scheduler, num_inference_steps, timesteps=timesteps, sigmas=sigmas, strength=strength)
    from_noise = image_latents is None if start_from_noise is None else start_from_noise
    if not from_noise and image_latents is None:
        raise ValueError("start_from_noise=False needs image_latents to noise")
    step_kw = {**step_arguments(scheduler, generator, eta), **(step_kwargs or {})}
    with_prev = takes_prev_timestep(scheduler)
    guide = guidance.arguments(noise.dtype, noise.device) if guidance is not None else None
    host, device_timesteps = loop_timesteps(run.host, noise.device)
    if isinstance(cuda_graph, LoopGraphs):
        whole = (from_noise and mask is None and callback_on_step_end is None and not grad and noise.is_cuda
                 and not any(isinstance(v, torch.Tensor) for k, v in step_kw.items() if k != "generator"))
        if whole:
            x = _whole_loop(cuda_graph, scheduler, predict, noise, run, host, device_timesteps, guide, model_kwargs,
                            step_kw, memory_format)
            with _progress(progress, run.num_inference_steps) as bar:
                bar.update(run.num_inference_steps)
            return x
        cuda_graph = cuda_graph.step_graphs
    x = _start(scheduler, noise, run, image_latents, from_noise)
    if memory_format is not None:
        x = in_layout(x, memory_format)
    # 3. the loop's state: what predict and a callback read
    state: dict[str, Any] = {**model_kwargs, **(callback_tensors or {}), "latents": x}
    if mask is not None:
        state["mask"] = mask
    if hasattr(callback_on_step_end, "tensor_inputs"):  # diffusers' PipelineCallback objects
        callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
    unknown = [k for k in callback_on_step_end_tensor_inputs if k not in state]
    if callback_on_step_end is not None and unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not among {sorted(state)}")
    call: Callable[..., torch.Tensor] = functools.partial(model_call, predict)
    graphs = ModelCallGraphs() if cuda_graph is True else cuda_graph or None
    if graphs is not None:
        call = graphs.wrap(call)
    order = getattr(scheduler, "order", 1)
    warmup = len(host) - run.num_inference_steps * order
    # 4. x_{t-1} = step(predict(x_t, t), t, x_t)
    with _progress(progress, run.num_inference_steps) as bar, contextlib.nullcontext() if grad else torch.no_grad():
        for i, t_host in enumerate(host):
            t = device_timesteps[i]  # the model reads the device copy, the scheduler the host one
            x = state["latents"]
            out = call(scheduler.scale_model_input(x, t_host), t, guide, **model_kwargs)
            if graphs is not None:  # the graph's output buffer is overwritten next step; schedulers may keep it
                out = out.clone()
            prev = prev_timestep_of(host, i) if with_prev else {}
            x = scheduler.step(out, t_host, x, **step_kw, **prev).prev_sample
            if mask is not None:
                keep = image_latents
                if i < len(host) - 1:
                    keep = scheduler.add_noise(keep, noise, host[i + 1:i + 2])
                m = state["mask"][:x.shape[0]]
                x = (1 - m) * keep + m * x
            state["latents"] = x
            if callback_on_step_end is not None:
                tensors = {k: state[k] for k in callback_on_step_end_tensor_inputs}
                returned = callback_on_step_end(pipeline, i, t, tensors) or {}
                state.update((k, v) for k, v in returned.items() if k in state)
                model_kwargs = {k: state[k] for k in model_kwargs}
            if i == len(host) - 1 or (i + 1 > warmup and (i + 1) % order == 0):
                bar.update()
    return state["latents"]


def _whole_loop(graphs: LoopGraphs, scheduler: Any, predict: Predict, noise: torch.Tensor, run: Timesteps,
                host: torch.Tensor, device_timesteps: torch.Tensor, guide: Any, model_kwargs: dict[str, Any],
                step_kw: dict[str, Any], memory_format: torch.memory_format | None) -> torch.Tensor:
    """The loop from noise (no mask, no callback) through :class:`LoopGraphs`: one graph per signature."""
    scale, rescale, uncond_first = guide if guide is not None else (None, None, None)
    with_prev = takes_prev_timestep(scheduler)
    step_other = {k: (generator_kind(v) if k == "generator" else v) for k, v in step_kw.items()}

    def body(noise_: torch.Tensor, timesteps_: torch.Tensor, scale_: torch.Tensor | None,
             kw: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            g = None if scale_ is None else (scale_, rescale, uncond_first)
            x = _start(scheduler, noise_, run, None, True)
            if memory_format is not None:
                x = in_layout(x, memory_format)
            for i, t_host in enumerate(host):
                out = model_call(predict, scheduler.scale_model_input(x, t_host), timesteps_[i], g, **kw)
                prev = prev_timestep_of(host, i) if with_prev else {}
                x = scheduler.step(out, t_host, x, **step_kw, **prev).prev_sample
            return x

    args = (noise, device_timesteps, scale, dict(model_kwargs))
    key = graphs.signature(scheduler_signature(scheduler), tuple(host.tolist()), run.num_inference_steps,
                           rescale, uncond_first, step_other, memory_format, args=args)
    return graphs.run(key, body, args, scheduler=scheduler, generators=generators_of(step_kw.get("generator")))
