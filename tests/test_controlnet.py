"""Structure control with ControlNet on tiny random checkpoints: the official ``blipdiffusion-controlnet``
layout, ControlNets added to a base checkpoint, several at once, Canny conditioning from a real
DreamBench photo, saving, and ``blipdiff generate --control``. Parity with the reference pipeline is in
test_reference_parity.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import shared_path
from PIL import Image
from tiny_models import save_tiny_blip_diffusion, save_tiny_controlnet
from typer.testing import CliRunner

from blipdiff.infra.cli import app
from blipdiff.models.blip_diffusion import BlipDiffusionControlNetPipeline, BlipDiffusionPipeline, CheckpointError
from blipdiff.models.blip_diffusion.controlnet import canny_edges, control_image, prepare_control_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32
STEPS = 2


@pytest.fixture(scope="module")
def photos() -> dict[str, Path]:
    dataset = shared_path("dreambench", "dataset")
    return {"dog": dataset / "dog" / "00.jpg", "cat": dataset / "cat" / "00.jpg", "can": dataset / "can" / "00.jpg"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The official blipdiffusion-controlnet layout: model_index.json lists controlnet."""
    return save_tiny_blip_diffusion(tmp_path_factory.mktemp("controlnet") / "checkpoint", controlnet=True)


@pytest.fixture(scope="module")
def second_controlnet(tmp_path_factory) -> Path:
    """Another Stable Diffusion ControlNet in its own layout (config.json at the root), other weights."""
    return save_tiny_controlnet(tmp_path_factory.mktemp("controlnet-2") / "controlnet", seed=11)


@pytest.fixture(scope="module")
def pipe(checkpoint) -> BlipDiffusionControlNetPipeline:
    loaded = BlipDiffusionControlNetPipeline.from_pretrained(checkpoint)
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def edges(photos) -> Image.Image:
    return canny_edges(photos["cat"])


def run(pipe, condition, seed: int = 0, **kwargs) -> np.ndarray:
    kwargs.setdefault("reference_image", kwargs.pop("reference", None))
    return pipe("in the jungle", kwargs.pop("reference_image"), condition, "dog", "dog", height=SIZE, width=SIZE,
                num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), output_type="np",
                **kwargs).images


def test_canny_edges_of_a_real_photo_follow_the_model_cards_recipe(photos):
    import cv2

    edges = canny_edges(photos["dog"])
    pixels = np.asarray(edges)
    with Image.open(photos["dog"]) as photo:
        assert edges.size == photo.size and edges.mode == "RGB"
        expected = cv2.Canny(np.asarray(photo.convert("RGB")), 30, 70)
    assert set(np.unique(pixels)) == {0, 255}
    np.testing.assert_array_equal(pixels[:, :, 0], expected)
    assert np.array_equal(pixels[:, :, 0], pixels[:, :, 2])
    assert 0.01 < (pixels[:, :, 0] > 0).mean() < 0.5, "a photo has edges, and not everywhere"
    looser = np.asarray(canny_edges(photos["dog"], 100, 200))
    assert (looser > 0).sum() < (pixels > 0).sum(), "higher thresholds keep fewer edges"
    np.testing.assert_array_equal(np.asarray(control_image(photos["dog"], "canny")), pixels)
    with pytest.raises(ValueError, match="control type"):
        control_image(photos["dog"], "depth")
    with pytest.raises(ValueError, match="thresholds"):
        canny_edges(photos["dog"], 80, 20)


