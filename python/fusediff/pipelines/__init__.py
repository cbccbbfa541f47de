"""Pipelines: a model and a scheduler (and other components) held together for sampling."""

from .pipeline_ddim import DDIMPipeline
from .pipeline_ddpm import DDPMPipeline
from .pipeline_pndm import PNDMPipeline
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput, numpy_to_pil

from ..utils.lazy import lazy_exports

# exported on first use (utils/lazy.py): name -> submodule
_LAZY = {
    "StableDiffusionPipeline": "pipeline_stable_diffusion",
    "StableDiffusionPipelineOutput": "pipeline_stable_diffusion",
    "StableDiffusionImg2ImgPipeline": "pipeline_stable_diffusion_img2img",
    "StableDiffusionInpaintPipeline": "pipeline_stable_diffusion_inpaint",
    "LDMTextToImagePipeline": "pipeline_latent_diffusion",
    "ClassConditionalPipeline": "pipeline_class_conditional",
    "UnCLIPPipeline": "pipeline_unclip",
    "UnCLIPImageVariationPipeline": "pipeline_unclip_image_variation",
    "IFPipeline": "pipeline_if",
    "IFPipelineOutput": "pipeline_if",
    "IFImg2ImgPipeline": "pipeline_if_img2img",
    "IFSuperResolutionPipeline": "pipeline_if_superresolution",
    "GlidePipeline": "pipeline_glide",
    "GlideInpaintPipeline": "pipeline_glide",
    "GlideUpsamplePipeline": "pipeline_glide_upsample",
    "GlideUpsampleInpaintPipeline": "pipeline_glide_upsample",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

__all__ = ["DDIMPipeline", "DDPMPipeline", "DiffusionPipeline", "ImagePipelineOutput", "PNDMPipeline",
           "numpy_to_pil", *_LAZY]
