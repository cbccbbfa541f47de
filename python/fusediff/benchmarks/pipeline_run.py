"""Measurements of ``fusediff bench pipeline`` on a CUDA GPU; rows, columns and method are in pipeline.py.

Each row builds its own models from one set of random weights (drawn once per model from seed 0 with
diffusers' classes), runs its columns, and frees them before the next row, so at most one row's
models and compiled code are resident. The SD columns (unet, vae, t2i) share a row's UNet and VAE:
the pipeline of the t2i column is built from the very modules the unet and vae columns timed, so a
compile row compiles each model once. diffusers-eager runs first and provides the reference outputs
and the FLOP counts.

diffusers' StableDiffusionPipeline needs ``transformers`` only for its CLIP classes (named in type
annotations and the safety checker) and for its loader mixins (LoRA, textual inversion, IP-Adapter,
single-file loading). Where transformers is missing, :func:`diffusers_sd_pipeline_class` imports the
pipeline's module against placeholders for those names: with ``text_encoder=None``, no safety checker
and prompt embeddings passed in, ``__call__`` touches none of them (a seeded CPU run gives the same
image as the real class).
"""

from __future__ import annotations

import gc
import importlib
import sys
import time
import types
import warnings
from collections.abc import Callable

import torch

from . import harness
from .models import DDPM_CIFAR10_UNET, SD15_SCHEDULER, SD15_UNET, SD_VAE, flops
from .pipeline import BASELINE, ROWS, Row

DEVICE = "cuda"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SD_COLUMNS = ("unet", "vae", "t2i")
GUIDANCE = 7.5  # classifier-free guidance weight of the t2i column
T2I_REPEAT = 3  # timed pipeline calls after the warm-up call
TIMESTEP = 500  # of the model columns
TEXT_TOKENS = 77  # CLIP's context length
CIFAR_BATCH = 16


def measure(rows: list[str], columns: list[str], dtype: str, steps: int, compile_mode: str,
            log: Callable[[str], None] = print, emit: Callable[[list[dict], float, dict], None] | None = None,
            ) -> tuple[list[dict], float, dict[str, str]]:
    """(cells, bf16 matmul TFLOP/s, versions) for ``rows`` x ``columns``; a cell is a dict for pipeline.make_rows.

    ``emit(cells, peak, versions)`` gets each row's cells as soon as they are measured, so that a run
    stopped by a time limit keeps the rows it finished.
    """
    import diffusers

    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # no per-cast "keep in float32" notices
    config = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):  # a hit limit would silently fall back to eager
        if hasattr(config, limit):
            setattr(config, limit, max(getattr(config, limit), 64))
            break
    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    peak = harness.matmul_tflops()
    log(f"bf16 matmul rate: {peak:.0f} TFLOP/s")
    bench = _Bench(DTYPES[dtype], steps, compile_mode, log)
    cells: list[dict] = []
    try:
        with torch.no_grad():
            for name in rows:
                new = []
                sd = [c for c in columns if c in SD_COLUMNS and ROWS[name].has(c)]
                if sd:
                    new += bench.group(name, sd, bench.sd_models)
                if "cifar" in columns and ROWS[name].has("cifar"):
                    new += bench.group(name, ["cifar"], bench.cifar_model)
                cells += new
                if emit is not None:
                    emit(new, peak, versions)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    return cells, peak, versions


