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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from blipdiff.infra.atomic import atomic_path, remove_stale_temporaries, write_json_atomic
from blipdiff.models.inputs import ImageSide, SubjectText, model_location, readable_image

SCHEDULERS = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler"}
RUN_FILE = "run.json"
MANIFEST = "generations.parquet"


class GenerateConfig(BaseModel):
    """One ``blipdiff generate`` run. Defaults are the Python API's: empty negative prompt, PNDM,
    50 steps, guidance 7.5, 512², float32 on the CPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Hub id or local checkpoint folder in the official layout.")
    images: list[Path] = Field(default_factory=list, description="Reference photos of the subject (averaged).")
    subject_checkpoint: Path | None = Field(None, description="A `blipdiff finetune` output, instead of photos.")
    subject: SubjectText = Field(description="The subject's category, e.g. 'dog'.")
    target_subject: SubjectText | None = Field(None, description="Category written into the prompt (default: subject).")
    prompts: list[str] = Field(min_length=1)
    out: Path
    negative_prompt: str = ""
    steps: int = Field(50, ge=1)
    guidance: float = Field(7.5, ge=0)
    seed: int = Field(0, ge=0)
    num_images: int = Field(1, ge=1)
    height: ImageSide = 512
    width: ImageSide = 512
    scheduler: Literal["pndm", "ddim", "dpm"] = "pndm"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"

    @field_validator("prompts")
    @classmethod
    def _prompts_given(cls, value: list[str]) -> list[str]:
        if any(not prompt.strip() for prompt in value):
            raise ValueError("a prompt is empty")
        return value

    @model_validator(mode="after")
    def _images_readable(self) -> GenerateConfig:
        if bool(self.images) == (self.subject_checkpoint is not None):
            raise ValueError("give reference images (--image) or a subject checkpoint (--subject-checkpoint), one of them")
        if self.subject_checkpoint is not None and not self.subject_checkpoint.is_dir():
            raise ValueError(f"subject checkpoint {self.subject_checkpoint}: no such folder")
        for path in self.images:
            readable_image(path)
        return self

    def settings(self) -> dict:
        """What decides the images (the output folder aside), with local paths made absolute so that a
        rerun from another folder is recognised for what it is."""
        settings = self.model_dump(mode="json", exclude={"out"})
        settings["images"] = [str(path.resolve()) for path in self.images]
        if self.subject_checkpoint is not None:
            settings["subject_checkpoint"] = str(self.subject_checkpoint.resolve())
        settings["model"] = model_location(self.model)
        return settings


def _check_out(config: GenerateConfig) -> None:
    run_file = config.out / RUN_FILE
    if run_file.is_file():
        if json.loads(run_file.read_text()) != config.settings():
            raise ValueError(f"{config.out} holds the generations of another run (see {run_file}); choose another --out")
    elif config.out.is_dir() and any(config.out.iterdir()):
        raise ValueError(f"{config.out} is not empty and holds no generation run; choose another --out")


def _check_device(name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name}: not a torch device ({error})") from error
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "device_count"):
        raise ValueError(f"--device {name}: blipdiff runs on cpu, cuda, xpu or mps devices")
    count = backend.device_count() if backend.is_available() else 0
    if count == 0:
        raise ValueError(f"--device {name}: this torch build or machine has no {device.type} device")
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} {device.type} device(s), numbered from 0")


def image_name(prompt_index: int, image_index: int) -> str:
    return f"p{prompt_index:03d}_i{image_index:02d}.png"


def generate_images(config: GenerateConfig, log=print) -> Path:
    """Generate every missing image of the run, then write the sidecar; returns its path."""
    _check_out(config)
    import diffusers
    import pandas as pd
    import torch

    from blipdiff.models.blip_diffusion import BlipDiffusionPipeline

    _check_device(config.device)
    pipe = BlipDiffusionPipeline.from_pretrained(config.model, torch_dtype=getattr(torch, config.dtype),
                                                 device=config.device)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[config.scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if config.subject_checkpoint is not None:
        subject_embeds = pipe.load_subject(config.subject_checkpoint)
    else:
        subject_embeds = pipe.subject_embedding(config.images, config.subject)

    config.out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(config.out)
    write_json_atomic(config.settings(), config.out / RUN_FILE)
    rows = []
    for prompt_index, prompt in enumerate(config.prompts):
        names = [image_name(prompt_index, k) for k in range(config.num_images)]
        missing = [k for k, name in enumerate(names) if not (config.out / name).is_file()]
        for k in missing:
            # One image per call: a batch rounds differently from the single call that remakes the image.
            image = pipe(
                prompt, target_subject_category=config.target_subject or config.subject,
                subject_embeds=subject_embeds, guidance_scale=config.guidance, height=config.height,
                width=config.width, num_inference_steps=config.steps, neg_prompt=config.negative_prompt,
                generator=torch.Generator("cpu").manual_seed(config.seed + k)).images[0]
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
