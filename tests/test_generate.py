"""`blipdiff generate` through the installed console script, on a tiny random checkpoint in the
released layout: the PNGs and their sidecar, agreement with the Python API, reruns, and bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import SHARED_DATA
from PIL import Image
from tiny_models import save_tiny_blip_diffusion

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLIPDIFF = Path(sys.executable).parent / "blipdiff"
PROMPTS = ["in the jungle", "on the beach"]
SEED = 7
# Deliberately not the defaults, so that each must reach the pipeline; not square, so that height and
# width cannot be swapped unnoticed.
SETTINGS = {"steps": 2, "height": 64, "width": 56, "guidance": 6.0, "negative_prompt": "a red photo",
            "scheduler": "ddim", "seed": SEED, "num_images": 2}


def blipdiff(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # One intra-op thread, as in this process: the float sums then run in the same order on both sides.
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([str(BLIPDIFF), *args], capture_output=True, text=True, timeout=300, env=environment)


def generate_args(checkpoint: Path, photos: list[Path], out: Path, **changes) -> list[str]:
    """The `generate` command line for SETTINGS, with ``changes`` (None drops an option)."""
    options = {"model": str(checkpoint), "subject": "dog", "out": str(out), **SETTINGS, **changes}
    args = ["generate"]
    for photo in options.pop("images", photos):
        args += ["--image", str(photo)]
    for prompt in options.pop("prompts", PROMPTS):
        args += ["--prompt", prompt]
    for key, value in options.items():
        if value is not None:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_blip_diffusion(tmp_path_factory.mktemp("blipdiffusion") / "checkpoint")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Two photos of one subject: DreamBench's dog where the shared data is present, else two JPEGs."""
    real = SHARED_DATA / "dreambench" / "dataset" / "dog"
    if real.is_dir():
        return sorted(real.glob("*.jpg"))[:2]
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    paths = [folder / f"{i:02d}.jpg" for i in range(2)]
    for i, path in enumerate(paths):
        Image.fromarray(rng.integers(0, 256, (60 + 10 * i, 50, 3), dtype=np.uint8)).save(path, quality=95)
    return paths


