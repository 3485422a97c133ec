"""The generation stage: checkpoint + reference images + prompts → PNGs and ``generations.parquet``.

Image k of every prompt is drawn with its own CPU generator seeded ``seed + k``, so image 0 is the
Python API's with ``generator=torch.Generator("cpu").manual_seed(seed)``, and every row of the sidecar
holds what it takes to make its image again. Everything the run depends on is checked before anything
is written; each PNG is written atomically, a rerun skips the images already there, and a folder that
holds another run's generations is refused, so two runs never mix.
"""

from __future__ import annotations

import datetime
import json
from importlib.metadata import version
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from blipdiff.infra.atomic import atomic_path, remove_stale_temporaries
from blipdiff.infra.inputs import SubjectText, model_location, readable_image
from blipdiff.infra.run_folder import claim_run_folder, record_run_folder
from blipdiff.models.devices import resolve_placement
from blipdiff.tasks.sampling import RUN_FILE, ScheduledSampling, check_blend, described, load_blip_diffusion, render

MANIFEST = "generations.parquet"


class GenerateConfig(ScheduledSampling):
    """One ``blipdiff generate`` run. Defaults are the Python API's (empty negative prompt, PNDM, 50 steps,
    guidance 7.5, 512²), on the GPU in float16 when there is one, else on the CPU in float32."""

    model: str = Field(description="Hub id or local checkpoint folder in the official layout (dreambooth: the base).")
    method: Literal["blip-diffusion", "dreambooth"] = Field(
        "blip-diffusion", description="blip-diffusion, or dreambooth: --model is the base, --subject-checkpoint a "
        "`blipdiff dreambooth` output, and each prompt names the subject by its identifier.")
    images: list[Path] = Field(default_factory=list,
                               description="Reference photo of the subject; repeat to average several.")
    image_subjects: list[SubjectText] = Field(
        default_factory=list, description="Each --image's category, to blend different subjects (default: --subject).")
    weights: list[float] | None = Field(None, description="Each reference photo's weight in the mean (default: equal).")
    subject_checkpoint: Path | None = Field(None, description="A `blipdiff finetune` output, instead of reference "
                                            "photos.")
    subject: SubjectText = Field(description="The subject's category, e.g. dog.")
    target_subject: SubjectText | None = Field(None, description="Category written into the prompt (default: "
                                               "--subject).")
    prompts: list[str] = Field(min_length=1, description="What to generate, e.g. 'in the jungle'; repeatable.")
    out: Path = Field(description="Folder for the PNGs and generations.parquet.")
    seed: int = described("seed", "Image k of each prompt uses seed + k.")
    num_images: int = Field(1, ge=1, description="Images per prompt.")
    controls: list[Path] = Field(default_factory=list, description="Control image for a ControlNet (edges, depth, "
                                 "pose, ...); repeat with one --controlnet each.")
    control_types: list[Literal["canny", "image"]] = Field(
        default_factory=lambda: ["image"],
        description="canny (edges computed from --control) or image (as given); one, or one per --control.")
    controlnets: list[str] = Field(default_factory=list, description="Stable Diffusion 1.5 ControlNet (hub id or "
                                   "folder) per --control; default: the checkpoint's own.")
    control_scales: list[float] = Field(default_factory=lambda: [1.0], description="ControlNet residual scale; one, "
                                        "or one per --control (0 switches one off).")

    @field_validator("prompts")
    @classmethod
    def _prompts_given(cls, value: list[str]) -> list[str]:
        if any(not prompt.strip() for prompt in value):
            raise ValueError("a prompt is empty")
        return value

    @model_validator(mode="after")
    def _images_readable(self) -> GenerateConfig:
        if self.method == "dreambooth":
            if self.subject_checkpoint is None or self.images or self.controls:
                raise ValueError("--method dreambooth takes a `blipdiff dreambooth` output as --subject-checkpoint, "
                                 "and no --image or --control")
            if not self.subject_checkpoint.is_dir():
                raise ValueError(f"subject checkpoint {self.subject_checkpoint}: no such folder")
            return self
        if bool(self.images) == (self.subject_checkpoint is not None):
            raise ValueError("give reference images (--image) or a subject checkpoint (--subject-checkpoint), one of them")
        if self.subject_checkpoint is not None and not self.subject_checkpoint.is_dir():
            raise ValueError(f"subject checkpoint {self.subject_checkpoint}: no such folder")
        for path in [*self.images, *self.controls]:
            readable_image(path)
        check_blend(len(self.images), self.image_subjects, self.weights)
        if self.controls:
            for name, values in (("--control-type", self.control_types), ("--control-scale", self.control_scales)):
                if len(values) not in (1, len(self.controls)):
                    raise ValueError(f"{name}: {len(values)} values for {len(self.controls)} control images; give one, "
                                     "or one per control image")
            if self.controlnets and len(self.controlnets) != len(self.controls):
                raise ValueError(f"--controlnet: {len(self.controlnets)} for {len(self.controls)} control images; give "
                                 "one per control image, or none to use the checkpoint's own")
            if not self.controlnets and len(self.controls) > 1:
                raise ValueError("several control images need a --controlnet for each")
        elif self.controlnets:
            raise ValueError("--controlnet without --control: give the control image to follow")
        return self

    def control_pairs(self) -> list[tuple[Path, str, float]]:
        """(control image, type, scale) per ControlNet."""
        count = len(self.controls)
        types = self.control_types * count if len(self.control_types) == 1 else self.control_types
        scales = self.control_scales * count if len(self.control_scales) == 1 else self.control_scales
        return list(zip(self.controls, types, scales))

    def settings(self) -> dict:
        """What decides the images (the output folder aside), with local paths made absolute so that a
        rerun from another folder is recognised for what it is."""
        settings = self.model_dump(mode="json", exclude={"out"})
        settings["images"] = [str(path.resolve()) for path in self.images]
        settings["controls"] = [str(path.resolve()) for path in self.controls]
        settings["controlnets"] = [model_location(net) for net in self.controlnets]
        if self.subject_checkpoint is not None:
            settings["subject_checkpoint"] = str(self.subject_checkpoint.resolve())
        settings["model"] = model_location(self.model)
        return settings


