"""The interpolation stage (``blipdiff interpolate``, paper figure 9): renders, at one fixed seed, the
subjects along the path between two subjects' embeddings, or bilinearly among four (the corners of a
square grid), each cell generated from the weighted mean of the subjects' embeddings.

Outputs: one PNG per cell, ``grid.png``, and ``interpolation.parquet`` (each cell's weights); a rerun
with the same settings makes only the missing cells.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from blipdiff.infra.atomic import atomic_path, remove_stale_temporaries
from blipdiff.infra.inputs import SubjectText, model_location, readable_image
from blipdiff.infra.run_folder import claim_run_folder, record_run_folder
from blipdiff.models.devices import resolve_placement
from blipdiff.tasks.sampling import RUN_FILE, ScheduledSampling, described, load_blip_diffusion, render

MANIFEST = "interpolation.parquet"


def interpolation_weights(corners: int, cells: int) -> list[list[float]]:
    """Each cell's weights over the subjects, row by row: for two subjects ``cells`` cells from the
    first to the second; for four (top-left, top-right, bottom-left, bottom-right) a ``cells`` x
    ``cells`` grid of bilinear weights."""
    if cells < 2:
        raise ValueError(f"cells must be at least 2 (both ends), not {cells}")
    ticks = [index / (cells - 1) for index in range(cells)]
    if corners == 2:
        return [[1 - u, u] for u in ticks]
    if corners == 4:
        return [[(1 - u) * (1 - v), u * (1 - v), (1 - u) * v, u * v] for v in ticks for u in ticks]
    raise ValueError(f"interpolation runs between 2 subjects (a path) or 4 (a square), not {corners}")


class InterpolateConfig(ScheduledSampling):
    """One ``blipdiff interpolate`` run: ``steps`` are the denoising steps of each cell, ``cells`` the
    cells along a side."""

    model: str = Field(description="Hub id or local checkpoint folder in the official layout.")
    images: list[Path] = Field(description="One photo per subject: 2 (a path) or 4 (a square's corners).")
    subjects: list[SubjectText] = Field(description="Each --image's category, in the same order.")
    # Not given (None or empty): the first subject's, filled in before validation, so that a run records it.
    target_subject: SubjectText = Field(None, description="Category written into the prompt (default: the first "
                                        "--subject).")
    prompt: str = Field(description="What to generate, e.g. 'on the beach'.")
    out: Path = Field(description="Folder for the cells, grid.png and interpolation.parquet.")
    cells: int = Field(5, ge=2, description="Cells along a side.")
    steps: int = described("steps", "Denoising steps per cell.")
    seed: int = described("seed", "The one seed of every cell.")
    height: int = described("height", "Cell height, a multiple of 8.")
    width: int = described("width", "Cell width, a multiple of 8.")

    @model_validator(mode="before")
    @classmethod
    def _target_subject(cls, data):
        if isinstance(data, dict) and not data.get("target_subject") and data.get("subjects"):
            return {**data, "target_subject": data["subjects"][0]}
        return data

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
        """Under the names runs recorded before the grid's size was called ``cells`` (``steps``, and
        ``denoising_steps`` for the steps), so that their folders still resume."""
        settings = self.model_dump(mode="json", exclude={"out"})
        settings["denoising_steps"] = settings.pop("steps")
        settings["steps"] = settings.pop("cells")
        settings["images"] = [str(path.resolve()) for path in self.images]
        settings["model"] = model_location(self.model)
        return settings


def interpolate(config: InterpolateConfig, log=print) -> Path:
    """Render every missing cell, then the grid and the manifest; returns the grid's path."""
    config = resolve_placement(config)
    claim_run_folder(config.out, config.settings(), record=RUN_FILE, other="another run (interpolation)",
                     run="interpolation run")
    import pandas as pd
    import torch
    from PIL import Image

    from blipdiff.models.blip_diffusion.pipeline import blend_embeddings

    pipe = load_blip_diffusion(config.model, getattr(torch, config.dtype), config.device, config.scheduler)
    config.out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(config.out)
    record_run_folder(config.out, config.settings(), RUN_FILE)
    cells = interpolation_weights(len(config.images), config.cells)
    corners = None  # the subjects' embeddings, made once and only if a cell is missing
    rows, pictures = [], []
    for index, weights in enumerate(cells):
        name = f"cell-{index:03d}.png"
        if not (config.out / name).is_file():
            if corners is None:
                corners = pipe.subject_embeddings([str(path) for path in config.images], config.subjects)
            blended = blend_embeddings(corners, weights)
            picture = render(pipe, config.prompt, method="blip-diffusion", steps=config.steps,
                             guidance=config.guidance, height=config.height, width=config.width,
                             negative_prompt=config.negative_prompt,
                             generator=torch.Generator("cpu").manual_seed(config.seed),
                             target_subject_category=config.target_subject, subject_embeds=blended)
            with atomic_path(config.out / name) as partial:
                picture.save(partial, format="PNG")
        with Image.open(config.out / name) as opened:
            pictures.append(opened.convert("RGB"))
        rows.append({"file": name, "cell": index, "weights": weights, "seed": config.seed})
    columns = config.cells if len(config.images) == 4 else len(cells)
    grid = Image.new("RGB", (columns * config.width, -(-len(cells) // columns) * config.height))
    for index, picture in enumerate(pictures):
        grid.paste(picture, ((index % columns) * config.width, (index // columns) * config.height))
    with atomic_path(config.out / "grid.png") as partial:
        grid.save(partial, format="PNG")
    with atomic_path(config.out / MANIFEST) as partial:
        pd.DataFrame(rows).to_parquet(partial, index=False)
    log(f"{len(cells)} cells -> {config.out}")
    return config.out / "grid.png"
