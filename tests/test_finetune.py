"""`blipdiff finetune` on a tiny random checkpoint: both modes train, change the generations, save a
subject checkpoint that loads offline (Python API and `blipdiff generate`), and bad input is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import save_tiny_blip_diffusion

from blipdiff.models.blip_diffusion import BlipDiffusionPipeline, CheckpointError
from blipdiff.tasks.finetune import FinetuneConfig, finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLIPDIFF = Path(sys.executable).parent / "blipdiff"
SIZE = 32
# A learning rate the tiny model moves with in a few steps (the real default is 5e-6).
TRAINING = {"steps": 12, "resolution": SIZE, "lr": 1e-3, "batch_size": 2, "lora_rank": 4, "device": "cpu"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_blip_diffusion(tmp_path_factory.mktemp("finetune") / "checkpoint")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A folder of three photos of one 'subject': a red square on noise, in different places."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for index in range(3):
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        pixels[8 + 4 * index:32 + 4 * index, 16:40] = (220, 30, 30)
        Image.fromarray(pixels).save(folder / f"{index:02d}.png")
    return folder


@pytest.fixture(scope="module")
def subjects(checkpoint, photos, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("subjects")
    return {mode: finetune(FinetuneConfig(model=str(checkpoint), images=[photos], subject="dog", out=root / mode,
                                          mode=mode, **TRAINING), log=lambda line: None)
            for mode in ("full", "lora")}


def generate(pipe: BlipDiffusionPipeline, embeds: torch.Tensor) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("in the jungle", target_subject_category="dog", subject_embeds=embeds, height=SIZE, width=SIZE,
                num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_both_modes_write_a_subject_checkpoint(subjects):
    full, lora = subjects["full"], subjects["lora"]
    assert (full / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (full / "unet_lora").exists()
    assert (lora / "unet_lora" / "pytorch_lora_weights.safetensors").is_file() and not (lora / "unet").exists()
    # The adapter is a small fraction of the U-Net.
    assert (lora / "unet_lora" / "pytorch_lora_weights.safetensors").stat().st_size < \
        (full / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size / 4
    for folder in (full, lora):
        record = json.loads((folder / "subject.json").read_text())
        assert record["subject"] == "dog" and len(record["losses"]) == TRAINING["steps"]
        assert {"load", "subject embedding", "latent encoding", "training", "saving"} <= set(record["seconds"])
        assert record["train_seconds"] == record["seconds"]["training"] > 0
        assert len(record["settings"]["images"]) == 3


def test_the_loss_falls_when_the_subject_is_overfit(checkpoint, photos, tmp_path):
    config = FinetuneConfig(model=str(checkpoint), images=[photos / "00.png"], subject="dog", out=tmp_path / "one",
                            **{**TRAINING, "steps": 30, "batch_size": 1, "lr": 3e-3})
    losses = json.loads((finetune(config, log=lambda line: None) / "subject.json").read_text())["losses"]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_the_default_learning_rate_depends_on_the_mode_and_a_given_one_is_kept(checkpoint, photos, tmp_path):
    def made(**changes) -> FinetuneConfig:
        return FinetuneConfig(model=str(checkpoint), images=[photos], subject="dog", out=tmp_path / "x", **changes)

    assert made().lr == made(mode="full").lr == 5e-6 and made(mode="lora").lr == 2e-4
    assert made(mode="lora").settings()["lr"] == 2e-4  # the resolved rate is what subject.json records
    assert made(mode="lora", lr=5e-6).lr == 5e-6 and made(mode="full", lr=1e-3).lr == 1e-3
    # A full-mode checkpoint made before (lr 5e-6 recorded) still matches a rerun with the default.
    assert made().settings() == made(lr=5e-6).settings()
    with pytest.raises(ValueError, match="greater than 0"):
        made(lr=0)


def test_lora_trains_about_as_far_as_full_at_their_default_learning_rates(checkpoint, photos, tmp_path):
    """Issue 22: at full mode's 5e-6 a LoRA adapter hardly trained (on an H200, 80 steps took its loss 1.12 ->
    1.11, full mode's 1.12 -> 0.07). Each mode at its default learning rate and the default rank, over the
    same 20 steps on the same samples (one seed: the same latents, noise and timesteps each step): how far
    the loss falls below the untrained model's on those samples, over the second half of the steps.
    Measured: full 0.0143; LoRA 0.0107 at 2e-4 (0.0050 at 1e-4, 0.0002 at 5e-6)."""
    settings = {"model": str(checkpoint), "images": [photos], "subject": "dog", "steps": 20, "resolution": SIZE,
                "batch_size": 2, "precision": "fp32", "device": "cpu"}

    def losses(name: str, **changes) -> np.ndarray:
        out = finetune(FinetuneConfig(out=tmp_path / name, **settings, **changes), log=lambda line: None)
        return np.array(json.loads((out / "subject.json").read_text())["losses"])

    untrained = losses("untrained", lr=1e-30)
    fall = {mode: float((untrained - losses(mode, mode=mode))[10:].mean()) for mode in ("full", "lora")}
    assert fall["full"] > 0.005, fall
    assert 0.5 < fall["lora"] / fall["full"] < 2, fall


def test_subject_checkpoints_change_the_generations_and_load_offline(checkpoint, subjects, photos):
    base = BlipDiffusionPipeline.from_pretrained(checkpoint)
    photo_embeds = base.subject_embedding(sorted(photos.iterdir()), "dog")
    before = generate(base, photo_embeds)
    images = {}
    for mode, folder in subjects.items():
        pipe = BlipDiffusionPipeline.from_pretrained(checkpoint)
        embeds = pipe.load_subject(folder)
        assert embeds.shape == photo_embeds.shape
        assert not torch.equal(embeds, photo_embeds), "the subject embedding did not train"
        images[mode] = generate(pipe, embeds)
        assert np.abs(images[mode] - before).max() > 1e-3, mode
        np.testing.assert_array_equal(generate(pipe, embeds), images[mode])
        with pytest.raises(ValueError, match="already applied"):
            pipe.load_subject(folder)
    assert np.abs(images["full"] - images["lora"]).max() > 1e-3


def test_generate_uses_a_subject_checkpoint(checkpoint, subjects, tmp_path):
    out = tmp_path / "generations"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(BLIPDIFF), "generate", "--model", str(checkpoint), "--subject-checkpoint",
                           str(subjects["lora"]), "--subject", "dog", "--prompt", "in the jungle", "--out", str(out),
                           "--steps", "2", "--height", str(SIZE), "--width", str(SIZE)],
                          capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    pipe = BlipDiffusionPipeline.from_pretrained(checkpoint)
    expected = pipe("in the jungle", target_subject_category="dog", subject_embeds=pipe.load_subject(subjects["lora"]),
                    height=SIZE, width=SIZE, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    made = np.asarray(Image.open(out / "p000_i00.png"), dtype=np.int16)
    assert np.abs(made - np.asarray(expected, dtype=np.int16)).max() <= 1


def test_a_rerun_keeps_the_checkpoint_and_other_settings_are_refused(checkpoint, subjects, photos):
    folder = subjects["full"]
    stamp = (folder / "subject.json").stat().st_mtime_ns
    config = FinetuneConfig(model=str(checkpoint), images=[photos], subject="dog", out=folder, mode="full", **TRAINING)
    assert finetune(config, log=lambda line: None) == folder
    assert (folder / "subject.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="another subject checkpoint"):
        finetune(config.model_copy(update={"steps": 3}), log=lambda line: None)


def test_a_folder_that_is_not_a_subject_checkpoint_is_refused(checkpoint, tmp_path):
    pipe = BlipDiffusionPipeline.from_pretrained(checkpoint)
    with pytest.raises(CheckpointError, match="not a subject checkpoint"):
        pipe.load_subject(tmp_path)


def finetune_cli(*args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BLIPDIFF), "finetune", *args], capture_output=True, text=True, env=environment,
                          timeout=300)


@pytest.mark.parametrize(("change", "message"), [
    ({"images": "missing"}, "no such file or folder"),
    ({"images": "unreadable"}, "not a readable image"),
    ({"images": "empty folder"}, "no photos"),
    ({"subject": " "}, "subject is empty"),
    ({"steps": "0"}, "steps"),
    ({"model": "not-a-model"}, "no such folder"),
    ({"model": "no index"}, "model_index.json"),
    ({"mode": "dreambooth"}, "mode"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(checkpoint, photos, tmp_path, change, message):
    options = {"model": str(checkpoint), "images": str(photos), "subject": "dog", "steps": "2",
               "resolution": str(SIZE), **change}
    if options["images"] == "missing":
        options["images"] = str(tmp_path / "nowhere.jpg")
    elif options["images"] == "unreadable":
        (tmp_path / "x.jpg").write_text("not an image")
        options["images"] = str(tmp_path / "x.jpg")
    elif options["images"] == "empty folder":
        (tmp_path / "empty").mkdir()
        options["images"] = str(tmp_path / "empty")
    if options["model"] == "not-a-model":
        options["model"] = str(tmp_path / "not-a-model")
    elif options["model"] == "no index":
        (tmp_path / "no-index").mkdir()
        options["model"] = str(tmp_path / "no-index")
    out = tmp_path / "subject"
    done = finetune_cli(*[part for key, value in options.items() for part in (f"--{key}", value)], "--out", str(out))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert not out.exists()
