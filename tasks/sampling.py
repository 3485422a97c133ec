"""What generate, edit and interpolate share: their sampling settings, loading the pipeline they sample
with, and the one way an image is drawn (also the evaluation's)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

from blipdiff.infra.inputs import ImageSide
from blipdiff.models.devices import AUTO, DEVICE_HELP, DTYPE_HELP, DType
from blipdiff.models.sampling import set_scheduler

RUN_FILE = "run.json"


class Sampling(BaseModel):
    """How the pictures are sampled; the defaults are the Python API's (empty negative prompt, 50 steps,
    guidance 7.5, 512²), on the GPU in float16 when there is one, else on the CPU in float32."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    negative_prompt: str = Field("", description="Negative prompt (classifier-free guidance): what the pictures "
                                                 "should not show.")
    steps: int = Field(50, ge=1, description="Denoising steps.")
    guidance: float = Field(7.5, ge=0, description="Classifier-free guidance scale (1 or less: no guidance).")
    seed: int = Field(0, ge=0, description="Seed of the CPU generator.")
    height: ImageSide = Field(512, description="Image height, a multiple of 8.")
    width: ImageSide = Field(512, description="Image width, a multiple of 8.")
    dtype: DType = Field(AUTO, description=DTYPE_HELP)
    device: str = Field(AUTO, description=DEVICE_HELP)


class ScheduledSampling(Sampling):
    scheduler: Literal["pndm", "ddim", "dpm"] = Field("pndm", description="The denoising scheduler: pndm, ddim or dpm.")


def described(name: str, description: str) -> FieldInfo:
    """Sampling's field ``name`` (default and constraints as they are) with a command's own description:
    what it means there (edit's steps are DDIM's, interpolate's seed is every cell's). Annotate the override
    with the plain type (``height: int``): the field brings its constraints and validators along."""
    return FieldInfo.merge_field_infos(Sampling.model_fields[name], description=description)


def check_blend(images: int, image_subjects: list[str], weights: list[float] | None) -> None:
    """Per-image subjects and weights of a blend of reference photos: one per photo; weights
    non-negative with a positive sum."""
    if image_subjects and len(image_subjects) != images:
        raise ValueError(f"{len(image_subjects)} image subjects for {images} reference images; give one per image")
    if weights is not None:
        if len(weights) != images:
            raise ValueError(f"{len(weights)} weights for {images} reference images; give one per image")
        if any(weight < 0 for weight in weights) or sum(weights) <= 0:
            raise ValueError(f"weights {weights}: each must be non-negative and their sum positive")


def load_blip_diffusion(model: str, dtype, device: str, scheduler: str | None = None, controlnets=None,
                        control: bool = False):
    """A BLIP-Diffusion pipeline (with its ControlNets when ``control``) on ``device``, its progress bar
    off, with ``scheduler`` when given (else the checkpoint's own)."""
    from blipdiff.models.blip_diffusion import BlipDiffusionControlNetPipeline, BlipDiffusionPipeline

    if control:
        pipe = BlipDiffusionControlNetPipeline.from_pretrained(model, torch_dtype=dtype, device=device,
                                                               controlnet=controlnets or None)
    else:
        pipe = BlipDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, device=device, load_controlnet=False)
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, prompt: str, *, method: str, steps: int, guidance: float, height: int, width: int,
           negative_prompt: str, generator, **conditioning):
    """One image: DreamBooth's Stable Diffusion pipeline takes the prompt as it is; BLIP-Diffusion's takes
    the subject (``subject_embeds`` and ``target_subject_category``, or ``raw_prompt``) and any control
    images in ``conditioning``."""
    if method == "dreambooth":
        return pipe(prompt, negative_prompt=negative_prompt, guidance_scale=guidance, height=height, width=width,
                    num_inference_steps=steps, generator=generator).images[0]
    return pipe(prompt, guidance_scale=guidance, height=height, width=width, num_inference_steps=steps,
                neg_prompt=negative_prompt, generator=generator, **conditioning).images[0]
