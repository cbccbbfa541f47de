"""The ``fusediff`` command: sample images from a pipeline, train a model, and report versions and
kernel backends.

    fusediff sample [--model DIR_OR_REPO] [--scheduler ddpm|ddim|pndm] [--steps N] [--batch N]
                    [--seed S] [--device cpu|cuda] [--dtype fp32|fp16|bf16]
                    (--out GRID.png | --out-dir DIR)
    fusediff sample --model digits-cond [--class C[,C...]]... [--guidance S] [--scheduler NAME] ...
    fusediff sample --model DIR_OR_REPO --prompt TEXT [--negative-prompt TEXT] [--guidance S]
                    [--height H --width W] [--scheduler NAME] [--steps N] [--batch N] ...
    fusediff train --out DIR [...]        (see ``fusediff train --help`` and :mod:`fusediff.training.cli`)
    fusediff convert glide CHECKPOINT.pt OUT_DIR [--kind base|upsample|base-inpaint|upsample-inpaint]
                    [--tokenizer DIR] [--dtype fp32|fp16]
    fusediff info
    fusediff bench pipeline [--out DIR] [--rows ROW ...] [--columns COL ...] [--dtype fp16|bf16]
                            [--steps N] [--compile-mode MODE] [--report]

Without ``--model`` it samples the digits model shipped inside the package; ``--model digits`` and
``--model digits-cond`` name the shipped unconditional and class-conditional digits models (write
``./digits`` for a local directory of that name). A class-conditional model (a
``ClassConditionalPipeline``, or any UNet + scheduler directory whose UNet has a class-embedding
table) draws the classes of ``--class`` (repeatable or comma-separated), repeated in order to fill
``--batch`` images (default: 16 for one class, one image per class for several); without
``--class`` it cycles through all its classes. ``--guidance`` is its classifier-free guidance
scale (default: the model's), and ``--scheduler`` takes any of TEXT_SCHEDULERS (default: the
model's, DDIM for a trained model). With ``--prompt`` it runs a text-to-image pipeline (Stable
Diffusion, LDM, DeepFloyd IF stage I; needs ``pip install "fusediff[text]"``); ``--scheduler`` then takes any of
TEXT_SCHEDULERS (default: the model's own), ``--batch`` is the number of images (default 1). The
seed feeds a CPU generator, so a seed gives the same images on every device (up to arithmetic
rounding). Bad arguments and missing models end with one line on stderr and exit status 2 or 1.
``fusediff train`` is :mod:`fusediff.training.cli`, imported only when that command runs. Sampling
from a class-conditional model is :mod:`fusediff.cli_class`; the scheduler names, step defaults and
text-pipeline test that both paths use are in :mod:`fusediff.cli_common` (neither imports this module).
``fusediff bench pipeline`` times fusediff against HF diffusers on a CUDA GPU (see
:mod:`fusediff.benchmarks.pipeline`) and appends rows to ``--out``/pipeline.csv.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .cli_class import as_class_conditional, class_images
from .cli_common import TEXT_SCHEDULERS, default_steps, is_text_pipeline, use_scheduler
from .utils.cli_types import CliError, OneLineParser, positive_int

ASSETS = Path(__file__).parent / "assets"
DIGITS_MODEL = ASSETS / "digits"
DIGITS_COND_MODEL = ASSETS / "digits-cond"
# --model names of the models shipped inside the package
SHIPPED_MODELS = {"digits": DIGITS_MODEL, "digits-cond": DIGITS_COND_MODEL}
SCHEDULERS = ("ddpm", "ddim", "pndm")  # --scheduler of unconditional models: their DDPM/DDIM/PNDM pipelines
TEXT_ONLY_OPTIONS = ("negative_prompt", "height", "width")  # --guidance: text or class-conditional models
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def class_list(text: str) -> list[int]:
    """``--class`` values: one integer or several separated by commas ("7", "0,1,2")."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def build_parser(with_training: bool = False) -> argparse.ArgumentParser:
    """The command's parser; ``with_training`` adds the options of ``fusediff train`` (importing
    :mod:`fusediff.training.cli`), which other commands do without."""
    parser = OneLineParser(prog="fusediff", description="fusediff: diffusion sampling and training with fused kernels")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    s = sub.add_parser("sample", help="sample images from a pipeline and write PNGs")
    s.add_argument("--model", default=None,
                   help="pipeline directory, Hub repo id, or a shipped model: "
                        f"{', '.join(SHIPPED_MODELS)} (default: digits)")
    s.add_argument("--class", dest="class_labels", type=class_list, action="append", default=None, metavar="C",
                   help="class(es) to draw from a class-conditional model: repeatable or comma-separated "
                        "(default: all classes in turn)")
    s.add_argument("--scheduler", choices=tuple(TEXT_SCHEDULERS), default=None, metavar="NAME",
                   help=f"sampler: {', '.join(SCHEDULERS)} (default ddim); with --prompt or a class-conditional "
                        f"model also {', '.join(n for n in TEXT_SCHEDULERS if n not in SCHEDULERS)} "
                        "(default: the model's)")
    s.add_argument("--steps", type=positive_int, default=None, help="inference steps (default: 1000 ddpm, 50 otherwise)")
    s.add_argument("--batch", type=positive_int, default=None,
                   help="number of images (default: 16; 1 with --prompt; one per class with several --class)")
    s.add_argument("--prompt", default=None, help="text to follow: runs a text-to-image model (SD, LDM)")
    s.add_argument("--negative-prompt", default=None, help="text to steer away from (Stable Diffusion)")
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale of a text-to-image or class-conditional model "
                        "(default: the pipeline's)")
    s.add_argument("--height", type=positive_int, default=None, help="image height in pixels, a multiple of 8")
    s.add_argument("--width", type=positive_int, default=None, help="image width in pixels, a multiple of 8")
    s.add_argument("--seed", type=int, default=0, help="seed of the CPU generator (default: 0)")
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    s.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    out = s.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", type=Path, help="write all images as one grid PNG here")
    out.add_argument("--out-dir", type=Path, help="write one PNG per image into this directory")
    t = sub.add_parser("train", help="train a model on the bundled digits and write a pipeline directory")
    if with_training:
        from .training import cli as training_cli

        training_cli.add_arguments(t)
    c = sub.add_parser("convert", help="convert a released checkpoint into a pipeline directory")
    formats = c.add_subparsers(dest="format", required=True, parser_class=OneLineParser)
    g = formats.add_parser("glide", help="a glide-text2im checkpoint (.pt state dict, loaded with weights_only=True)")
    g.add_argument("checkpoint", type=Path, help="base.pt, upsample.pt, base_inpaint.pt or upsample_inpaint.pt")
    g.add_argument("out_dir", type=Path, help="the pipeline directory to write (atomically)")
    g.add_argument("--kind", choices=("base", "upsample", "base-inpaint", "upsample-inpaint"), default="base")
    g.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                   help="GLIDE's BPE files (glide_text2im/tokenizer: encoder.json.gz, vocab.bpe.gz) or GPT-2's "
                        "(vocab.json, merges.txt), written into the directory's tokenizer/")
    g.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="dtype of the written weights")
    sub.add_parser("info", help="print versions, devices and the kernel backend of each op")
    b = sub.add_parser("bench", help="benchmark fusediff against HF diffusers on a CUDA GPU")
    benchmarks = b.add_subparsers(dest="benchmark", required=True, parser_class=OneLineParser)
    from .benchmarks import pipeline  # argparse and csv only: torch is imported when it runs

    p = benchmarks.add_parser("pipeline", help="UNet step, VAE decode, text-to-image call and CIFAR-10 UNet: "
                                               "diffusers eager/compile/patched against fusediff eager/graphs/compile")
    pipeline.add_arguments(p, default_out=Path("."))
    return parser


