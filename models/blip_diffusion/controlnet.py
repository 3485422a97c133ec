"""``BlipDiffusionControlNetPipeline``: subject-driven generation under structure control (paper 4.2, figure 4).

A drop-in for diffusers' deprecated ``BlipDiffusionControlNetPipeline``: ``__call__`` takes the same
arguments in the same order with the same defaults (the reference's spelling ``condtioning_image``
included, so that calls written for it keep working) and gives the same images for the same seed
(``bench/reference_parity.py``'s ControlNet case). Beyond it: several ControlNets at once, each with its
own conditioning image and scale (diffusers' ``MultiControlNetModel`` sums their residuals), any
Stable Diffusion 1.5 ControlNet added to a base checkpoint, and everything the base pipeline adds.

The control image is resized bicubic to the output size and scaled to [0, 1] without normalisation, as
the reference prepares it. Conditioning images that need no weights are computed here (Canny edges,
with the model card's thresholds 30/70); detectors with weights of their own (HED, depth) are not: give
their output as a ready image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from blipdiff.models.blip_diffusion import checkpoint
from blipdiff.models.blip_diffusion.checkpoint import CheckpointError
from blipdiff.models.blip_diffusion.image_processor import ImageInput, open_rgb
from blipdiff.models.blip_diffusion.pipeline import BlipDiffusionPipeline, BlipDiffusionPipelineOutput

CONTROL_TYPES = ("canny", "image")
CANNY_THRESHOLDS = (30, 70)  # Salesforce/blipdiffusion-controlnet's model card

ControlNetInput = Any  # a ControlNetModel, a hub id or a folder


def canny_edges(image: ImageInput, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1]) -> Image.Image:
    """White Canny edges on black as an RGB image, computed on the RGB pixels as the model card does."""
    import cv2

    if not 0 <= low <= high:
        raise ValueError(f"Canny thresholds must satisfy 0 <= low <= high, not {low} and {high}")
    edges = cv2.Canny(np.asarray(open_rgb(image)), low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def control_image(image: ImageInput, control_type: str = "image") -> Image.Image:
    """The conditioning image for ``control_type``: "canny" computes the edges, "image" takes the image
    as it is (an edge, depth, pose or HED map made elsewhere)."""
    if control_type not in CONTROL_TYPES:
        raise ValueError(f"control type must be one of {CONTROL_TYPES}, not {control_type!r}")
    return canny_edges(image) if control_type == "canny" else open_rgb(image)


def prepare_control_image(image: ImageInput, width: int, height: int) -> torch.Tensor:
    """[1, 3, H, W] in [0, 1]: resized bicubic to the output size, not normalised."""
    resized = open_rgb(image).resize((width, height), resample=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def load_controlnet(source: ControlNetInput, dtype: torch.dtype | None = None):
    """A ControlNetModel from a model, a folder (a ControlNet's own, or a BLIP-Diffusion checkpoint with a
    ``controlnet/`` folder) or a hub id (offline: from the Hugging Face cache), every key accounted for."""
    import diffusers

    if isinstance(source, diffusers.ControlNetModel):
        return source if dtype is None else source.to(dtype)
    path = Path(source).expanduser()
    if not path.exists():
        if not checkpoint.is_hub_id(str(source)):
            raise CheckpointError(f"controlnet {source}: no such folder (and not a hub id of the form owner/name)")
        path = checkpoint.fetch_controlnet(str(source))
    elif not (path / "config.json").is_file():
        if (path / "controlnet" / "config.json").is_file():
            return checkpoint.load_diffusers_model(diffusers.ControlNetModel, path, "controlnet", dtype or torch.float32)
        raise CheckpointError(f"controlnet {path}: no config.json (nor controlnet/config.json)")
    return checkpoint.load_diffusers_model(diffusers.ControlNetModel, path.parent, path.name, dtype or torch.float32,
                                           label=f"controlnet {source}")


class BlipDiffusionControlNetPipeline(BlipDiffusionPipeline):
    """BLIP-Diffusion with ControlNets. ``controlnet`` is one ``ControlNetModel`` (the official
    ``blipdiffusion-controlnet`` layout) or a ``MultiControlNetModel`` of several."""

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None,
                        controlnet: ControlNetInput | Sequence[ControlNetInput] | None = None,
                        ) -> BlipDiffusionControlNetPipeline:
        """Load a checkpoint in the official layout (hub id or folder) with the ControlNet its
        ``model_index.json`` lists, or with ``controlnet``: one or several ControlNets (models, hub ids
        or folders) for the base model's U-Net, which replace a listed one."""
        pipe = super().from_pretrained(model, torch_dtype=torch_dtype, load_controlnet=controlnet is None)
        if controlnet is not None:
            sources = [controlnet] if isinstance(controlnet, (str, os.PathLike)) or not isinstance(
                controlnet, Sequence) else list(controlnet)
            if not sources:
                raise ValueError("controlnet: an empty list; give one or more ControlNets")
            pipe.set_controlnets([load_controlnet(source, torch_dtype) for source in sources])  # checked there
        elif pipe.controlnet is None:
            raise CheckpointError(f"{model}: its model_index.json lists no controlnet; pass controlnet= "
                                  "(a Stable Diffusion 1.5 ControlNet: hub id or folder)")
        else:
            pipe._check_controlnets()
        return pipe.to(device) if device is not None else pipe

    def set_controlnets(self, nets: Sequence) -> None:
        """Use these ControlNets, in this order (one: as the official layout has it)."""
        from diffusers import MultiControlNetModel

        nets = list(nets)
        self.controlnet = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
        self._check_controlnets()

    @property
    def controlnets(self) -> list:
        from diffusers import MultiControlNetModel

        if self.controlnet is None:
            return []
        return list(self.controlnet.nets) if isinstance(self.controlnet, MultiControlNetModel) else [self.controlnet]

    def _check_controlnets(self) -> None:
        """A ControlNet made for another U-Net would fail deep inside the first step: say which and why."""
        unet = self.unet.config
        for position, net in enumerate(self.controlnets):
            config = net.config
            for key in ("cross_attention_dim", "block_out_channels", "in_channels"):
                if tuple(np.atleast_1d(config[key])) != tuple(np.atleast_1d(unet[key])):
                    raise CheckpointError(f"controlnet {position + 1}: {key} {config[key]} does not match the "
                                          f"U-Net's {unet[key]}; it was made for another base model")

    # ------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        reference_image: ImageInput | list[ImageInput] | None = None,
        condtioning_image: ImageInput | list | None = None,
        source_subject_category: str | list[str] | None = None,
        target_subject_category: str | list[str] | None = None,
        latents: torch.Tensor | None = None,
        guidance_scale: float = 7.5,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        neg_prompt: str | list[str] | None = "",
        prompt_strength: float = 1.0,
        prompt_reps: int = 20,
        output_type: str | None = "pil",
        return_dict: bool = True,
        *,
        subject_embeds: torch.Tensor | None = None,
        reference_weights: Sequence[float] | None = None,
        num_images_per_prompt: int = 1,
        controlnet_conditioning_scale: float | Sequence[float] = 1.0,
    ) -> BlipDiffusionPipelineOutput | tuple:
        """As ``BlipDiffusionPipeline.__call__``, under the control of ``condtioning_image`` (the
        reference's spelling): with one ControlNet, an image for every prompt or a list of one per
        prompt; with several, a list of one such entry per ControlNet, in their order.
        ``controlnet_conditioning_scale`` weighs each ControlNet's residuals (one value, or one per
        ControlNet; 0 switches one off)."""
        nets = self.controlnets
        if not nets:
            raise ValueError("this pipeline has no ControlNet")
        scales = self._scales(controlnet_conditioning_scale, len(nets))
        per_net = self._images_per_net(condtioning_image, len(nets))
        context, guided, batch = self._prepare(
            prompt, reference_image, source_subject_category, target_subject_category, guidance_scale, height, width,
            neg_prompt, prompt_strength, prompt_reps, output_type, subject_embeds, reference_weights,
            num_images_per_prompt)
        count = batch // num_images_per_prompt
        dtype = nets[0].dtype
        conditions = [self._condition(images, count, num_images_per_prompt, width, height, guided).to(self.device, dtype)
                      for images in per_net]

        # One ControlNet takes its image and scale bare; MultiControlNetModel takes lists.
        condition, scale = (conditions[0], scales[0]) if len(nets) == 1 else (conditions, scales)

        def residuals(model_input: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> dict[str, Any]:
            down, mid = self.controlnet(model_input, t, encoder_hidden_states=context, controlnet_cond=condition,
                                        conditioning_scale=scale, return_dict=False)
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

        latents = self._denoise(batch, height, width, num_inference_steps, guidance_scale, generator, latents, context,
                                residuals)
        images = self.decode(latents, output_type or "pil")
        return BlipDiffusionPipelineOutput(images=images) if return_dict else (images,)

    @staticmethod
    def _scales(scale: float | Sequence[float], nets: int) -> list[float]:
        scales = [float(scale)] * nets if isinstance(scale, (int, float)) else [float(value) for value in scale]
        if len(scales) != nets:
            raise ValueError(f"controlnet_conditioning_scale: {len(scales)} values for {nets} ControlNets")
        return scales

    @staticmethod
    def _images_per_net(images, nets: int) -> list:
        if images is None:
            raise ValueError("condtioning_image is missing: the control image (edges, depth, ...) to follow")
        if nets == 1:
            return [images]
        if not isinstance(images, (list, tuple)) or len(images) != nets:
            raise ValueError(f"{nets} ControlNets need a list of {nets} conditioning images, one per ControlNet")
        return list(images)

    @staticmethod
    def _condition(images, count: int, per_prompt: int, width: int, height: int, guided: bool) -> torch.Tensor:
        """One ControlNet's conditioning batch: one image for every image, or one per prompt repeated for
        its images; duplicated for the unconditional half under guidance."""
        if isinstance(images, (list, tuple)):
            if len(images) not in (1, count):
                raise ValueError(f"{len(images)} conditioning images for {count} prompts: give one, or one per prompt")
            stacked = torch.cat([prepare_control_image(image, width, height) for image in images])
        else:
            stacked = prepare_control_image(images, width, height)
        stacked = stacked.repeat_interleave(count * per_prompt if stacked.shape[0] == 1 else per_prompt, dim=0)
        return torch.cat([stacked] * 2) if guided else stacked
