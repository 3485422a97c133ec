"""The editing stage (``blipdiff edit``): a source picture + a subject → the edited picture, the source
and the edited region as PNGs, and ``edit.json`` with every setting (see
``blip_diffusion.attention_control`` for the method).

Everything is checked before anything is written; each PNG is written atomically; a rerun with the same
settings finishes what is missing, and a folder holding another edit is refused.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from blipdiff.infra.atomic import atomic_path, remove_stale_temporaries
from blipdiff.infra.inputs import SubjectText, model_location, readable_image
from blipdiff.infra.run_folder import claim_run_folder, record_run_folder
from blipdiff.models.devices import resolve_placement
from blipdiff.models.sampling import CROSS_REPLACE_STEPS, MASK_THRESHOLD
from blipdiff.tasks.sampling import Sampling, check_blend, described, load_blip_diffusion

SETTINGS_FILE = "edit.json"
OUTPUTS = ("edited.png", "source.png", "mask.png")


class EditConfig(Sampling):
    """One ``blipdiff edit`` run. The source is generated from ``source_prompt`` with ``seed``, or is
    the photo ``source_image``, described as "a {edit_token} {prompt}"."""

    model: str = Field(description="Hub id or local checkpoint folder in the official layout.")
    source_prompt: str | None = Field(None, description="Generate the source picture from this text (with --seed); "
                                      "it must contain --edit-token.")
    source_image: Path | None = Field(None, description="Edit this photo instead (DDIM inversion), described as "
                                      "'a <edit-token> <prompt>'.")
    edit_token: str = Field(description="The word of the source whose region the subject takes, e.g. cat.")
    images: list[Path] = Field(min_length=1, description="Reference photo of the subject; repeat to average several.")
    weights: list[float] | None = Field(None, description="Each reference photo's weight (default: equal).")
    subject: SubjectText = Field(description="The subject's category, e.g. dog.")
    prompt: str = Field(description="The edited picture's text after the subject, e.g. 'sitting on a sofa'.")
    out: Path = Field(description="Folder for edited.png, source.png, mask.png and edit.json.")
    steps: int = described("steps", "DDIM steps.")
    seed: int = described("seed", "Seed of the generated source's noise.")
    cross_replace_steps: float = Field(CROSS_REPLACE_STEPS, ge=0, le=1, description="Share of the steps that keep the "
                                       "source's attention maps for the shared words.")
    mask_threshold: float = Field(MASK_THRESHOLD, ge=0, lt=1, description="Share of its peak above which an attention "
                                  "map marks the edited region.")

    @model_validator(mode="after")
    def _inputs(self) -> EditConfig:
        if (self.source_prompt is None) == (self.source_image is None):
            raise ValueError("give --source-prompt (a picture generated from it) or --source-image (a photo), one of them")
        if not self.edit_token.strip():
            raise ValueError("--edit-token is empty: name the word of the source to replace")
        if not self.prompt.strip():
            raise ValueError("--prompt is empty")
        if self.source_prompt is not None and self.edit_token.strip().lower() not in self.source_prompt.lower():
            raise ValueError(f"the edit token {self.edit_token!r} is not in the source prompt {self.source_prompt!r}")
        for path in [*self.images, *([self.source_image] if self.source_image else [])]:
            readable_image(path)
        check_blend(len(self.images), [], self.weights)
        return self

    def settings(self) -> dict:
        settings = self.model_dump(mode="json", exclude={"out"})
        settings["images"] = [str(path.resolve()) for path in self.images]
        if self.source_image is not None:
            settings["source_image"] = str(self.source_image.resolve())
        settings["model"] = model_location(self.model)
        return settings


def edit_picture(config: EditConfig, log=print) -> Path:
    """Make the edit's PNGs unless they are all there; returns the output folder."""
    config = resolve_placement(config)
    settings = config.settings()
    claim_run_folder(config.out, settings, record=SETTINGS_FILE, other="another run (edit)", run="edit run")
    if all((config.out / name).is_file() for name in OUTPUTS):
        log(f"{config.out}: the edit is already there")
        return config.out
    import torch

    # No scheduler to pick: the edit samples with DDIM, as its inversion must.
    pipe = load_blip_diffusion(config.model, getattr(torch, config.dtype), config.device)
    result = pipe.edit(
        config.prompt, config.subject, config.edit_token, reference_image=[str(path) for path in config.images],
        reference_weights=config.weights, source_prompt=config.source_prompt,
        source_image=str(config.source_image) if config.source_image else None, guidance_scale=config.guidance,
        num_inference_steps=config.steps, height=config.height, width=config.width,
        generator=torch.Generator("cpu").manual_seed(config.seed), neg_prompt=config.negative_prompt,
        cross_replace_steps=config.cross_replace_steps, mask_threshold=config.mask_threshold)
    config.out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(config.out)
    record_run_folder(config.out, settings, SETTINGS_FILE)
    for name, image in zip(OUTPUTS, (result.image, result.source, result.mask)):
        with atomic_path(config.out / name) as partial:
            image.save(partial, format="PNG")
    return config.out