@pytest.fixture(scope="module")
def first_run(checkpoint, photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generate") / "out"
    done = blipdiff(*generate_args(checkpoint, photos, out))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{len(PROMPTS) * SETTINGS['num_images']} images -> {out}" in done.stdout
    return out


@pytest.fixture(scope="module")
def pipe(checkpoint):
    from diffusers import DDIMScheduler

    from blipdiff.models.blip_diffusion import BlipDiffusionPipeline

    pipe = BlipDiffusionPipeline.from_pretrained(checkpoint)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def api_image(pipe, prompt: str, seed: int, **subject) -> np.ndarray:
    image = pipe(prompt, target_subject_category="dog", guidance_scale=SETTINGS["guidance"],
                 height=SETTINGS["height"], width=SETTINGS["width"], num_inference_steps=SETTINGS["steps"],
                 neg_prompt=SETTINGS["negative_prompt"], generator=torch.Generator("cpu").manual_seed(seed),
                 **subject).images[0]
    return np.asarray(image)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


def test_generate_writes_the_images_and_a_sidecar_with_every_setting(first_run, checkpoint, photos):
    names = [f"p{p:03d}_i{k:02d}.png" for p in range(len(PROMPTS)) for k in range(SETTINGS["num_images"])]
    pngs = sorted(path.name for path in first_run.glob("*.png"))
    assert pngs == names
    assert not [path.name for path in first_run.iterdir() if path.name.startswith(".")], "temporaries left"
    for name in names:
        assert read_png(first_run / name).shape == (SETTINGS["height"], SETTINGS["width"], 3)
    assert not np.array_equal(read_png(first_run / names[0]), read_png(first_run / names[1]))
    assert not np.array_equal(read_png(first_run / names[0]), read_png(first_run / names[2]))

    sidecar = pd.read_parquet(first_run / "generations.parquet")
    assert len(sidecar) == len(names)
    assert sorted(sidecar["file"]) == names
    for row in sidecar.itertuples():
        assert row.file == f"p{row.prompt_index:03d}_i{row.image_index:02d}.png"
        assert row.prompt == PROMPTS[row.prompt_index]
        assert row.seed == SEED + row.image_index, f"{row.file}: seed {row.seed}, drawn with {SEED + row.image_index}"
        assert row.model == str(checkpoint)
        assert [Path(path) for path in row.images] == [path.resolve() for path in photos]
        assert row.subject == "dog"
        for key in ("steps", "height", "width", "guidance", "negative_prompt", "scheduler", "num_images"):
            assert getattr(row, key) == SETTINGS[key], key
        assert row.dtype == "float32" and row.device == "cpu"


def test_generate_matches_the_python_api(first_run, pipe, photos):
    """Image k of every prompt is the Python API's with seed + k and the photos' mean subject embedding."""
    embeds = pipe.subject_embedding(photos, "dog")
    for p, prompt in enumerate(PROMPTS):
        for k in range(SETTINGS["num_images"]):
            made = read_png(first_run / f"p{p:03d}_i{k:02d}.png")
            expected = api_image(pipe, prompt, SEED + k, subject_embeds=embeds)
            mismatched = int((made != expected).any(axis=2).sum())
            assert mismatched == 0, f"prompt {p} image {k}: {mismatched} pixels differ from the Python API's"
    by_path = api_image(pipe, PROMPTS[0], SEED, reference_image=[str(path) for path in photos],
                        source_subject_category="dog")
    np.testing.assert_array_equal(read_png(first_run / "p000_i00.png"), by_path)


def modified(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in folder.glob("*.png")}


def test_rerun_skips_the_made_images_and_refuses_other_settings(first_run, checkpoint, photos, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    before = modified(out)

    again = blipdiff(*generate_args(checkpoint, photos, out))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("0 made, 2 already there") == len(PROMPTS)
    assert modified(out) == before
    assert len(pd.read_parquet(out / "generations.parquet")) == len(before)

    # A lost image is made again, exactly as before, and only it.
    original = read_png(out / "p001_i01.png")
    (out / "p001_i01.png").unlink()
    again = blipdiff(*generate_args(checkpoint, photos, out))
    assert again.returncode == 0, again.stderr
    assert "1 made, 1 already there" in again.stdout
    remade = modified(out)
    assert {name: time for name, time in remade.items() if name != "p001_i01.png"} == \
        {name: time for name, time in before.items() if name != "p001_i01.png"}
    mismatched = int((read_png(out / "p001_i01.png") != original).any(axis=2).sum())
    assert mismatched == 0, f"the remade image differs from the first run's in {mismatched} pixels"

    # Other settings into the same folder: refused, nothing touched.
    listing = sorted(path.name for path in out.iterdir())
    now = modified(out)
    other = blipdiff(*generate_args(checkpoint, photos, out, steps=3))
    assert other.returncode == 2
    assert other.stderr.startswith("error: ") and "another run" in other.stderr
    assert "Traceback" not in other.stderr
    assert sorted(path.name for path in out.iterdir()) == listing and modified(out) == now

    # A folder that holds something else is refused too.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = blipdiff(*generate_args(checkpoint, photos, foreign))
    assert refused.returncode == 2 and "not empty" in refused.stderr
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]


def _text_as_jpeg(tmp_path: Path) -> Path:
    path = tmp_path / "x.jpg"
    path.write_text("not an image at all\n")
    return path


def _without_unet(checkpoint: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "no-unet"
    shutil.copytree(checkpoint, folder)
    shutil.rmtree(folder / "unet")
    return folder


# (changes to the command line, what the one-line error must say); a callable builds a value in tmp_path.
BAD_INPUTS = {
    "missing image": ({"images": lambda tmp, ck, ph: [ph[0], tmp / "nope.jpg"]}, "no such file"),
    "unreadable image": ({"images": lambda tmp, ck, ph: [_text_as_jpeg(tmp)]}, "not a readable image"),
    "empty subject": ({"subject": "  "}, "subject"),
    "size not a multiple of 8": ({"height": 36}, "multiple of 8"),
    "unknown scheduler": ({"scheduler": "euler"}, "scheduler"),
    "negative steps": ({"steps": -2}, "steps"),
    "no images per prompt": ({"num_images": 0}, "num_images"),
    "empty prompt": ({"prompts": ["in the jungle", " "]}, "prompt"),
    "unknown dtype": ({"dtype": "float64"}, "dtype"),
    "model folder that does not exist": ({"model": lambda tmp, ck, ph: tmp / "no-such-model"}, "no such folder"),
    "model folder lacking a component": ({"model": lambda tmp, ck, ph: _without_unet(ck, tmp)}, "unet"),
    "hub id while offline": ({"model": "Salesforce/blipdiffusion"}, "HF_HUB_OFFLINE"),
    "a device this machine lacks": ({"device": "cuda"}, "no cuda device"),
    "neither photos nor a subject checkpoint": ({"images": lambda tmp, ck, ph: []}, "--subject-checkpoint"),
    "a subject checkpoint that is not there": ({"subject_checkpoint": lambda tmp, ck, ph: tmp / "nowhere",
                                                 "images": lambda tmp, ck, ph: []}, "no such folder"),
    "not a device": ({"device": "gpu0"}, "not a torch device"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_writes_nothing(case, checkpoint, photos, tmp_path):
    changes, expected = BAD_INPUTS[case]
    changes = {key: value(tmp_path, checkpoint, photos) if callable(value) else value
               for key, value in changes.items()}
    out = tmp_path / "out"
    hf_home = tmp_path / "empty-hf-home"  # nothing cached: a hub id cannot resolve offline
    hf_home.mkdir()
    done = blipdiff(*generate_args(checkpoint, photos, out, **changes), env={"HF_HOME": str(hf_home)})
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert expected in lines[0]
    assert not out.exists()