def test_the_control_image_is_resized_bicubic_to_the_output_and_kept_in_0_1(edges):
    tensor = prepare_control_image(edges, 40, SIZE)
    assert tensor.shape == (1, 3, SIZE, 40)
    expected = np.asarray(edges.resize((40, SIZE), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    np.testing.assert_allclose(tensor[0].permute(1, 2, 0).numpy(), expected, atol=1e-7)


def test_the_official_layout_loads_with_its_controlnet_which_changes_the_image(pipe, checkpoint, photos, edges):
    assert len(pipe.controlnets) == 1
    controlled = run(pipe, edges, reference=photos["dog"])
    other_control = run(pipe, canny_edges(photos["can"]), reference=photos["dog"])
    assert np.abs(controlled - other_control).max() > 1e-3, "the control image must matter"
    base = BlipDiffusionPipeline.from_pretrained(checkpoint, load_controlnet=False)
    base.set_progress_bar_config(disable=True)
    plain = base("in the jungle", photos["dog"], "dog", "dog", height=SIZE, width=SIZE, num_inference_steps=STEPS,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.abs(controlled - plain).max() > 1e-3
    np.testing.assert_array_equal(run(pipe, edges, reference=photos["dog"], controlnet_conditioning_scale=0.0), plain)


def test_two_controlnets_combine_and_a_scale_of_0_removes_one(checkpoint, second_controlnet, pipe, photos, edges):
    two = BlipDiffusionControlNetPipeline.from_pretrained(checkpoint, controlnet=[checkpoint, second_controlnet])
    two.set_progress_bar_config(disable=True)
    assert len(two.controlnets) == 2
    second_only = BlipDiffusionControlNetPipeline.from_pretrained(checkpoint, controlnet=second_controlnet)
    second_only.set_progress_bar_config(disable=True)
    depth_like = photos["can"]  # a ready-made conditioning image for the second
    first = run(pipe, edges, reference=photos["dog"])
    second = run(second_only, depth_like, reference=photos["dog"])
    both = run(two, [edges, depth_like], reference=photos["dog"])
    assert np.abs(both - first).max() > 1e-3 and np.abs(both - second).max() > 1e-3
    np.testing.assert_array_equal(run(two, [edges, depth_like], reference=photos["dog"],
                                      controlnet_conditioning_scale=[1.0, 0.0]), first)
    np.testing.assert_array_equal(run(two, [edges, depth_like], reference=photos["dog"],
                                      controlnet_conditioning_scale=[0.0, 1.0]), second)


def test_several_controlnets_save_and_load_in_diffusers_layout(checkpoint, second_controlnet, photos, edges, tmp_path):
    two = BlipDiffusionControlNetPipeline.from_pretrained(checkpoint, controlnet=[checkpoint, second_controlnet])
    two.set_progress_bar_config(disable=True)
    two.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["controlnet"] == ["diffusers", "MultiControlNetModel"]
    assert (tmp_path / "saved" / "controlnet_1" / "diffusion_pytorch_model.safetensors").is_file()
    again = BlipDiffusionControlNetPipeline.from_pretrained(tmp_path / "saved")
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(again, [edges, photos["can"]], reference=photos["dog"]),
                                  run(two, [edges, photos["can"]], reference=photos["dog"]))


def test_batches_and_per_prompt_control_images(pipe, photos, edges):
    other = canny_edges(photos["can"])
    prompts = ["in the jungle", "on the beach"]
    batch = pipe(prompts, photos["dog"], [edges, other], "dog", "dog", height=SIZE, width=SIZE,
                 num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(s) for s in (1, 2, 1, 2)],
                 output_type="np", num_images_per_prompt=2).images
    # Rows are prompt-major ([jungle, jungle, beach, beach]), each prompt's control image with both of its rows.
    for row, (prompt, control) in ((1, (prompts[0], edges)), (3, (prompts[1], other))):
        alone = pipe(prompt, photos["dog"], control, "dog", "dog", height=SIZE, width=SIZE, num_inference_steps=STEPS,
                     generator=torch.Generator().manual_seed(2), output_type="np").images
        np.testing.assert_allclose(batch[row], alone[0], atol=1e-5)


def test_bad_controlnet_input_is_a_clear_error(checkpoint, pipe, photos, edges, tmp_path):
    with pytest.raises(ValueError, match="condtioning_image is missing"):
        run(pipe, None, reference=photos["dog"])
    with pytest.raises(FileNotFoundError):
        run(pipe, tmp_path / "no-control.png", reference=photos["dog"])
    with pytest.raises(ValueError, match="2 values for 1 ControlNets"):
        run(pipe, edges, reference=photos["dog"], controlnet_conditioning_scale=[1.0, 1.0])
    base = save_tiny_blip_diffusion(tmp_path / "base")
    with pytest.raises(CheckpointError, match="lists no controlnet"):
        BlipDiffusionControlNetPipeline.from_pretrained(base)
    with pytest.raises(CheckpointError, match="controlnet .*nowhere"):
        BlipDiffusionControlNetPipeline.from_pretrained(base, controlnet=tmp_path / "nowhere")
    import diffusers

    wider = diffusers.ControlNetModel(in_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=64,
                                      attention_head_dim=4, norm_num_groups=8, conditioning_embedding_out_channels=(8, 16))
    with pytest.raises(CheckpointError, match="cross_attention_dim"):
        BlipDiffusionControlNetPipeline.from_pretrained(base, controlnet=wider)
    two = BlipDiffusionControlNetPipeline.from_pretrained(checkpoint, controlnet=[checkpoint, checkpoint])
    with pytest.raises(ValueError, match="2 ControlNets need a list of 2"):
        run(two, edges, reference=photos["dog"])


def test_generate_with_control_matches_the_python_api(checkpoint, second_controlnet, pipe, photos, tmp_path):
    runner = CliRunner()
    common = ["generate", "--model", str(checkpoint), "--subject", "dog", "--prompt", "in the jungle", "--image",
              str(photos["dog"]), "--steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE), "--seed", "3"]
    done = runner.invoke(app, [*common, "--out", str(tmp_path / "one"), "--control", str(photos["cat"]),
                               "--control-type", "canny"])
    assert done.exit_code == 0, done.output
    made = np.asarray(Image.open(tmp_path / "one" / "p000_i00.png"), dtype=np.float32) / 255
    expected = run(pipe, canny_edges(photos["cat"]), seed=3, reference=photos["dog"])[0]
    np.testing.assert_allclose(made, expected, atol=1 / 255 + 1e-6)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "one" / "control-0.png")),
                                  np.asarray(canny_edges(photos["cat"])))
    assert json.loads((tmp_path / "one" / "run.json").read_text())["control_types"] == ["canny"]

    done = runner.invoke(app, [*common, "--out", str(tmp_path / "two"), "--control", str(photos["cat"]),
                               "--control", str(photos["can"]), "--controlnet", str(checkpoint), "--controlnet",
                               str(second_controlnet), "--control-type", "canny", "--control-type", "image",
                               "--control-scale", "1", "--control-scale", "0"])
    assert done.exit_code == 0, done.output
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "two" / "p000_i00.png")),
                                  np.asarray(Image.open(tmp_path / "one" / "p000_i00.png")))

    for extra, message in (
            (["--control", str(tmp_path / "none.png")], "no such file"),
            (["--control", str(photos["cat"]), "--control-type", "depth"], "control_types"),
            (["--control", str(photos["cat"]), "--control", str(photos["can"])], "--controlnet for each"),
            (["--controlnet", str(second_controlnet)], "without --control"),
            (["--control", str(photos["cat"]), "--control-scale", "1", "--control-scale", "2"], "--control-scale")):
        out = tmp_path / "bad"
        done = runner.invoke(app, [*common, "--out", str(out), *extra])
        assert done.exit_code == 2 and message in done.output, (extra, done.output)
        assert not out.exists()