def _load_pipeline(args: argparse.Namespace, source, loaded):
    """The loaded UNet + scheduler pipeline as the DDPM, DDIM or PNDM pipeline of ``--scheduler``."""
    from . import DDIMPipeline, DDPMPipeline, DDPMScheduler, PNDMPipeline

    if is_text_pipeline(loaded):
        raise CliError(f"{str(source)!r} holds a text-to-image {type(loaded).__name__}: pass --prompt")
    if not hasattr(loaded, "unet") or not hasattr(loaded, "scheduler"):
        raise CliError(f"{str(source)!r} holds a {type(loaded).__name__}, not a UNet + scheduler pipeline")
    pipeline_cls = {"ddpm": DDPMPipeline, "ddim": DDIMPipeline, "pndm": PNDMPipeline}[args.scheduler]
    scheduler = DDPMScheduler.from_config(loaded.scheduler.config) if args.scheduler == "ddpm" else loaded.scheduler
    pipe = pipeline_cls(unet=loaded.unet, scheduler=scheduler).to(args.device)
    pipe.set_progress_bar_config(disable=args.quiet, desc=f"{args.scheduler} sampling")
    return pipe


def _from_pretrained(args: argparse.Namespace):
    """(source, pipeline): ``--model`` (default: the shipped digits model) loaded in ``--dtype``."""
    import torch

    from . import DiffusionPipeline

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available (use --device cpu)")
    if args.quiet:
        _quiet_transformers()
    source = _model_source(args.model)
    try:
        return source, DiffusionPipeline.from_pretrained(source, torch_dtype=getattr(torch, DTYPES[args.dtype]))
    except (OSError, ValueError, TypeError, ImportError) as e:
        raise CliError(f"cannot load model {str(source)!r}: {e}") from None


