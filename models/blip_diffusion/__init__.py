"""BLIP-Diffusion on current transformers and diffusers: the released checkpoint's architecture, its
loading and saving, and the generation pipeline.

    from blipdiff.models.blip_diffusion import BlipDiffusionPipeline
    pipe = BlipDiffusionPipeline.from_pretrained("Salesforce/blipdiffusion")
    control = BlipDiffusionControlNetPipeline.from_pretrained("Salesforce/blipdiffusion-controlnet")
"""

from blipdiff.models.blip_diffusion.checkpoint import CheckpointError
from blipdiff.models.blip_diffusion.controlnet import BlipDiffusionControlNetPipeline
from blipdiff.models.blip_diffusion.image_processor import SubjectImageProcessor
from blipdiff.models.blip_diffusion.pipeline import BlipDiffusionPipeline, BlipDiffusionPipelineOutput
from blipdiff.models.blip_diffusion.subject_encoder import SubjectEncoder
from blipdiff.models.blip_diffusion.text_encoder import ContextCLIPTextModel

__all__ = ["BlipDiffusionControlNetPipeline", "BlipDiffusionPipeline", "BlipDiffusionPipelineOutput", "CheckpointError", "ContextCLIPTextModel",
           "SubjectEncoder", "SubjectImageProcessor"]
