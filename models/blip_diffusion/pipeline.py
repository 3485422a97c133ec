"""``BlipDiffusionPipeline``: zero-shot subject-driven generation with the released checkpoint.

A drop-in for diffusers' deprecated ``BlipDiffusionPipeline``: ``__call__`` takes the same arguments
in the same order with the same defaults, and gives the same images for the same seed (measured by
``bench/reference_parity.py``). Beyond it: several reference images averaged into one subject, one
subject for a batch of prompts, ready-made ``subject_embeds``, ``num_images_per_prompt``, any diffusers
scheduler, bf16/fp16, a progress bar, and loading offline.

It is a plain class, not a ``diffusers.DiffusionPipeline``: diffusers' loader resolves each component
through the library named in ``model_index.json``, and the released checkpoint names a
``blip_diffusion`` library that current diffusers no longer has.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from blipdiff.infra.atomic import atomic_folder
from blipdiff.models.blip_diffusion import checkpoint
from blipdiff.models.blip_diffusion.checkpoint import CheckpointError
from blipdiff.models.blip_diffusion.image_processor import ImageInput, SubjectImageProcessor, postprocess
from blipdiff.models.blip_diffusion.subject_encoder import SubjectEncoder
from blipdiff.models.blip_diffusion.text_encoder import ContextCLIPTextModel

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class BlipDiffusionPipelineOutput:
    """``images``: PIL images, an [N, H, W, 3] array or an [N, 3, H, W] tensor, per ``output_type``."""
    images: list[Image.Image] | np.ndarray | torch.Tensor


def _as_list(value: str | Sequence[str] | None, count: int, name: str) -> list[str] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    values = values * count if len(values) == 1 else values
    if len(values) != count:
        raise ValueError(f"{name}: {len(values)} values for {count} prompts")
    return values


def blend_embeddings(embeds: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """The mean [1, Q, D] of subject embeddings [N, Q, D], weighted by ``weights`` (normalised to sum to 1)."""
    if weights is None:
        return embeds.mean(dim=0, keepdim=True)
    weight = torch.as_tensor([float(value) for value in weights], dtype=torch.float32)
    if weight.shape != (len(embeds),) or (weight < 0).any() or weight.sum() <= 0:
        raise ValueError(f"weights: one non-negative weight per image ({len(embeds)}), not all zero; got {list(weights)}")
    weight = (weight / weight.sum()).to(embeds.device, embeds.dtype)
    return (embeds * weight[:, None, None]).sum(dim=0, keepdim=True)


class BlipDiffusionPipeline:
    def __init__(self, tokenizer, text_encoder: ContextCLIPTextModel, vae, unet, scheduler, qformer: SubjectEncoder,
                 image_processor: SubjectImageProcessor, subject_tokenizer, ctx_begin_pos: int = 2,
                 controlnet=None, index: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.vae = vae
        self.unet = unet
        self.scheduler = scheduler
        self.qformer = qformer
        self.image_processor = image_processor
        self.subject_tokenizer = subject_tokenizer
        self.ctx_begin_pos = ctx_begin_pos
        self.controlnet = controlnet
        # model_index.json as read, so that saving keeps what this class does not use.
        self._index = dict(index or {})
        self._subject: Path | None = None
        self._progress_bar_config: dict[str, Any] = {}

    # ----------------------------------------------------------------- loading, saving, placement
    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, load_controlnet: bool = True) -> BlipDiffusionPipeline:
        """Load a checkpoint in the official layout: a hub id (downloaded, or found in the cache
        offline) or a local folder. Raises ``CheckpointError`` saying what is missing or wrong.
        ``load_controlnet``: also the ControlNet(s) ``model_index.json`` lists, kept when saving."""
        import diffusers
        import transformers
        from transformers import Blip2Config, CLIPTextConfig

        root = checkpoint.resolve(model)
        index = checkpoint.read_index(root)
        qformer_config = checkpoint.read_json(root / "qformer" / "config.json")
        qformer = checkpoint.load_module(SubjectEncoder, checkpoint.parse_config(Blip2Config, qformer_config, "qformer"),
                                         root / "qformer", "qformer")
        text_config = checkpoint.parse_config(
            CLIPTextConfig, checkpoint.read_json(root / "text_encoder" / "config.json"), "text_encoder")
        text_encoder = checkpoint.load_module(ContextCLIPTextModel, text_config, root / "text_encoder", "text_encoder")
        dtype = torch_dtype or torch.float32
        unet = checkpoint.load_diffusers_model(diffusers.UNet2DConditionModel, root, "unet", dtype)
        vae = checkpoint.load_diffusers_model(diffusers.AutoencoderKL, root, "vae", dtype)
        controlnet = checkpoint.load_controlnets(root, index, dtype) if load_controlnet else None
        scheduler_class = getattr(diffusers, index["scheduler"][1], None)
        if scheduler_class is None:
            raise CheckpointError(f"scheduler: diffusers has no {index['scheduler'][1]}")
        try:
            scheduler = scheduler_class.from_pretrained(root, subfolder="scheduler")
        except (OSError, ValueError, TypeError) as error:
            raise CheckpointError(f"scheduler: cannot load {root / 'scheduler'} ({error})") from error
        tokenizer_class = getattr(transformers, index["tokenizer"][1], transformers.CLIPTokenizer)
        try:
            tokenizer = tokenizer_class.from_pretrained(root / "tokenizer")
        except (OSError, ValueError) as error:
            raise CheckpointError(f"tokenizer: cannot load {root / 'tokenizer'} ({error})") from error
        checkpoint.require_vocabulary(tokenizer, root / "tokenizer", text_config.vocab_size)
        image_processor = SubjectImageProcessor.from_config(
            checkpoint.read_json(root / "image_processor" / "preprocessor_config.json"),
            mean=index.get("mean"), std=index.get("std"))
        subject_tokenizer = checkpoint.load_subject_tokenizer(root, qformer_config)
        checkpoint.require_vocabulary(subject_tokenizer, "the subject tokenizer",
                                      qformer.embeddings.word_embeddings.num_embeddings)
        pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler,
                   qformer=qformer, image_processor=image_processor, subject_tokenizer=subject_tokenizer,
                   ctx_begin_pos=int(index.get("ctx_begin_pos", 2)), controlnet=controlnet, index=index)
        qformer.to(dtype)
        text_encoder.to(dtype)
        return pipe.to(device) if device is not None else pipe

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the official layout, weights as safetensors, plus the subject tokenizer in
        ``qformer/tokenizer/`` so the folder loads offline. Built beside ``folder`` and renamed into
        place: an interrupted save leaves no half-written checkpoint."""
        target = Path(folder)
        if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or
                                                          (target / "model_index.json").is_file())):
            raise FileExistsError(f"{target} exists and is not a checkpoint; refusing to replace it")
        with atomic_folder(target) as staging:
            self.write_layout(staging)

    def write_layout(self, root: Path) -> None:
        """The official layout into the existing folder ``root`` (``save_pretrained`` makes it atomic)."""
        import diffusers

        for name in ("qformer", "text_encoder"):
            (root / name).mkdir()
        qformer_config = self.qformer.config.to_dict()
        # The saved copy of the subject tokenizer is the one to read: an entry naming another place
        # would take precedence over it and tie the checkpoint to that place.
        qformer_config.pop("tokenizer", None)
        (root / "qformer" / "config.json").write_text(json.dumps(qformer_config, indent=2, sort_keys=True) + "\n")
        checkpoint.save_module(self.qformer, root / "qformer")
        checkpoint.save_tokenizer(self.subject_tokenizer, root / "qformer" / checkpoint.SUBJECT_TOKENIZER_COPY)
        text_config = self.text_encoder.config.to_dict()
        text_config["architectures"] = ["ContextCLIPTextModel"]
        (root / "text_encoder" / "config.json").write_text(json.dumps(text_config, indent=2, sort_keys=True) + "\n")
        checkpoint.save_module(self.text_encoder, root / "text_encoder")
        checkpoint.save_tokenizer(self.tokenizer, root / "tokenizer")
        self.unet.save_pretrained(root / "unet", safe_serialization=True)
        self.vae.save_pretrained(root / "vae", safe_serialization=True)
        self.scheduler.save_pretrained(root / "scheduler")
        (root / "image_processor").mkdir()
        (root / "image_processor" / "preprocessor_config.json").write_text(
            json.dumps(self.image_processor.to_config(), indent=2, sort_keys=True) + "\n")
        index = {
            **self._index, "_class_name": "BlipDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "ctx_begin_pos": self.ctx_begin_pos, "mean": list(self.image_processor.mean),
            "std": list(self.image_processor.std),
            "qformer": ["blip_diffusion", "Blip2QFormerModel"],
            "text_encoder": ["blip_diffusion", "ContextCLIPTextModel"],
            "image_processor": ["blip_diffusion", "BlipImageProcessor"],
            "tokenizer": ["transformers", type(self.tokenizer).__name__.removesuffix("Fast")],
            "unet": ["diffusers", type(self.unet).__name__], "vae": ["diffusers", type(self.vae).__name__],
            "scheduler": ["diffusers", type(self.scheduler).__name__]}
        index.pop("controlnet", None)
        if self.controlnet is not None:
            # Several ControlNets (MultiControlNetModel) go to controlnet/, controlnet_1/, ..., as diffusers saves them.
            self.controlnet.save_pretrained(str(root / "controlnet"), safe_serialization=True)
            index["controlnet"] = ["diffusers", type(self.controlnet).__name__]
        (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    @property
    def _models(self) -> list[torch.nn.Module]:
        return [m for m in (self.qformer, self.text_encoder, self.unet, self.vae, self.controlnet) if m is not None]

    def to(self, *args: str | torch.device | torch.dtype, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None) -> BlipDiffusionPipeline:
        """Like diffusers' ``pipe.to``: ``to("cuda")``, ``to(torch.float16)``, ``to("cuda", torch.float16)``
        or by keyword."""
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        for model in self._models:
            if dtype is not None:
                model.to(dtype=dtype)
            if device is not None:
                model.to(device=device)
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def components(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "text_encoder": self.text_encoder, "vae": self.vae, "unet": self.unet,
                "scheduler": self.scheduler, "qformer": self.qformer, "image_processor": self.image_processor,
                "subject_tokenizer": self.subject_tokenizer, "controlnet": self.controlnet}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm's options for the denoising loop's bar, e.g. ``disable=True``."""
        self._progress_bar_config = kwargs

    # ----------------------------------------------------------------------------- the subject
    @torch.no_grad()
    def subject_embedding(self, images: ImageInput | Sequence[ImageInput], subject: str | Sequence[str],
                          weights: Sequence[float] | None = None) -> torch.Tensor:
        """The subject embedding [1, num_query_tokens, hidden] of one reference image, or the (weighted)
        mean over several: photos of one subject, or of different subjects (``subject`` then names each
        image's category) to blend them (paper figure 9's subject interpolation)."""
        return blend_embeddings(self.subject_embeddings(images, subject), weights)

    def subject_embeddings(self, images: ImageInput | Sequence[ImageInput], subject: str | Sequence[str]) -> torch.Tensor:
        """Each reference image's subject embedding, [len(images), num_query_tokens, hidden]; ``subject`` is the
        category of them all or of each."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("no reference image")
        subjects = [subject] * len(images) if isinstance(subject, str) else list(subject)
        if len(subjects) != len(images):
            raise ValueError(f"{len(subjects)} subject texts for {len(images)} images: give one, or one per image")
        if any(not isinstance(text, str) or not text.strip() for text in subjects):
            raise ValueError("the subject text is empty: name the subject's category, e.g. 'dog'")
        # One Q-Former batch per subject text: padding one text to another's length would change its
        # embedding in the last bits, and a blend at weights 1/0 would then differ from the subject alone.
        embeds = torch.empty(0)
        for text in dict.fromkeys(subjects):
            positions = [position for position, name in enumerate(subjects) if name == text]
            pixels = self.image_processor.preprocess([images[position] for position in positions]).to(
                self.device, self.qformer.query_tokens.dtype)
            tokens = self.subject_tokenizer([text] * len(positions), return_tensors="pt", padding=True)
            group = self.qformer(pixels, tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device))
            if embeds.numel() == 0:
                embeds = group.new_empty((len(images), *group.shape[1:]))
            embeds[positions] = group
        return embeds

    def load_subject(self, folder: str | os.PathLike) -> torch.Tensor:
        """Apply a subject checkpoint from ``blipdiff finetune`` (its U-Net or LoRA adapter) and return its
        subject embedding [1, Q, D], to pass as ``subject_embeds``. One subject per loaded pipeline: the
        U-Net changes, so load the base model again for another subject."""
        from blipdiff.models.blip_diffusion.subject_checkpoint import apply_subject

        if self._subject is not None:
            raise ValueError(f"the subject checkpoint {self._subject} is already applied; load the base model "
                             "again for another subject")
        folder = Path(folder)
        self.unet, embeds = apply_subject(self.unet, folder)
        self._subject = folder
        return embeds.to(self.device, self.qformer.query_tokens.dtype)

    def edit(self, prompt: str, subject: str, edit_token: str, reference_image: ImageInput | list[ImageInput] | None = None,
             **options: Any):
        """Subject-driven editing with attention control: the subject in place of ``edit_token`` in a source
        picture, generated (``source_prompt=``, ``generator=``) or a real photo (``source_image=``). Returns
        an ``EditOutput`` (edited image, source image, mask); the options are
        ``attention_control.edit``'s."""
        from blipdiff.models.blip_diffusion import attention_control

        return attention_control.edit(self, prompt, subject, edit_token, reference_image, **options)

    # ------------------------------------------------------------------------------ the prompt
    @staticmethod
    def _build_prompt(prompts: Sequence[str], targets: Sequence[str], prompt_strength: float,
                      prompt_reps: int) -> list[str]:
        """The released recipe: "a {target} {prompt}" repeated to amplify it (the tokenizer's truncation
        keeps about ten of the twenty)."""
        return [", ".join([f"a {target} {prompt.strip()}"] * int(prompt_strength * prompt_reps))
                for prompt, target in zip(prompts, targets)]

    @torch.no_grad()
    def encode_prompt(self, subject_embeds: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts with the subject embeddings [len(prompts), Q, D] spliced in → the U-Net's context."""
        length = self.text_encoder.config.max_position_embeddings - subject_embeds.shape[1]
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=length,
                             return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids, subject_embeds.to(self.device), self.ctx_begin_pos)

    @torch.no_grad()
    def encode_plain(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts without subject embeddings (the negative prompt), to the full 77 tokens: Stable Diffusion's way."""
        ids = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.text_encoder.config.max_position_embeddings,
                             return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)

    # ------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        reference_image: ImageInput | list[ImageInput] | None = None,
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
        raw_prompt: bool = False,
    ) -> BlipDiffusionPipelineOutput | tuple:
        """Generate ``num_images_per_prompt`` images for each prompt.

        ``reference_image`` is one image or a list of images of the same subject, averaged (weighted by
        ``reference_weights``); it serves every prompt. A list exactly as long as a list of several
        prompts pairs one reference (an image, or a list of images averaged) with each prompt instead,
        as the released pipeline does. ``source_subject_category`` names it (one, or one
        per prompt); ``target_subject_category`` (default: the source) goes into the prompt.
        ``subject_embeds`` ([1 or len(prompt), Q, D], e.g. from ``subject_embedding``) replaces the
        reference image. ``generator`` may be one generator or one per image. ``raw_prompt``: each prompt
        goes to the text encoder as given, without the template and its repetition (a protocol's own text)."""
        context, guided, batch = self._prepare(
            prompt, reference_image, source_subject_category, target_subject_category, guidance_scale, height, width,
            neg_prompt, prompt_strength, prompt_reps, output_type, subject_embeds, reference_weights,
            num_images_per_prompt, raw_prompt=raw_prompt)
        latents = self._denoise(batch, height, width, num_inference_steps, guidance_scale, generator, latents, context)
        images = self.decode(latents, output_type or "pil")
        return BlipDiffusionPipelineOutput(images=images) if return_dict else (images,)

    def _prepare(self, prompt, reference_image, source_subject_category, target_subject_category, guidance_scale: float,
                 height: int, width: int, neg_prompt, prompt_strength: float, prompt_reps: int, output_type: str | None,
                 subject_embeds: torch.Tensor | None, reference_weights, num_images_per_prompt: int,
                 raw_prompt: bool = False) -> tuple[torch.Tensor, bool, int]:
        """Check the arguments and encode the prompts: the U-Net's context ([negatives;] prompts, each
        repeated ``num_images_per_prompt`` times), whether guidance is on, and the number of images."""
        output_type = output_type or "pil"
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, not {output_type!r}")
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, not {height}x{width}")
        if num_images_per_prompt < 1:
            raise ValueError("num_images_per_prompt must be at least 1")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        count = len(prompts)
        sources = _as_list(source_subject_category, count, "source_subject_category")
        targets = _as_list(target_subject_category, count, "target_subject_category") or sources
        if targets is None and not raw_prompt:
            raise ValueError("target_subject_category (or source_subject_category) names the subject in the prompt")
        embeds = self._subject_embeds(count, reference_image, sources, subject_embeds, reference_weights)

        texts = prompts if raw_prompt else self._build_prompt(prompts, targets, prompt_strength, prompt_reps)
        context = self.encode_prompt(embeds, texts)
        guided = guidance_scale > 1.0
        if guided:
            negative = _as_list("" if neg_prompt is None else neg_prompt, count, "neg_prompt")
            context = torch.cat([self.encode_plain(negative), context])
        if num_images_per_prompt > 1:
            groups = 2 if guided else 1
            context = context.view(groups, count, *context.shape[1:]).repeat_interleave(
                num_images_per_prompt, dim=1).flatten(0, 1)
        return context, guided, count * num_images_per_prompt

    def _denoise(self, batch: int, height: int, width: int, num_inference_steps: int, guidance_scale: float, generator,
                 latents: torch.Tensor | None, context: torch.Tensor,
                 residuals: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, Any]] | None = None,
                 ) -> torch.Tensor:
        """The denoising loop from the initial noise to the final latents. ``residuals(model_input, t,
        context)`` gives extra U-Net arguments at each step (a ControlNet's residuals)."""
        guided = guidance_scale > 1.0
        # The scheduler indexes its CPU tables with CPU timesteps; the U-Net gets them copied to the device
        # once, not a CPU scalar per step (a blocking copy that no CUDA graph can hold). Set before the noise
        # is scaled: sigma-based schedulers (Euler, ...) derive init_noise_sigma from them.
        self.scheduler.set_timesteps(num_inference_steps)
        device_timesteps = self.scheduler.timesteps.to(self.device)
        latents = self._initial_latents(batch, height, width, generator, latents)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        context = context.to(self.unet.dtype)
        for index, t in enumerate(tqdm(self.scheduler.timesteps, **self._progress_bar_config)):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t).to(self.unet.dtype)
            extra = residuals(model_input, device_timesteps[index], context) if residuals is not None else {}
            noise = self.unet(model_input, device_timesteps[index], encoder_hidden_states=context, **extra).sample.float()
            if guided:
                unconditional, conditional = noise.chunk(2)
                noise = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(noise, t, latents, **step_kwargs).prev_sample
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> list[Image.Image] | np.ndarray | torch.Tensor:
        """Latents → images, as ``output_type``."""
        decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return postprocess(decoded, output_type)

    def _subject_embeds(self, count: int, reference_image, sources: list[str] | None,
                        subject_embeds: torch.Tensor | None, weights: Sequence[float] | None) -> torch.Tensor:
        """[count, Q, D]: the given embeddings; or, for a list of references as long as the list of
        prompts (more than one), one reference (an image or a list of images) per prompt, paired as the
        released pipeline pairs them; or else every reference averaged, once per distinct source category."""
        if subject_embeds is not None:
            size = (self.qformer.num_query_tokens, self.text_encoder.config.hidden_size)
            if subject_embeds.ndim != 3 or subject_embeds.shape[0] not in (1, count) \
                    or tuple(subject_embeds.shape[1:]) != size:
                raise ValueError(f"subject_embeds must be [1 or {count}, {size[0]}, {size[1]}], "
                                 f"not {list(subject_embeds.shape)}")
            return subject_embeds.expand(count, -1, -1).to(self.device)
        if reference_image is None or sources is None:
            raise ValueError("give reference_image and source_subject_category, or subject_embeds")
        if isinstance(reference_image, (list, tuple)) and count > 1 and len(reference_image) == count:
            if weights is not None:
                raise ValueError("reference_weights weigh one shared list of references, not one reference per prompt")
            return torch.cat([self.subject_embedding(images, source) for images, source in zip(reference_image, sources)])
        by_source = {source: self.subject_embedding(reference_image, source, weights) for source in dict.fromkeys(sources)}
        return torch.cat([by_source[source] for source in sources])

    def _initial_latents(self, batch: int, height: int, width: int, generator, latents: torch.Tensor | None) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} images: give one, or one per image")
        if latents is None:
            # Drawn in float32 whatever the model's dtype, so bf16 and fp16 start from the fp32 noise.
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have the shape {list(shape)}, not {list(latents.shape)}")
        return latents.to(self.device, torch.float32) * self.scheduler.init_noise_sigma