def image_name(prompt_index: int, image_index: int) -> str:
    return f"p{prompt_index:03d}_i{image_index:02d}.png"


def generate_images(config: GenerateConfig, log=print) -> Path:
    """Generate every missing image of the run, then write the sidecar; returns its path."""
    config = resolve_placement(config)
    claim_run_folder(config.out, config.settings(), record=RUN_FILE, other="another run (generation)",
                     run="generation run")
    import pandas as pd
    import torch

    from blipdiff.models.blip_diffusion.controlnet import control_image

    dtype = getattr(torch, config.dtype)
    controls = config.control_pairs()
    conditions, conditioning = [], {}
    if config.method == "dreambooth":
        from blipdiff.models.sampling import set_scheduler
        from blipdiff.models.stable_diffusion import load_dreambooth, read_dreambooth_record

        record = read_dreambooth_record(config.subject_checkpoint)
        unnamed = [prompt for prompt in config.prompts if record["identifier"] not in prompt.split()]
        if unnamed:
            raise ValueError(f"a DreamBooth prompt names the subject by its identifier, as in "
                             f"'{record['prompt']} in the jungle'; these do not: {unnamed}")
        pipe = load_dreambooth(config.model, config.subject_checkpoint, dtype, config.device)
        set_scheduler(pipe, config.scheduler)
    else:
        pipe = load_blip_diffusion(config.model, dtype, config.device, config.scheduler, config.controlnets,
                                   control=bool(controls))
        if controls:
            if len(pipe.controlnets) != len(controls):
                raise ValueError(f"{len(controls)} control images for the checkpoint's {len(pipe.controlnets)} "
                                 "ControlNets")
            conditions = [control_image(path, kind) for path, kind, _ in controls]
            conditioning = {"condtioning_image": conditions[0] if len(conditions) == 1 else conditions,
                            "controlnet_conditioning_scale": [scale for _, _, scale in controls]}
        if config.subject_checkpoint is not None:
            subject_embeds = pipe.load_subject(config.subject_checkpoint)
        else:
            subject_embeds = pipe.subject_embedding(config.images, config.image_subjects or config.subject,
                                                    config.weights)
        conditioning.update(target_subject_category=config.target_subject or config.subject,
                            subject_embeds=subject_embeds)

    config.out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(config.out)
    record_run_folder(config.out, config.settings(), RUN_FILE)
    for index, condition in enumerate(conditions):
        # What each ControlNet followed (the computed edges, say), beside the images it shaped.
        with atomic_path(config.out / f"control-{index}.png") as partial:
            condition.save(partial, format="PNG")
    rows = []
    for prompt_index, prompt in enumerate(config.prompts):
        names = [image_name(prompt_index, k) for k in range(config.num_images)]
        missing = [k for k, name in enumerate(names) if not (config.out / name).is_file()]
        for k in missing:
            # One image per call: a batch rounds differently from the single call that remakes the image.
            image = render(pipe, prompt, method=config.method, steps=config.steps, guidance=config.guidance,
                           height=config.height, width=config.width, negative_prompt=config.negative_prompt,
                           generator=torch.Generator("cpu").manual_seed(config.seed + k), **conditioning)
            with atomic_path(config.out / names[k]) as partial:
                image.save(partial, format="PNG")
        log(f"prompt {prompt_index + 1}/{len(config.prompts)}: {len(missing)} made, "
            f"{config.num_images - len(missing)} already there")
        rows += [{"file": name, "prompt_index": prompt_index, "prompt": prompt, "image_index": k,
                  "seed": config.seed + k} for k, name in enumerate(names)]
    settings = config.settings()
    settings["base_seed"] = settings.pop("seed")  # each row's seed is base_seed + image_index
    settings["versions"] = json.dumps({name: version(name) for name in ("blipdiff", "torch", "diffusers",
                                                                        "transformers")})
    frame = pd.DataFrame(rows).assign(**{key: [value] * len(rows) for key, value in settings.items()})
    frame["created"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    manifest = config.out / MANIFEST
    with atomic_path(manifest) as partial:
        frame.to_parquet(partial, index=False)
    return manifest