class _Bench:
    def __init__(self, dtype: torch.dtype, steps: int, compile_mode: str, log: Callable[[str], None]) -> None:
        self.dtype, self.steps, self.compile_mode, self.log = dtype, steps, compile_mode, log
        self.inputs = _inputs(dtype)
        self.weights: dict[str, dict[str, torch.Tensor]] = {}
        self.reference: dict[str, torch.Tensor] = {}  # diffusers-eager outputs, fp32
        self.flop: dict[str, float] = {}
        self.patched: dict[str, str] = {}  # model class -> what fusediff.patch did to it

    # -- models --------------------------------------------------------------------------------
    def model(self, spec: Row, class_name: str) -> torch.nn.Module:
        """``class_name`` of the row's library with the shared weights, in the benchmark dtype and the row's layout."""
        import diffusers

        configs = {"UNet2DConditionModel": SD15_UNET, "AutoencoderKL": SD_VAE, "UNet2DModel": DDPM_CIFAR10_UNET}
        config = configs[class_name]
        if class_name not in self.weights:
            reference = _construct(getattr(diffusers, class_name), config)
            self.weights[class_name] = {k: v.to(self.dtype) if v.is_floating_point() else v
                                        for k, v in reference.state_dict().items()}
            del reference
        if spec.library == "diffusers":
            cls = getattr(diffusers, class_name)
        else:
            import fusediff

            cls = getattr(fusediff, class_name)
        model = _construct(cls, config)
        model.load_state_dict(self.weights[class_name], strict=True)
        model = model.to(DEVICE, self.dtype).eval().requires_grad_(False)
        if spec.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if spec.mode == "patch":
            import fusediff

            patched = fusediff.patch(model)
            model = patched if isinstance(patched, torch.nn.Module) else model
            try:
                from fusediff.patching import report

                self.patched[class_name] = report(model).summary()
            except (ImportError, AttributeError):
                pass
        return model

    def compiled(self, spec: Row, module: torch.nn.Module) -> torch.nn.Module:
        if spec.mode != "compile":
            return module
        return torch.compile(module, mode=self.compile_mode, fullgraph=spec.library == "fusediff")

    def sd_models(self, spec: Row) -> dict[str, torch.nn.Module]:
        unet = self.model(spec, "UNet2DConditionModel")
        vae = self.model(spec, "AutoencoderKL")
        vae.decoder = self.compiled(spec, vae.decoder)
        return {"unet": self.compiled(spec, unet), "vae": vae}

    def cifar_model(self, spec: Row) -> dict[str, torch.nn.Module]:
        return {"cifar": self.compiled(spec, self.model(spec, "UNet2DModel"))}

    # -- cells ---------------------------------------------------------------------------------
    def group(self, name: str, columns: list[str], build: Callable[[Row], dict]) -> list[dict]:
        """Build the row's models for ``columns``, measure each column, free the models."""
        spec = ROWS[name]
        try:
            models = build(spec)
        except Exception as e:  # e.g. fusediff.patch missing: every cell of the group says why
            _free(compiled=False)
            self.log(f"{name}: could not build the models: {_why(e)}")
            return [{"impl": name, "column": c, "note": f"build: {_why(e)}"} for c in columns]
        try:
            if name == BASELINE:
                try:
                    self.count_flops(columns, models)
                except Exception as e:
                    self.log(f"FLOP count failed, no roofline: {_why(e)}")
            return [self.cell(name, spec, c, models) for c in columns]
        finally:
            del models
            _free(compiled=spec.mode == "compile")

    def count_flops(self, columns: list[str], models: dict) -> None:
        """FLOPs per call of each model column; t2i needs the UNet's and the VAE's whether timed or not."""
        for column in models:
            fn, inputs = self.call(ROWS[BASELINE], column, models)
            self.flop[column] = flops(lambda: fn(*inputs))
        if "t2i" in columns:
            self.flop["t2i"] = self.steps * self.flop["unet"] + self.flop["vae"]

    def cell(self, name: str, spec: Row, column: str, models: dict) -> dict:
        cell: dict = {"impl": name, "column": column, "flop": self.flop.get(column)}
        if spec.mode == "patch":
            uses = {"unet": ["UNet2DConditionModel"], "vae": ["AutoencoderKL"], "cifar": ["UNet2DModel"],
                    "t2i": ["UNet2DConditionModel", "AutoencoderKL"]}[column]
            _note(cell, "; ".join(f"{c}: {self.patched[c]}" for c in uses if c in self.patched))
        before = _dynamo_counts()
        try:
            if column == "t2i":
                self.pipeline_cell(name, spec, models, cell)
            else:
                self.model_cell(name, spec, column, models, cell)
        except Exception as e:
            _synchronize()
            _note(cell, _why(e))
        if spec.mode == "compile":
            after = _dynamo_counts()
            cell["graph_breaks"], cell["graphs"] = after[0] - before[0], after[1] - before[1]
        self.log(f"{name:>24s} {column:<5s} " + "  ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in cell.items()
            if k in ("ms", "gpu_ms", "warmup_s", "max_rel_diff", "graph_breaks", "graphs", "note") and v is not None))
        return cell

    def call(self, spec: Row, column: str, models: dict) -> tuple[Callable, tuple]:
        """(fn, inputs): ``fn(*inputs)`` is one call of the column's model as the row's pipeline makes it."""
        inputs = tuple(x.contiguous(memory_format=torch.channels_last) if spec.inputs_channels_last and x.dim() == 4
                       else x for x in self.inputs[column])
        model = models[column]
        if column == "unet" and spec.library == "diffusers":
            # StableDiffusionPipeline's call, keywords and all: a compiled UNet is then not traced again for it
            def fn(x, t, c):
                return model(x, t, encoder_hidden_states=c, timestep_cond=None, cross_attention_kwargs=None,
                             added_cond_kwargs=None, return_dict=False)[0]
        elif column == "unet":
            def fn(x, t, c):
                return model(x, t, encoder_hidden_states=c).sample
        elif column == "vae":
            def fn(z):
                return model.decode(z).sample
        else:
            def fn(x, t):
                return model(x, t).sample
        return fn, inputs

    def model_cell(self, name: str, spec: Row, column: str, models: dict, cell: dict) -> None:
        fn, inputs = self.call(spec, column, models)
        timed = fn
        if spec.mode == "graph":
            from fusediff.utils.cuda_graph import CUDAGraphCallable

            timed = CUDAGraphCallable(fn)
        cell["warmup_s"], _ = _first_call(lambda: timed(*inputs), cell)
        cell["max_rel_diff"] = self.diff(name, column, timed(*inputs))
        cell["ms"] = harness.do_bench_ms(lambda: timed(*inputs))
        try:  # the raw call for fusediff-graph too: a graph cannot be captured inside another
            cell["gpu_ms"] = harness.graph_call_ms(fn, inputs)
        except Exception as e:  # e.g. a host synchronisation inside the model
            _synchronize()
            _note(cell, f"no CUDA-graph time: {_why(e)}")

    def pipeline_cell(self, name: str, spec: Row, models: dict, cell: dict) -> None:
        pipe = self.pipeline(spec, models)
        if spec.mode in ("graph", "graph-loop"):
            pipe.enable_cuda_graph(whole_loop=spec.mode == "graph-loop")
        prompt_embeds, negative_prompt_embeds = self.inputs["t2i"]
        size = image_size()

        def call():
            generator = torch.Generator("cpu").manual_seed(0)
            return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                        guidance_scale=GUIDANCE, height=size, width=size, num_inference_steps=self.steps,
                        output_type="np", generator=generator).images

        # whole-loop graphs: a signature's first call is eager, the second captures
        calls = 2 if spec.mode == "graph-loop" else 1
        cell["warmup_s"], image = _first_call(lambda: [call() for _ in range(calls)][-1], cell)
        cell["max_rel_diff"] = self.diff(name, "t2i", torch.from_numpy(image))
        cell["ms"] = harness.wall_ms(call, repeat=T2I_REPEAT, warmup=0)
        if spec.mode in ("graph", "graph-loop"):
            pipe.disable_cuda_graph()

    def pipeline(self, spec: Row, models: dict):
        """The row's library's StableDiffusionPipeline around the row's UNet and VAE, with DPM++ 2M."""
        if spec.library == "diffusers":
            from diffusers import DPMSolverMultistepScheduler

            pipeline_cls = diffusers_sd_pipeline_class()
        else:
            from fusediff import DPMSolverMultistepScheduler, StableDiffusionPipeline as pipeline_cls
        pipe = pipeline_cls(vae=models["vae"], text_encoder=None, tokenizer=None, unet=models["unet"],
                            scheduler=DPMSolverMultistepScheduler(**SD15_SCHEDULER), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def diff(self, name: str, column: str, out: torch.Tensor) -> float | None:
        """max |out - diffusers eager| / max |diffusers eager|; diffusers-eager's own output becomes the reference."""
        out = out.to(device=DEVICE, dtype=torch.float32, copy=True)
        if name == BASELINE:
            self.reference[column] = out
            return None
        ref = self.reference.get(column)
        if ref is None or ref.shape != out.shape:
            return None
        return ((out - ref).abs().max() / ref.abs().max()).item()


def image_size() -> int:
    """Pixels per side of the SD columns' images: the UNet's latent size times the VAE's down-sampling (512)."""
    return SD15_UNET["sample_size"] * 2 ** (len(SD_VAE["block_out_channels"]) - 1)


def _inputs(dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each column's inputs, drawn on the CPU from seed 0 (the same values on every GPU)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    t = torch.tensor(TIMESTEP, device=DEVICE)  # 0-d int64, as the pipelines' loops pass it
    c, s, d = SD15_UNET["in_channels"], SD15_UNET["sample_size"], SD15_UNET["cross_attention_dim"]
    cifar = DDPM_CIFAR10_UNET
    return {"unet": (randn(2, c, s, s), t, randn(2, TEXT_TOKENS, d)),  # [z, z], t, [negative; positive] text
            "vae": (randn(1, SD_VAE["latent_channels"], s, s),),
            "cifar": (randn(CIFAR_BATCH, cifar["in_channels"], cifar["sample_size"], cifar["sample_size"]), t),
            "t2i": (randn(1, TEXT_TOKENS, d), randn(1, TEXT_TOKENS, d))}  # prompt, negative prompt embeddings


def _construct(cls: type, config: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(DEVICE):
        return cls(**config)


def diffusers_sd_pipeline_class() -> type:
    """diffusers' StableDiffusionPipeline, importable without transformers (see the module docstring)."""
    import diffusers
    from diffusers.utils import is_transformers_available

    if is_transformers_available():
        return diffusers.StableDiffusionPipeline
    import diffusers.loaders as loaders

    stub = types.ModuleType("transformers")
    for name in ("CLIPConfig", "CLIPImageProcessor", "CLIPTextModel", "CLIPTokenizer", "CLIPVisionModel",
                 "CLIPVisionModelWithProjection", "PreTrainedModel"):
        setattr(stub, name, type(name, (), {}))
    mixins = ("FromSingleFileMixin", "IPAdapterMixin", "StableDiffusionLoraLoaderMixin", "TextualInversionLoaderMixin")
    saved = sys.modules.get("transformers", stub)  # None if imports of it are blocked
    sys.modules["transformers"] = stub
    for name in mixins:
        setattr(loaders, name, type(name, (), {}))
    try:
        module = importlib.import_module("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    finally:
        if saved is stub:
            sys.modules.pop("transformers", None)
        else:
            sys.modules["transformers"] = saved
        for name in mixins:
            delattr(loaders, name)
    return module.StableDiffusionPipeline


def _first_call(fn: Callable[[], object], cell: dict) -> tuple[float, object]:
    """(seconds, result) of the first call (compilation, capture, autotuning); a CUDA-graph fallback
    warning goes to the cell's note."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    fallbacks = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
    if fallbacks:
        _note(cell, "ran eagerly: " + fallbacks[0])
    return seconds, result


def _note(cell: dict, text: str) -> None:
    if text:
        cell["note"] = f"{cell['note']}; {text}" if cell.get("note") else text


def _dynamo_counts() -> tuple[int, int]:
    """(graph breaks, graphs compiled) so far in this process, by dynamo's counters."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def _synchronize() -> None:
    try:
        torch.cuda.synchronize()
    except Exception:  # a sticky CUDA error: the next cells will report it
        pass


def _free(compiled: bool) -> None:
    if compiled:
        torch._dynamo.reset()  # compiled code holds the row's models
    gc.collect()
    torch.cuda.empty_cache()


def _why(e: BaseException) -> str:
    """One line: the exception's type and the first line of its message."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__
