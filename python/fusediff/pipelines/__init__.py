"""Pipelines: a model and a scheduler (and other components) held together for sampling."""

from .pipeline_ddim import DDIMPipeline
from .pipeline_ddpm import DDPMPipeline
from .pipeline_pndm import PNDMPipeline
from .pipeline_utils import DiffusionPipeline, ImagePipelineOutput, numpy_to_pil

__all__ = ["DDIMPipeline", "DDPMPipeline", "DiffusionPipeline", "ImagePipelineOutput", "PNDMPipeline",
           "numpy_to_pil"]
