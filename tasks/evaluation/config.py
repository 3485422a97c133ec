"""``blipdiff eval``'s settings, and what names each image of a run: its seed, its path, its journal, its
job; the evaluation itself is ``run.py``."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from blipdiff.infra.inputs import Identifier, ImageSide, model_location
from blipdiff.models import DEFAULT_CLIP, DEFAULT_DINO
from blipdiff.models.devices import DTYPE_HELP, DType

SETTINGS_FILE = "eval.json"
GENERATIONS = "generations.parquet"
SCORES = "scores.parquet"
SUMMARY = "summary.json"


class EvalSettings(BaseModel):
    """What a DreamBench evaluation runs, besides the model and the run folder: shared by ``blipdiff eval``
    and the ``dreambench_eval`` flow's form."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dreambench: Path = Field(description="DreamBench's dataset folder (DreamBooth's layout).")
    method: Literal["blip-diffusion", "dreambooth"] = Field(
        "blip-diffusion", description="blip-diffusion, or dreambooth (fine-tuned per subject on the base model, "
        "the CLI's --base; prompts with the identifier).")
    mode: Literal["zero-shot", "finetuned"] = Field(
        "zero-shot", description="zero-shot, or finetuned (blipdiff finetune per subject first).")
    subjects: list[str] = Field(default_factory=list, description="Subjects to evaluate (empty: all of them).")
    prompts: int = Field(25, ge=1, le=25, description="The first N of each subject's 25 prompts.")
    images_per_prompt: int = Field(4, ge=1, description="Images per prompt (the paper: 4).")
    steps: int = Field(100, ge=1, description="PNDM steps (the paper: 100).")
    guidance: float = Field(7.5, ge=0, description="Classifier-free guidance scale.")
    seed_sets: int = Field(1, ge=1, description="Repeats with other seeds; mean and spread reported (the paper: 10).")
    reference: str = Field("all", description="Zero-shot subject embedding: all (mean over the photos), first, or "
                           "FILE (a photo, or a CSV subject,photo).")
    resolution: ImageSide = Field(512, description="Side of the square images.")
    negative_prompt: str = Field("", description="Negative prompt.")
    finetune_steps: int | None = Field(None, ge=1, description="Fine-tuning steps for every subject "
                                       "(default: the paper's Table 3 per subject).")
    finetune_mode: Literal["full", "lora"] = Field("full", description="full or lora.")
    finetune_precision: Literal["bf16", "fp32"] = Field("bf16", description="bf16 or fp32.")
    dreambooth_steps: int = Field(800, ge=1, description="DreamBooth's steps per subject.")
    dreambooth_lr: float = Field(5e-6, gt=0, description="DreamBooth's learning rate.")
    prior_preservation: bool = Field(True, description="DreamBooth's class-specific prior-preservation loss.")
    num_class_images: int = Field(200, ge=1, description="DreamBooth's class images per class.")
    identifier: Identifier = Field("sks", description="DreamBooth's identifier in the prompts.")
    dtype: DType = Field("auto", description=DTYPE_HELP)  # the generation's dtype
    dino: str = Field(DEFAULT_DINO, description="DINO ViT-S/16: hub id or folder.")
    clip: str = Field(DEFAULT_CLIP, description="CLIP ViT-B/32: hub id or folder.")
    dataset: str | None = Field("dreambench", description="FiftyOne dataset of the catalog (empty: no catalog).")
    actors: int = Field(1, ge=1, description="Generation actors on Ray (one model each; one per GPU, say).")

    @field_validator("subjects")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        names = [name.strip() for name in value if name.strip()]
        if len(set(names)) != len(names):
            raise ValueError("a subject is named twice")
        return names

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return value.strip()

    @property
    def report_mode(self) -> str:
        """Which of the paper's numbers the run stands beside: zero-shot, finetuned or dreambooth."""
        return "dreambooth" if self.method == "dreambooth" else self.mode

    def protocol(self) -> dict:
        """What makes two evaluations comparable (the history's fingerprint): everything but the model,
        the catalog and the fan-out."""
        from blipdiff.datasets.dreambench import PROMPT_FORM

        protocol = self.model_dump(mode="json", include=set(EvalSettings.model_fields) - {"dataset", "actors"})
        protocol["dreambench"] = str(self.dreambench.resolve())
        # Runs whose text encoder got other texts made other images: neither comparable nor resumable.
        protocol["prompt_form"] = PROMPT_FORM
        return protocol


class EvalConfig(EvalSettings):
    """One ``blipdiff eval`` run."""

    model: str = Field(description="Hub id or local checkpoint folder in the official layout.")
    out: Path = Field(description="Run folder; rerunning the command finishes it.")
    checkpoint_step: int | None = Field(None, description="The training step of the model, when known.")

    @property
    def run_id(self) -> str:
        return self.out.resolve().name

    def settings(self) -> dict:
        """What decides the images and scores of the run folder."""
        return {**self.protocol(), "model": model_location(self.model)}


def image_seed(seed_set: int, subject: str, prompt_index: int, image_index: int) -> int:
    """A seed of its own for every image, the same in every run and on every machine."""
    key = f"dreambench/{seed_set}/{subject}/{prompt_index}/{image_index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") >> 1


def image_path(seed_set: int, subject: str, prompt_index: int, image_index: int) -> str:
    return f"images/seed-set-{seed_set}/{subject}/{prompt_index:02d}_{image_index}.png"


def reference_photos(settings: EvalSettings, subject) -> list[Path]:
    """The photos whose mean is the zero-shot subject embedding."""
    if settings.reference == "all":
        return list(subject.photos)
    if settings.reference == "first":
        return [subject.photos[0]]
    path = Path(settings.reference)
    if path.suffix.lower() in (".csv", ".txt"):
        chosen = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            name, _, photo = line.strip().partition(",")
            if name and photo:
                chosen[name.strip()] = photo.strip()
        if subject.name not in chosen:
            raise ValueError(f"--reference {path}: no photo for {subject.name}")
        photo = Path(chosen[subject.name])
        return [photo if photo.is_absolute() else subject.photos[0].parent / photo]
    return [path]


def journal_path(out: Path, seed_set: int, subject: str) -> Path:
    return out / "journal" / f"{seed_set}-{subject}.jsonl"


@dataclass(frozen=True)
class EvalJob:
    """One image of the run: whose, from which prompt, with which seed, where."""

    seed_set: int
    subject: str
    class_name: str
    live: bool
    prompt_index: int
    prompt: str
    kind: str
    image_index: int
    text_encoder_prompt: str
    seed: int
    path: str

    def row(self) -> dict:
        """The job as a row of ``generations.parquet`` (and of the scoring), its class under ``class``."""
        return {"class" if name == "class_name" else name: value for name, value in asdict(self).items()}