def _model_source(model: str | None):
    """``--model`` as given, or the directory of a shipped model's name (default: the digits model)."""
    name = "digits" if model is None else model
    if name not in SHIPPED_MODELS:
        return model
    path = SHIPPED_MODELS[name]
    if not (path / "model_index.json").is_file():
        raise CliError(f"the shipped model {name!r} is not in this installation ({str(path)!r} is missing)")
    return path


def _check_text_arguments(args: argparse.Namespace) -> None:
    """Options that only text-to-image sampling takes; a one-line error (status 2) otherwise. (Options
    whose validity depends on the model, --guidance, --class and --scheduler, are checked once it is loaded.)"""
    if args.prompt is not None:
        if args.class_labels is not None:
            raise CliError("--class draws classes of a class-conditional model; it does not go with --prompt",
                           status=2)
        for name in ("height", "width"):
            value = getattr(args, name)
            if value is not None and value % 8:
                raise CliError(f"argument --{name}: expected a multiple of 8, got {value}", status=2)
        return
    given = [f"--{o.replace('_', '-')}" for o in TEXT_ONLY_OPTIONS if getattr(args, o) is not None]
    if given:
        raise CliError(f"{', '.join(given)} needs --prompt (a text-to-image model)", status=2)


def _check_unconditional_arguments(args: argparse.Namespace, source, loaded) -> None:
    """Options an unconditional model takes no part of: --guidance, --class, the text schedulers."""
    if args.guidance is not None:
        raise CliError(f"--guidance needs --prompt (a text-to-image model) or a class-conditional model; "
                       f"{str(source)!r} holds a {type(loaded).__name__}", status=2)
    if args.class_labels is not None:
        raise CliError(f"--class: {str(source)!r} holds a {type(loaded).__name__} that is not class-conditional "
                       "(its UNet has no class embedding)")
    if args.scheduler is not None and args.scheduler not in SCHEDULERS:
        raise CliError(f"argument --scheduler: invalid choice: {args.scheduler!r} without --prompt "
                       f"(choose from {', '.join(SCHEDULERS)}; the others need a text-to-image or "
                       "class-conditional model)", status=2)


def _image_samples(args: argparse.Namespace) -> list:
    """Images of a model without a prompt: class-conditional or unconditional."""
    import torch

    source, loaded = _from_pretrained(args)
    conditional = as_class_conditional(loaded)
    if conditional is not None:
        return class_images(args, conditional)
    _check_unconditional_arguments(args, source, loaded)
    args.scheduler = args.scheduler or "ddim"
    pipe = _load_pipeline(args, source, loaded)
    steps = args.steps or default_steps(args.scheduler)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    try:
        return pipe(batch_size=args.batch or 16, num_inference_steps=steps, generator=generator).images
    except ValueError as e:  # e.g. more steps than the scheduler was trained with
        raise CliError(str(e)) from None


