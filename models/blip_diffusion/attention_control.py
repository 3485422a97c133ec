"""Subject-driven editing with attention control (paper 4.2, figure 5): put a subject into a picture in
place of one of its words, leaving the rest of the picture as it was.

The source picture's denoising is known: generated from a text and a seed (``text_trajectory``), or
derived from a real photo by DDIM inversion (``invert``). The edit then denoises two branches in one
batch: the source, replayed from that known trajectory, and the edited branch, whose text has the
subject embeddings and the subject's name where the source text has the edited word. In every
cross-attention layer of the U-Net the edited branch keeps the source's attention maps for the tokens
the two texts share (Prompt-to-Prompt's attention refinement, for the first ``cross_replace_steps`` of
the steps), while the subject's tokens get maps of their own. The maps of the edited word (source) and
of the subject (edited branch), accumulated over the steps so far, give the edited region; after every
step the latents outside it are the source's. The decoded result is composited the same way, so that
outside the region the edited picture is the source picture, pixel for pixel (the VAE decoder's
receptive field would otherwise blur the seam a little into the kept region).

diffusers has the pieces (DDIM, its inverse scheduler, attention processors) but no attention-control
editing for a model whose prompt holds inserted subject embeddings, so the controller is written here.
Everything runs with DDIM, whose steps are deterministic and invertible.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from blipdiff.models.blip_diffusion.image_processor import ImageInput, open_rgb, to_signed_tensor
from blipdiff.models.sampling import CROSS_REPLACE_STEPS, MASK_THRESHOLD



@dataclass
class EditOutput:
    """The edited picture, the source picture and the edited region (white), as PIL images."""

    image: Image.Image
    source: Image.Image
    mask: Image.Image


def _ddim(pipe, inverse: bool = False):
    """DDIM (or its inverse) on the checkpoint's noise schedule, without clipping the predicted clean
    latents (Stable Diffusion's own DDIM setting): a clipped step cannot be inverted."""
    import diffusers

    scheduler = diffusers.DDIMInverseScheduler if inverse else diffusers.DDIMScheduler
    return scheduler.from_config(pipe.scheduler.config, clip_sample=False)


def _token_ids(pipe, text: str, length: int) -> list[int]:
    return pipe.tokenizer(text, padding="max_length", truncation=True, max_length=length).input_ids


def _word_positions(pipe, ids: Sequence[int], word: str, what: str) -> list[int]:
    """Where the tokens of ``word`` stand in ``ids`` (its first occurrence)."""
    word_ids = pipe.tokenizer(word.strip(), add_special_tokens=False).input_ids
    if not word.strip() or not word_ids:
        raise ValueError(f"the {what} is empty")
    for start in range(len(ids) - len(word_ids) + 1):
        if list(ids[start:start + len(word_ids)]) == word_ids:
            return list(range(start, start + len(word_ids)))
    text = pipe.tokenizer.decode(ids, skip_special_tokens=True)
    raise ValueError(f"the {what} {word!r} is not in the text {text!r}")


def _guided_noise(pipe, latents: torch.Tensor, t, context: torch.Tensor, negative: torch.Tensor | None,
                  guidance_scale: float) -> torch.Tensor:
    """The (guided) noise prediction for a batch of latents, ``context`` one row per latent."""
    if negative is None:
        return pipe.unet(latents.to(pipe.unet.dtype), t, encoder_hidden_states=context.to(pipe.unet.dtype)).sample.float()
    both = torch.cat([latents] * 2).to(pipe.unet.dtype)
    contexts = torch.cat([negative.expand(len(latents), -1, -1), context]).to(pipe.unet.dtype)
    unconditional, conditional = pipe.unet(both, t, encoder_hidden_states=contexts).sample.float().chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


@torch.no_grad()
def text_trajectory(pipe, text: str, latents: torch.Tensor, num_inference_steps: int = 50,
                    guidance_scale: float = 7.5, neg_prompt: str = "") -> list[torch.Tensor]:
    """Stable Diffusion's generation of ``text`` (no subject) with DDIM from ``latents`` (the initial
    noise, already scaled): the latents before every step and after the last, noisiest first."""
    scheduler = _ddim(pipe)
    scheduler.set_timesteps(num_inference_steps)
    context = pipe.encode_plain([text])
    negative = pipe.encode_plain([neg_prompt]) if guidance_scale > 1.0 else None
    trajectory = [latents.float()]
    for t in tqdm(scheduler.timesteps, **pipe._progress_bar_config):
        noise = _guided_noise(pipe, trajectory[-1], t, context, negative, guidance_scale)
        trajectory.append(scheduler.step(noise, t, trajectory[-1]).prev_sample)
    return trajectory


def source_pixels(image: ImageInput, width: int, height: int) -> Image.Image:
    """A real photo as the edit sees it: resized bicubic to the output size."""
    return open_rgb(image).resize((width, height), resample=Image.Resampling.BICUBIC)


@torch.no_grad()
def invert(pipe, image: ImageInput, text: str, num_inference_steps: int = 50, height: int = 512,
           width: int = 512) -> list[torch.Tensor]:
    """DDIM inversion of a real photo described by ``text``: the latents that DDIM's denoising of
    ``text`` (unguided) passes through to arrive at the photo's latents, noisiest first, as
    ``text_trajectory`` gives them. Denoising unguided from the first comes back close to the photo."""
    pixels = to_signed_tensor(source_pixels(image, width, height))[None].to(pipe.device, pipe.vae.dtype)
    clean = pipe.vae.encode(pixels).latent_dist.mean.float() * pipe.vae.config.scaling_factor
    scheduler = _ddim(pipe, inverse=True)
    scheduler.set_timesteps(num_inference_steps)
    context = pipe.encode_plain([text])
    trajectory = [clean]
    for t in tqdm(scheduler.timesteps, **pipe._progress_bar_config):
        noise = _guided_noise(pipe, trajectory[-1], t, context, None, 1.0)
        trajectory.append(scheduler.step(noise, t, trajectory[-1]).prev_sample)
    return trajectory[::-1]


def edit_mask(maps: torch.Tensor, size: tuple[int, int], threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """The edited region [H, W] (bool) from attention maps [K, h, w] (the edited word's in the source,
    the subject's in the edited branch): each map widened by one cell (a 3x3 max), resized to ``size``,
    divided by its maximum and thresholded; the region is their union."""
    if maps.ndim != 3:
        raise ValueError(f"attention maps must be [K, h, w], not {list(maps.shape)}")
    widened = F.max_pool2d(maps.float()[:, None], kernel_size=3, stride=1, padding=1)
    resized = F.interpolate(widened, size=size, mode="nearest")
    peak = resized.amax(dim=(2, 3), keepdim=True)
    normalised = resized / torch.where(peak > 0, peak, torch.ones_like(peak))
    return (normalised > threshold).any(dim=0)[0]


class AttentionControl:
    """Shared state of the edit's attention processors: which tokens align between the two texts,
    which tokens' maps make the mask, the maps accumulated so far, and the current step."""

    def __init__(self, latent_size: tuple[int, int], aligned: list[tuple[int, int]], edited_tokens: list[int],
                 subject_tokens: list[int], replace_steps: int, threshold: float = MASK_THRESHOLD):
        self.latent_size = latent_size
        self.source_positions = torch.tensor([source for source, _ in aligned], dtype=torch.long)
        self.target_positions = torch.tensor([target for _, target in aligned], dtype=torch.long)
        self.edited_tokens = edited_tokens
        self.subject_tokens = subject_tokens
        self.replace_steps = replace_steps
        self.threshold = threshold
        self.step = 0
        self.maps: dict[int, torch.Tensor] = {}  # by query length: the summed [2, queries] maps

    def cross_attention(self, probs: torch.Tensor, heads: int) -> torch.Tensor:
        """``probs`` [batch × heads, queries, 77]; the last two batch rows are the source's and the edited
        branch's conditional rows."""
        batch = probs.shape[0] // heads
        maps = probs.view(batch, heads, *probs.shape[1:])
        source, target = maps[-2], maps[-1]
        found = torch.stack([source[..., self.edited_tokens].sum(-1).mean(0),
                             target[..., self.subject_tokens].sum(-1).mean(0)]).float()
        queries = probs.shape[1]
        self.maps[queries] = self.maps[queries] + found if queries in self.maps else found
        if self.step < self.replace_steps and len(self.target_positions):
            target[..., self.target_positions.to(probs.device)] = source[..., self.source_positions.to(probs.device)]
        return probs

    def mask(self) -> torch.Tensor:
        """The edited region at the latents' size, from the maps at a quarter of the latent side (16x16
        at 512², Prompt-to-Prompt's choice: the most semantic), or the coarsest the U-Net has."""
        height, width = self.latent_size
        by_side = {}
        for queries, maps in self.maps.items():
            scale = math.sqrt(height * width / queries)
            by_side[round(height / scale)] = maps.view(2, round(height / scale), round(width / scale))
        side = height // 4 if height // 4 in by_side else min(by_side)
        return edit_mask(by_side[side], (height, width), self.threshold)


class EditAttentionProcessor:
    """diffusers' plain cross-attention (``AttnProcessor``'s computation), its probabilities passed through the
    controller before they weigh the values. Only the cross-attention layers get it: the self-attention ones
    keep diffusers' memory-efficient default, which never builds the (pixels x pixels) probabilities."""

    def __init__(self, controller: AttentionControl):
        self.controller = controller

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **_) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = self.controller.cross_attention(attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask),
                                                attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if spatial:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _aligned_tokens(source_ids: list[int], target_ids: list[int], edited: list[int], subject: list[int],
                    shift_from: int, shift: int, length: int) -> list[tuple[int, int]]:
    """(source position, edited-branch position) of the tokens the two texts share, by a longest-match
    alignment of the token ids; the edited word and the subject's name excluded. The edited branch's
    positions from ``shift_from`` on move by ``shift`` (the inserted subject embeddings)."""
    pairs = []
    matcher = difflib.SequenceMatcher(a=source_ids, b=target_ids, autojunk=False)
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            source, target = block.a + offset, block.b + offset
            if source in edited or target in subject:
                continue
            moved = target + shift if target >= shift_from else target
            if moved < length:
                pairs.append((source, moved))
    return pairs


@torch.no_grad()
def edit(pipe, prompt: str, subject: str, edit_token: str, reference_image: ImageInput | list[ImageInput] | None = None,
         source_prompt: str | None = None, source_image: ImageInput | None = None, guidance_scale: float = 7.5,
         num_inference_steps: int = 50, height: int = 512, width: int = 512, generator: torch.Generator | None = None,
         neg_prompt: str = "", cross_replace_steps: float = CROSS_REPLACE_STEPS, mask_threshold: float = MASK_THRESHOLD,
         subject_embeds: torch.Tensor | None = None, reference_weights: Sequence[float] | None = None) -> EditOutput:
    """Put the subject (``reference_image`` of ``subject``, or ``subject_embeds``) in place of
    ``edit_token`` in a source picture: generated from ``source_prompt`` with ``generator``, or the real
    photo ``source_image``, described as "a {edit_token} {prompt}". The edited branch's text is
    "a {subject} {prompt}", the pipeline's own recipe, with the subject embeddings inserted.
    ``mask_threshold``: the share of its peak above which an attention map marks the edited region."""
    if (source_prompt is None) == (source_image is None):
        raise ValueError("give a source prompt (a picture generated from it) or a source image (a photo), one of them")
    if not 0 <= mask_threshold < 1:
        raise ValueError(f"mask_threshold is a share of the maps' peak, in [0, 1), not {mask_threshold}")
    if not 0 <= cross_replace_steps <= 1:
        raise ValueError(f"cross_replace_steps is a share of the steps, in [0, 1], not {cross_replace_steps}")
    if height % pipe.vae_scale_factor or width % pipe.vae_scale_factor:
        raise ValueError(f"height and width must be multiples of {pipe.vae_scale_factor}, not {height}x{width}")
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    length = pipe.text_encoder.config.max_position_embeddings
    source_text = source_prompt if source_prompt is not None else f"a {edit_token.strip()} {prompt.strip()}"
    source_ids = _token_ids(pipe, source_text, length)
    edited = _word_positions(pipe, source_ids, edit_token, "edit token")
    embeds = pipe._subject_embeds(1, reference_image, [subject] if reference_image is not None else None,
                                  subject_embeds, reference_weights)
    target_text = pipe._build_prompt([prompt], [subject], 1.0, 1)[0]
    queries = embeds.shape[1]
    target_ids = _token_ids(pipe, target_text, length - queries)
    named = _word_positions(pipe, target_ids, subject, "subject")
    begin = pipe.ctx_begin_pos
    subject_tokens = list(range(begin, begin + queries)) + [p + queries if p >= begin else p for p in named]

    latent_size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    scheduler = _ddim(pipe)
    if source_image is not None:
        trajectory = invert(pipe, source_image, source_text, num_inference_steps, height, width)
        source_picture = source_pixels(source_image, width, height)
    else:
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor((1, pipe.unet.config.in_channels, *latent_size), generator=generator, device=pipe.device,
                             dtype=torch.float32)
        trajectory = text_trajectory(pipe, source_text, noise * scheduler.init_noise_sigma, num_inference_steps,
                                     guidance_scale, neg_prompt)
        source_picture = pipe.decode(trajectory[-1], "pil")[0]

    control = AttentionControl(
        latent_size, _aligned_tokens(source_ids, target_ids, edited, named, begin, queries, length), edited,
        subject_tokens, replace_steps=round(cross_replace_steps * num_inference_steps), threshold=mask_threshold)
    context = torch.cat([pipe.encode_plain([source_text]), pipe.encode_prompt(embeds, [target_text])])
    negative = pipe.encode_plain([neg_prompt]) if guidance_scale > 1.0 else None
    scheduler.set_timesteps(num_inference_steps)
    processors = pipe.unet.attn_processors
    pipe.unet.set_attn_processor({name: EditAttentionProcessor(control) if name.endswith("attn2.processor") else processor
                                  for name, processor in processors.items()})
    try:
        latents = trajectory[0]
        for step, t in enumerate(tqdm(scheduler.timesteps, **pipe._progress_bar_config)):
            control.step = step
            both = torch.cat([trajectory[step], latents])
            noise = _guided_noise(pipe, both, t, context, negative, guidance_scale)
            stepped = scheduler.step(noise[1:], t, latents).prev_sample
            mask = control.mask()  # the maps of this step: after the last, the edited region
            latents = trajectory[step + 1] + mask.to(stepped.device, stepped.dtype) * (stepped - trajectory[step + 1])
    finally:
        pipe.unet.set_attn_processor(processors)

    region = F.interpolate(mask[None, None].float(), size=(height, width), mode="nearest")[0, 0]
    edited_pixels = pipe.decode(latents, "np")[0]
    source_array = np.asarray(source_picture, dtype=np.float32) / 255
    keep = region.cpu().numpy()[:, :, None]
    composite = keep * edited_pixels + (1 - keep) * source_array
    return EditOutput(image=Image.fromarray(np.round(composite * 255).astype(np.uint8)), source=source_picture,
                      mask=Image.fromarray((region.cpu().numpy() * 255).astype(np.uint8), mode="L"))
