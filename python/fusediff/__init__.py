"""fusediff: diffusion models, schedulers and pipelines whose hot paths run fused kernels.

``fusediff.kernels`` holds the ops (each with a plain-PyTorch ``*_ref``); the compiled
extension ``fusediff._C`` holds the C++/CUDA code and is loaded when a fused op first runs.
Models, schedulers and pipelines are exported here as well as from their subpackages; they
are imported on first use, so ``import fusediff`` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import kernels  # noqa: E402
from .schedulers.registry import exports as _scheduler_exports  # noqa: E402
from .utils.lazy import lazy_exports  # noqa: E402

# public name -> submodule that defines it
_EXPORTS = {
    "ConfigMixin": "configuration",
    "FrozenDict": "configuration",
    "register_to_config": "configuration",
    "ModelMixin": "modeling",
    "UNet2DModel": "models",
    "UNet2DOutput": "models",
    "UNet2DConditionModel": "models",
    "UNet2DConditionOutput": "models",
    "PriorTransformer": "models",
    "PriorTransformerOutput": "models",
    "UnCLIPTextProjModel": "models",
    "GlideTextEncoder": "models",
    "Transformer2DModel": "models",
    "AutoencoderKL": "models",
    "VQModel": "models",
    "LDMBertModel": "models",
    **dict.fromkeys(_scheduler_exports(), "schedulers"),  # schedulers/registry.py lists them
    "DiffusionPipeline": "pipelines",
    "ImagePipelineOutput": "pipelines",
    "DDPMPipeline": "pipelines",
    "DDIMPipeline": "pipelines",
    "PNDMPipeline": "pipelines",
    "StableDiffusionPipeline": "pipelines",
    "StableDiffusionImg2ImgPipeline": "pipelines",
    "StableDiffusionInpaintPipeline": "pipelines",
    "LDMTextToImagePipeline": "pipelines",
    "ClassConditionalPipeline": "pipelines",
    "UnCLIPPipeline": "pipelines",
    "UnCLIPImageVariationPipeline": "pipelines",
    "StableDiffusionPipelineOutput": "pipelines",
    "IFPipeline": "pipelines",
    "IFImg2ImgPipeline": "pipelines",
    "IFSuperResolutionPipeline": "pipelines",
    "IFPipelineOutput": "pipelines",
    "GlidePipeline": "pipelines",
    "GlideInpaintPipeline": "pipelines",
    "GlideUpsamplePipeline": "pipelines",
    "GlideUpsampleInpaintPipeline": "pipelines",
    "patch": "patching",
    "unpatch": "patching",
}

__all__ = ["__version__", "kernels", *_EXPORTS]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
