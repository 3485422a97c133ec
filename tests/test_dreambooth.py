"""DreamBooth, the baseline, on tiny random Stable Diffusion checkpoints on the CPU, through Ray Train:
the prior-preservation loss, the class-image cache, full and LoRA checkpoints, resuming, generation with
the identifier, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import shared_path
from PIL import Image
from safetensors.torch import load_file
from tiny_models import save_tiny_blip_diffusion
from typer.testing import CliRunner

from blipdiff.infra.cli import app
from blipdiff.models.stable_diffusion import load_dreambooth, load_stable_diffusion
from blipdiff.infra.demo.random_models import save_tiny_stable_diffusion
from blipdiff.models.training.dreambooth_model import draw_batch
from blipdiff.models.training.objective import dreambooth_loss
from blipdiff.tasks.dreambooth.class_images import class_image_folder, ensure_class_images
from blipdiff.tasks.dreambooth.config import DreamBoothConfig
from blipdiff.tasks.dreambooth.train import run_dreambooth, train_worker

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "stable-diffusion")


@pytest.fixture(scope="module")
def photos() -> Path:
    return shared_path("dreambench", "dataset", "dog")


@pytest.fixture(scope="module")
def class_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("class-images")


def config(base: Path, photos: Path, out: Path, class_cache: Path, **changes) -> DreamBoothConfig:
    settings = {"base": str(base), "images": [photos], "class_noun": "dog", "out": out, "steps": 2,
                "checkpoint_every": 1, "prior_preservation": True, "num_class_images": 2, "class_steps": 2,
                "resolution": SIZE, "precision": "fp32", "lr": 1e-3, "class_images": class_cache, **changes}
    return DreamBoothConfig(**settings)


def render(pipe, prompt: str = "a sks dog on the beach") -> np.ndarray:
    return pipe(prompt, height=SIZE, width=SIZE, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.fixture(scope="module")
def full_run(ray_cluster, base, photos, class_cache, tmp_path_factory) -> Path:
    return run_dreambooth(config(base, photos, tmp_path_factory.mktemp("full") / "run", class_cache, steps=4))


def test_the_prior_preservation_batch_is_instances_then_class_samples_and_the_loss_their_weighted_sum(base):
    from diffusers import DDPMScheduler

    pipe = load_stable_diffusion(base)
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, SIZE // 2, SIZE // 2, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([10, 500, 10, 900])
    tokens = pipe.tokenizer(["a sks dog", "a sks dog", "a dog", "a dog"], padding="max_length", max_length=77,
                            return_tensors="pt").input_ids
    with torch.no_grad():
        context = pipe.text_encoder(tokens)[0]
        parts = dreambooth_loss(pipe.unet, latents, noise, timesteps, context, 2, 0.5, schedule)
        alone = [dreambooth_loss(pipe.unet, latents[rows], noise[rows], timesteps[rows], context[rows], 2, 0.5,
                                 schedule) for rows in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(parts.instance, alone[0].total)
    torch.testing.assert_close(parts.prior, alone[1].total)
    torch.testing.assert_close(parts.total, parts.instance + 0.5 * parts.prior)
    assert alone[0].prior is None and parts.prior > 0


def test_a_step_draws_the_subjects_photos_then_as_many_class_images():
    instances = (torch.full((3, 4, 2, 2), 1.0), torch.full((3, 4, 2, 2), 0.1))
    classes = (torch.full((5, 4, 2, 2), -1.0), torch.full((5, 4, 2, 2), 0.2))
    mean, std, rows = draw_batch(instances, classes, 2, torch.Generator().manual_seed(0))
    assert rows == [0, 0, 1, 1] and mean.shape == (4, 4, 2, 2)
    assert (mean[:2] == 1).all() and (mean[2:] == -1).all() and (std[:2] == 0.1).all() and (std[2:] == 0.2).all()
    mean, _, rows = draw_batch(instances, None, 2, torch.Generator().manual_seed(0))
    assert rows == [0, 0] and (mean == 1).all()


def test_two_workers_train_and_checkpoint_together(ray_cluster, base, photos, class_cache, tmp_path):
    out = run_dreambooth(config(base, photos, tmp_path / "two", class_cache, steps=2, workers=2, checkpoint_every=2))
    checkpoint = out / "checkpoints" / "step-000002"
    assert (checkpoint / "rng-rank0.pt").is_file() and (checkpoint / "rng-rank1.pt").is_file()
    assert json.loads((checkpoint / "state.json").read_text())["workers"] == 2
    assert np.abs(render(load_dreambooth(base, out)) - render(load_stable_diffusion(base))).max() > 1e-3


def test_class_images_are_generated_once_and_shared_by_the_runs_of_a_class(full_run, base, photos, class_cache,
                                                                          tmp_path):
    first = config(base, photos, tmp_path / "other", class_cache)
    folder = class_image_folder(first)
    images = sorted(folder.glob("*.png"))
    assert len(images) == 2 and (folder / "class.json").is_file()
    assert json.loads((folder / "class.json").read_text())["prompt"] == "a dog"
    before = {path.name: path.stat().st_mtime_ns for path in images}
    said = []
    assert ensure_class_images(first, said.append) == folder
    assert "reused" in said[0]
    assert {path.name: path.stat().st_mtime_ns for path in sorted(folder.glob("*.png"))} == before
    # Another subject of the class with the same settings shares them; another class, count or seed does not.
    assert class_image_folder(config(base, photos, tmp_path / "x", class_cache, images=[photos / "00.jpg"])) == folder
    for change in ({"class_noun": "cat"}, {"num_class_images": 3}, {"seed": 1}):
        assert class_image_folder(config(base, photos, tmp_path / "x", class_cache, **change)) != folder
    with Image.open(images[0]) as image:
        assert image.size == (SIZE, SIZE)


def test_the_class_images_take_part_in_training(full_run, base, photos, class_cache, tmp_path):
    # The same run without prior preservation ends elsewhere: the class images reached the workers' batches.
    alone = run_dreambooth(config(base, photos, tmp_path / "no-prior", class_cache, steps=4, prior_preservation=False))
    with_prior, without = load_file(full_run / "unet" / "model.safetensors"), load_file(alone / "unet" / "model.safetensors")
    assert max((with_prior[key] - without[key]).abs().max().item() for key in with_prior) > 1e-6


def test_full_and_lora_checkpoints_change_the_generations(full_run, base, photos, class_cache, tmp_path):
    record = json.loads((full_run / "dreambooth.json").read_text())
    assert record["identifier"] == "sks" and record["prompt"] == "a sks dog" and len(record["losses"]) == 4
    assert (full_run / "unet" / "model.safetensors").is_file() and not (full_run / "text_encoder").exists()
    plain = render(load_stable_diffusion(base))
    tuned = render(load_dreambooth(base, full_run))
    assert np.abs(tuned - plain).max() > 1e-3

    lora = run_dreambooth(config(base, photos, tmp_path / "lora", class_cache, mode="lora", train_text_encoder=True))
    assert (lora / "unet_lora").is_dir() and (lora / "text_encoder_lora").is_dir() and not (lora / "unet").exists()
    adapted = render(load_dreambooth(base, lora))
    assert np.abs(adapted - plain).max() > 1e-4
    assert np.abs(adapted - tuned).max() > 1e-4


def test_generate_method_dreambooth_matches_the_python_api(full_run, base, tmp_path):
    runner = CliRunner()
    args = ["generate", "--method", "dreambooth", "--model", str(base), "--subject-checkpoint", str(full_run),
            "--subject", "dog", "--prompt", "a sks dog on the beach", "--steps", "2", "--height", str(SIZE),
            "--width", str(SIZE), "--guidance", "7.5", "--out", str(tmp_path / "made")]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    made = np.asarray(Image.open(tmp_path / "made" / "p000_i00.png"), dtype=np.float32) / 255
    np.testing.assert_allclose(made, render(load_dreambooth(base, full_run))[0], atol=1 / 255 + 1e-6)
    unnamed = runner.invoke(app, [*args[:-1], str(tmp_path / "bad"), "--prompt", "a dog on the beach"])
    assert unnamed.exit_code == 2 and "by its identifier" in unnamed.output and not (tmp_path / "bad").exists()


def test_a_rerun_resumes_from_the_newest_checkpoint_to_the_uninterrupted_weights(full_run, base, photos, class_cache,
                                                                                 tmp_path):
    out = tmp_path / "resumed"
    run_dreambooth(config(base, photos, out, class_cache, steps=2))
    said = []
    run_dreambooth(config(base, photos, out, class_cache, steps=4), log=said.append)
    assert any("resuming from" in line and "step-000002" in line for line in said)
    resumed, uninterrupted = load_file(out / "unet" / "model.safetensors"), load_file(full_run / "unet" / "model.safetensors")
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0)
    assert [path.name for path in (out / "checkpoints").iterdir()] == ["step-000004"]  # older ones pruned
    assert json.loads((out / "dreambooth.json").read_text())["losses"] == \
        json.loads((full_run / "dreambooth.json").read_text())["losses"]
    done = []
    moved = tmp_path / "class-images-moved"  # where the cache lives is no part of the run
    run_dreambooth(config(base, photos, out, moved, steps=4), log=done.append)
    assert "already holds" in done[0]
    with pytest.raises(ValueError, match="another DreamBooth run"):
        run_dreambooth(config(base, photos, out, class_cache, steps=4, lr=2e-3))


def test_a_blip_diffusion_checkpoint_serves_as_the_base(ray_cluster, photos, class_cache, tmp_path):
    blip = save_tiny_blip_diffusion(tmp_path / "blip-diffusion")
    out = run_dreambooth(config(blip, photos, tmp_path / "run", class_cache, steps=1, prior_preservation=False))
    assert np.abs(render(load_dreambooth(blip, out)) - render(load_stable_diffusion(blip))).max() > 1e-4


def test_the_defaults_are_diffusers_recipe_prior_preservation_clipping_and_a_learning_rate_per_mode(
        base, photos, class_cache, tmp_path, monkeypatch):
    """What `blipdiff dreambooth` runs when told nothing: prior preservation (the paper's defining loss;
    --no-prior-preservation turns it off), gradients clipped at a norm of 1.0, lr 5e-6, or 2e-4 for LoRA."""
    import blipdiff.tasks.dreambooth.train as dreambooth

    given = []
    monkeypatch.setattr(dreambooth, "run_dreambooth", lambda config, log: given.append(config))
    args = ["dreambooth", "--base", str(base), "--images", str(photos), "--class-noun", "dog", "--out",
            str(tmp_path / "out"), "--class-images", str(class_cache)]
    runner = CliRunner()
    for extra in ([], ["--mode", "lora"], ["--no-prior-preservation", "--max-grad-norm", "0", "--lr", "1e-5",
                                          "--mode", "lora"]):
        done = runner.invoke(app, [*args, *extra])
        assert done.exit_code == 0, done.output
    default, lora, told = given
    assert (default.prior_preservation, default.max_grad_norm, default.lr, default.mode) == (True, 1.0, 5e-6, "full")
    assert (lora.prior_preservation, lora.max_grad_norm, lora.lr) == (True, 1.0, 2e-4)
    assert (told.prior_preservation, told.max_grad_norm, told.lr) == (False, None, 1e-5)
    assert default.num_class_images == 200 and default.steps == 800
    direct = DreamBoothConfig(base=str(base), images=[photos], class_noun="dog", out=tmp_path / "x",
                              class_images=class_cache)
    assert (direct.prior_preservation, direct.max_grad_norm, direct.lr) == (True, 1.0, 5e-6)
    assert direct.settings()["lr"] == 5e-6  # the resolved rate is what the run records
    # A run recorded before clipping existed (no max_grad_norm) resumes only unclipped.
    assert "max_grad_norm" not in direct.model_copy(update={"max_grad_norm": None}).trajectory()
    assert direct.trajectory()["max_grad_norm"] == 1.0


def test_gradients_are_clipped_to_max_grad_norm_before_each_step(base, photos, class_cache, tmp_path, monkeypatch):
    """The total gradient norm is clipped (after the all-reduce, before the optimiser's step) each step."""
    clip = torch.nn.utils.clip_grad_norm_
    calls = []

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        calls.append((max_norm, float(total), float(after)))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)

    def train(name: str, **changes) -> dict:
        run = config(base, photos, tmp_path / name, class_cache, prior_preservation=False, checkpoint_every=2,
                     **changes)
        train_worker(run, 0, 1, "cpu", None)
        return load_file(run.out / "unet" / "model.safetensors")

    train("default")
    assert [call[0] for call in calls] == [1.0, 1.0]
    assert all(total > 1.0 and after <= 1.0 + 1e-4 for _, total, after in calls), calls
    calls.clear()
    unclipped = train("unclipped", max_grad_norm=None)
    assert calls == []
    # Clipped to almost nothing, Adam's steps become tiny (the gradients fall far below its epsilon).
    clipped = train("clipped", max_grad_norm=1e-12)
    before = load_stable_diffusion(base).unet.state_dict()
    moved = {name: max((weights[key] - before[key]).abs().max().item() for key in weights)
             for name, weights in (("unclipped", unclipped), ("clipped", clipped))}
    assert moved["clipped"] < 0.01 * moved["unclipped"], moved


@pytest.mark.parametrize("changes, message", [
    ({"images": "empty"}, "no photos"),
    ({"identifier": "sks token"}, "without spaces"),
    ({"class_images": "under-a-file"}, "not writable"),
])
def test_bad_input_is_a_clear_error(base, photos, class_cache, tmp_path, changes, message):
    runner = CliRunner()
    images = photos
    cache = class_cache
    if changes.get("images") == "empty":
        images = tmp_path / "empty"
        images.mkdir()
    if changes.get("class_images") == "under-a-file":
        (tmp_path / "a-file").write_text("not a folder")
        cache = tmp_path / "a-file" / "cache"
    args = ["dreambooth", "--base", str(base), "--images", str(images), "--class-noun", "dog", "--out",
            str(tmp_path / "out"), "--prior-preservation", "--class-images", str(cache),
            "--identifier", changes.get("identifier", "sks")]
    done = runner.invoke(app, args)
    assert done.exit_code == 2 and message in done.output, done.output
    assert not (tmp_path / "out").exists()