def _quiet_transformers() -> None:
    """No weight-loading progress bars from transformers (--quiet)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def _load_text_pipeline(args: argparse.Namespace):
    """The model as a text-to-image pipeline on the chosen device, with the chosen scheduler."""
    import fusediff

    from .pipelines.pipeline_glide import GlideBase
    from .pipelines.pipeline_stable_diffusion import StableDiffusionPipeline

    source, pipe = _from_pretrained(args)
    if isinstance(pipe, fusediff.IFSuperResolutionPipeline):
        raise CliError(f"{str(source)!r} holds DeepFloyd IF's super-resolution stage, which upscales an image; "
                       "fusediff sample runs IF stage I (text to image)")
    if isinstance(pipe, GlideBase) and not isinstance(pipe, fusediff.GlidePipeline):
        raise CliError(f"{str(source)!r} holds GLIDE's {type(pipe).__name__}, which needs images too; "
                       "fusediff sample runs GLIDE's base model (text to image)")
    if not is_text_pipeline(pipe):
        raise CliError(f"{str(source)!r} holds a {type(pipe).__name__}, which takes no prompt; drop --prompt")
    if isinstance(pipe, fusediff.GlidePipeline) and args.scheduler not in (None, "ddpm"):
        raise CliError("GLIDE samples with its DDPM scheduler on respaced timesteps; drop --scheduler")
    if isinstance(pipe, fusediff.LDMTextToImagePipeline) and args.negative_prompt is not None:
        raise CliError("--negative-prompt: LDM text-to-image takes no negative prompt")
    if isinstance(pipe, fusediff.IFImg2ImgPipeline):  # an IF stage-I directory saved as img2img
        pipe = fusediff.IFPipeline(**pipe.components, requires_safety_checker=False)
    elif type(pipe) is not StableDiffusionPipeline and not isinstance(pipe, (fusediff.LDMTextToImagePipeline,
                                                                              fusediff.IFPipeline,
                                                                              fusediff.GlidePipeline)):
        # an img2img or inpainting directory: its components make a text-to-image pipeline
        if pipe.unet.config.in_channels != pipe.vae.config.latent_channels:
            raise CliError(f"{str(source)!r} is an inpainting model ({pipe.unet.config.in_channels}-channel UNet); "
                           "text-to-image needs a plain Stable Diffusion model")
        pipe = StableDiffusionPipeline(**pipe.components, requires_safety_checker=False)
    use_scheduler(pipe, args.scheduler)
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=args.quiet, desc=f"{args.scheduler or 'sampling'}")
    return pipe


def _text_images(args: argparse.Namespace) -> list:
    import torch

    import fusediff

    pipe = _load_text_pipeline(args)
    steps = args.steps or default_steps(args.scheduler)
    batch = args.batch or 1
    call = dict(height=args.height, width=args.width, num_inference_steps=steps,
                generator=torch.Generator("cpu").manual_seed(args.seed))
    if args.guidance is not None:
        call["guidance_scale"] = args.guidance
    if isinstance(pipe, fusediff.GlidePipeline):  # 64 x 64 only; its own respacing ("100") unless --steps
        if args.height is not None or args.width is not None:
            raise CliError("--height/--width: GLIDE's base model samples at its own size")
        del call["height"], call["width"]
        call["num_inference_steps"] = args.steps
    if isinstance(pipe, fusediff.LDMTextToImagePipeline):
        call["prompt"] = [args.prompt] * batch
    else:
        call.update(prompt=args.prompt, negative_prompt=args.negative_prompt, num_images_per_prompt=batch)
    try:
        return pipe(**call).images
    except ValueError as e:  # a size that is no multiple of 8, too many steps, ...
        raise CliError(str(e)) from None


def _save_png(image, path: Path) -> None:
    """Write a PNG atomically: into a temporary file beside it, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def make_grid(images: list, pad: int = 2):
    """The images in a near-square grid with ``pad`` pixels of black between them."""
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new(images[0].mode, (cols * (w + pad) + pad, rows * (h + pad) + pad))
    for i, img in enumerate(images):
        grid.paste(img, (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return grid


def cmd_sample(args: argparse.Namespace) -> int:
    if args.out is not None and args.out.suffix.lower() != ".png":
        raise CliError(f"--out must name a .png file; got {str(args.out)!r}")
    if args.out_dir is not None and args.out_dir.exists() and not args.out_dir.is_dir():
        raise CliError(f"--out-dir {str(args.out_dir)!r} exists and is not a directory")
    _check_text_arguments(args)
    images = _text_images(args) if args.prompt is not None else _image_samples(args)
    if args.out is not None:
        _save_png(make_grid(images), args.out)
        print(f"wrote {len(images)} images as a grid to {args.out}")
    else:
        for i, img in enumerate(images):
            _save_png(img, args.out_dir / f"sample_{i:04d}.png")
        print(f"wrote {len(images)} images to {args.out_dir}/")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training import cli as training_cli

    return training_cli.run(args)


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .pipelines.glide_convert import convert_glide

    try:
        out = convert_glide(args.checkpoint, args.out_dir, args.kind, tokenizer_dir=args.tokenizer,
                            dtype=torch.float16 if args.dtype == "fp16" else torch.float32)
    except (ValueError, FileNotFoundError, NotImplementedError, ImportError) as e:
        raise CliError(str(e)) from None
    print(f"wrote a GLIDE {args.kind} pipeline to {out}/")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .kernels import get_backend, has_cuda_kernels
    from .kernels._report import backend_report

    print(f"fusediff {__version__}")
    print(f"python {platform.python_version()} ({sys.platform})")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    for name in ("triton", "diffusers", "transformers"):
        try:
            version = __import__(name).__version__
        except ImportError:
            version = "not installed"
        print(f"{name} {version}")
    print(f"extension fusediff._C: {'CUDA + C++' if has_cuda_kernels() else 'C++ only or missing'}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
        devices.append("cuda")
    else:
        print("cuda: not available")
    print(f"kernel backend setting: {get_backend()}")
    for device in devices:
        for op, implementation in backend_report(device).items():
            print(f"  {op:<20s} on {device:<4s}: {implementation}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .benchmarks import pipeline

    try:
        return pipeline.run(args)
    except pipeline.BenchUnavailable as e:
        raise CliError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fusediff`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(with_training=argv[:1] == ["train"])
        args = parser.parse_args(argv)
        commands = {"sample": cmd_sample, "train": cmd_train, "info": cmd_info, "bench": cmd_bench,
                    "convert": cmd_convert}
        return commands[args.command](args)
    except CliError as e:
        print(f"fusediff: error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("fusediff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
