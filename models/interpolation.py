"""The interpolation stage (``blipdiff interpolate``, paper figure 9): renders, at one fixed seed, the
subjects along the path between two subjects' embeddings, or bilinearly among four (the corners of a
square grid), each cell generated from the weighted mean of the subjects' embeddings.

Outputs: one PNG per cell, ``grid.png``, and ``interpolation.parquet`` (each cell's weights); a rerun
with the same settings makes only the missing cells.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from blipdiff.infra.atomic import atomic_path, remove_stale_temporaries, write_json_atomic
from blipdiff.models.devices import AUTO, DEVICE_HELP, DTYPE_HELP, DType, resolve_placement
from blipdiff.models.generation import RUN_FILE, SCHEDULERS, check_run_folder
from blipdiff.infra.inputs import ImageSide, SubjectText, model_location, readable_image

MANIFEST = "interpolation.parquet"


def interpolation_weights(corners: int, steps: int) -> list[list[float]]:
    """Each cell's weights over the subjects, row by row: for two subjects ``steps`` cells from the
    first to the second; for four (top-left, top-right, bottom-left, bottom-right) a ``steps`` x
    ``steps`` grid of bilinear weights."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (both ends), not {steps}")
    ticks = [index / (steps - 1) for index in range(steps)]
    if corners == 2:
        return [[1 - u, u] for u in ticks]
    if corners == 4:
        return [[(1 - u) * (1 - v), u * (1 - v), (1 - u) * v, u * v] for v in ticks for u in ticks]
    raise ValueError(f"interpolation runs between 2 subjects (a path) or 4 (a square), not {corners}")


class InterpolateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Hub id or local checkpoint folder in the official layout.")
    images: list[Path] = Field(description="One reference photo per subject: 2 (a path) or 4 (a square).")
    subjects: list[SubjectText] = Field(description="Each photo's category, one per image.")
    target_subject: SubjectText = Field(description="The category written into the prompt.")
    prompt: str = Field(description="What to generate, e.g. 'on the beach'.")
    out: Path
    steps: int = Field(5, ge=2, description="Cells along a side.")
    negative_prompt: str = ""
    denoising_steps: int = Field(50, ge=1)
    guidance: float = Field(7.5, ge=0)
    seed: int = Field(0, ge=0)
    height: ImageSide = 512
    width: ImageSide = 512
    scheduler: Literal["pndm", "ddim", "dpm"] = "pndm"
    dtype: DType = Field(AUTO, description=DTYPE_HELP)
    device: str = Field(AUTO, description=DEVICE_HELP)

    @model_validator(mode="after")
    def _inputs(self) -> InterpolateConfig:
        if len(self.images) not in (2, 4):
            raise ValueError(f"give 2 reference images (a path) or 4 (a square), not {len(self.images)}")
        if len(self.subjects) != len(self.images):
            raise ValueError(f"{len(self.subjects)} subjects for {len(self.images)} images; give one per image")
        if not self.prompt.strip():
            raise ValueError("--prompt is empty")
        for path in self.images:
            readable_image(path)
        return self

    def settings(self) -> dict:
        settings = self.model_dump(mode="json", exclude={"out"})
        settings["images"] = [str(path.resolve()) for path in self.images]
        settings["model"] = model_location(self.model)
        return settings


def interpolate(config: InterpolateConfig, log=print) -> Path:
    """Render every missing cell, then the grid and the manifest; returns the grid's path."""
    config = resolve_placement(config)
    check_run_folder(config.out, config.settings(), "interpolation")
    import diffusers
    import pandas as pd
    import torch
    from PIL import Image

    from blipdiff.models.blip_diffusion import BlipDiffusionPipeline
    from blipdiff.models.blip_diffusion.pipeline import blend_embeddings

    pipe = BlipDiffusionPipeline.from_pretrained(config.model, torch_dtype=getattr(torch, config.dtype),
                                                 device=config.device, load_controlnet=False)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[config.scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    config.out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(config.out)
    write_json_atomic(config.settings(), config.out / RUN_FILE)
    cells = interpolation_weights(len(config.images), config.steps)
    corners = None  # the subjects' embeddings, made once and only if a cell is missing
    rows, pictures = [], []
    for index, weights in enumerate(cells):
        name = f"cell-{index:03d}.png"
        if not (config.out / name).is_file():
            if corners is None:
                corners = pipe.subject_embeddings([str(path) for path in config.images], config.subjects)
            blended = blend_embeddings(corners, weights)
            picture = pipe(config.prompt, target_subject_category=config.target_subject, subject_embeds=blended,
                           guidance_scale=config.guidance, height=config.height, width=config.width,
                           num_inference_steps=config.denoising_steps, neg_prompt=config.negative_prompt,
                           generator=torch.Generator("cpu").manual_seed(config.seed)).images[0]
            with atomic_path(config.out / name) as partial:
                picture.save(partial, format="PNG")
        with Image.open(config.out / name) as opened:
            pictures.append(opened.convert("RGB"))
        rows.append({"file": name, "cell": index, "weights": weights, "seed": config.seed})
    columns = config.steps if len(config.images) == 4 else len(cells)
    grid = Image.new("RGB", (columns * config.width, -(-len(cells) // columns) * config.height))
    for index, picture in enumerate(pictures):
        grid.paste(picture, ((index % columns) * config.width, (index // columns) * config.height))
    with atomic_path(config.out / "grid.png") as partial:
        grid.save(partial, format="PNG")
    with atomic_path(config.out / MANIFEST) as partial:
        pd.DataFrame(rows).to_parquet(partial, index=False)
    log(f"{len(cells)} cells -> {config.out}")
    return config.out / "grid.png"