def test_a_controlnet_hub_id_loads_offline_from_the_hugging_face_cache(checkpoint, second_controlnet, photos, tmp_path):
    """`--controlnet owner/name` as huggingface_hub caches a Stable Diffusion ControlNet; one not cached
    is a one-line error while offline."""
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hf-home" / "hub" / "models--lllyasviel--sd-controlnet-canny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(second_controlnet, repo / "snapshots" / commit)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "blipdiff"), "generate", "--model", str(checkpoint), "--subject",
               "dog", "--prompt", "in the jungle", "--image", str(photos["dog"]), "--steps", str(STEPS), "--height",
               str(SIZE), "--width", str(SIZE), "--control", str(photos["can"])]
    done = subprocess.run([*command, "--controlnet", "lllyasviel/sd-controlnet-canny", "--out", str(tmp_path / "hub")],
                          capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    by_folder = subprocess.run([*command, "--controlnet", str(second_controlnet), "--out", str(tmp_path / "folder")],
                               capture_output=True, text=True, env=environment, timeout=300)
    assert by_folder.returncode == 0, by_folder.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "hub" / "p000_i00.png")),
                                  np.asarray(Image.open(tmp_path / "folder" / "p000_i00.png")))
    missing = subprocess.run([*command, "--controlnet", "lllyasviel/sd-controlnet-depth", "--out",
                              str(tmp_path / "missing")], capture_output=True, text=True, env=environment, timeout=300)
    assert missing.returncode == 2 and missing.stderr.startswith("error: controlnet lllyasviel/sd-controlnet-depth")
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
