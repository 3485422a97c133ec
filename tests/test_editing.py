"""Subject-driven editing with attention control, DDIM inversion and subject interpolation, on tiny
random checkpoints and real DreamBench photos, through the Python API and the commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import shared_path
from PIL import Image
from tiny_models import save_tiny_blip_diffusion
from typer.testing import CliRunner

from blipdiff.infra.cli import app
from blipdiff.models.blip_diffusion import BlipDiffusionPipeline
from blipdiff.models.blip_diffusion import attention_control
from blipdiff.models.blip_diffusion.attention_control import edit_mask, invert, source_pixels, text_trajectory
from blipdiff.tasks.interpolate import interpolation_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32
STEPS = 6
# On random weights the attention maps are nearly flat, so Prompt-to-Prompt's 0.3 of the peak marks
# every cell; a higher threshold leaves a region outside the mask to check.
THRESHOLD = 0.9


@pytest.fixture(scope="module")
def photos() -> dict[str, Path]:
    dataset = shared_path("dreambench", "dataset")
    return {"dog": dataset / "dog" / "00.jpg", "dog2": dataset / "dog" / "01.jpg", "cat": dataset / "cat" / "00.jpg"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_blip_diffusion(tmp_path_factory.mktemp("editing") / "checkpoint")


@pytest.fixture(scope="module")
def pipe(checkpoint) -> BlipDiffusionPipeline:
    loaded = BlipDiffusionPipeline.from_pretrained(checkpoint)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def edit(pipe, photos, **options):
    options = {"source_prompt": "a cat sitting on a sofa", "height": SIZE, "width": SIZE, "num_inference_steps": STEPS,
               "generator": torch.Generator().manual_seed(0), "mask_threshold": THRESHOLD, **options}
    if options.get("source_image") is not None:
        options.pop("source_prompt")
    reference = options.pop("reference_image", photos["dog"])
    return pipe.edit("sitting on a sofa", "dog", "cat", reference, **options)


def test_the_edit_mask_is_the_thresholded_widened_map_of_the_edited_word():
    source = torch.zeros(8, 8)
    source[2:4, 5:7] = 1.0  # the edited word's attention: a 2x2 blob
    source[6, 0] = 0.2  # weak attention elsewhere, below the threshold
    subject = torch.zeros(8, 8)
    mask = edit_mask(torch.stack([source, subject]), (16, 16), threshold=0.3)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1:5, 4:8] = True  # the blob widened by one cell (a 3x3 max), Prompt-to-Prompt's dilation
    torch.testing.assert_close(mask, expected.repeat_interleave(2, 0).repeat_interleave(2, 1))
    # The subject's own map adds its region; each map is normalised by its own peak.
    subject[7, 7] = 0.01
    union = edit_mask(torch.stack([source, subject]), (8, 8), threshold=0.3)
    assert union[6:8, 6:8].all() and union[1:5, 4:8].all() and not union[6, 0]
    with pytest.raises(ValueError, match=r"\[K, h, w\]"):
        edit_mask(source, (8, 8))


def test_the_controller_replaces_the_shared_tokens_maps_and_keeps_the_subjects():
    control = attention_control.AttentionControl((4, 4), aligned=[(0, 0), (3, 19)], edited_tokens=[2],
                                                 subject_tokens=[2, 3], replace_steps=1)
    heads, queries = 2, 16
    probs = torch.rand(2 * heads, queries, 77)
    before = probs.clone()
    after = control.cross_attention(probs, heads).view(2, heads, queries, 77)
    source, target = before.view(2, heads, queries, 77)
    torch.testing.assert_close(after[1][..., [0, 19]], source[..., [0, 3]])
    torch.testing.assert_close(after[1][..., 2:4], target[..., 2:4])  # the subject's tokens keep their maps
    torch.testing.assert_close(after[0], source)
    control.step = 1  # past replace_steps: the edited branch keeps its own maps
    probs = before.clone()
    torch.testing.assert_close(control.cross_attention(probs, heads), before)
    assert control.maps[queries].shape == (2, queries)


def test_outside_the_mask_the_edited_picture_is_the_source(pipe, photos):
    result = edit(pipe, photos)
    mask = np.asarray(result.mask) > 0
    assert result.mask.size == result.image.size == result.source.size == (SIZE, SIZE)
    assert 0 < mask.mean() < 1, "the test needs both regions"
    difference = np.abs(pixels(result.image) - pixels(result.source))
    assert difference[~mask].max() == 0
    assert difference[mask].mean() > 1, "inside the mask the subject changed the picture"
    # The source is Stable Diffusion's own generation of the source text from the same noise.
    noise = torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(0))
    plain = pipe.decode(text_trajectory(pipe, "a cat sitting on a sofa", noise, STEPS)[-1], "pil")[0]
    np.testing.assert_array_equal(pixels(result.source), pixels(plain))
    # Another subject photo changes only the edited region.
    other = edit(pipe, photos, reference_image=photos["dog2"])
    np.testing.assert_array_equal(pixels(other.source), pixels(result.source))
    assert np.abs(pixels(other.image) - pixels(result.image)).max() > 0


def test_ddim_inversion_then_regeneration_comes_back_to_the_photo(checkpoint, pipe, photos):
    """DDIM inverts exactly where the noise prediction does not depend on the latents it is given (the
    denoising then retraces the inversion's steps): on such a small model, a U-Net whose input
    convolution is zeroed, the regeneration from the inverted noise is the photo's latents to float
    precision, and decodes to what the VAE makes of the photo (a random VAE cannot reproduce the photo
    itself). On the plain random U-Net inversion is approximate, and still lands far closer to the photo
    than the same denoising from other noise."""
    flat = BlipDiffusionPipeline.from_pretrained(checkpoint)
    flat.set_progress_bar_config(disable=True)
    with torch.no_grad():
        flat.unet.conv_in.weight.zero_()
    trajectory = invert(flat, photos["cat"], "a cat on a sofa", 20, SIZE, SIZE)
    assert len(trajectory) == 21
    again = text_trajectory(flat, "a cat on a sofa", trajectory[0], 20, guidance_scale=1.0)
    torch.testing.assert_close(again[-1], trajectory[-1], rtol=0, atol=1e-4)
    photo_latents = flat.vae.encode(
        torch.from_numpy(np.asarray(source_pixels(photos["cat"], SIZE, SIZE), dtype=np.float32) / 127.5 - 1)
        .permute(2, 0, 1)[None]).latent_dist.mean * flat.vae.config.scaling_factor
    torch.testing.assert_close(trajectory[-1], photo_latents)
    # Another text in the regeneration breaks it: the inversion is of this text's denoising.
    elsewhere = text_trajectory(flat, "a red car", trajectory[0], 20, guidance_scale=1.0)
    assert (elsewhere[-1] - trajectory[-1]).abs().max() > 1e-2

    trajectory = invert(pipe, photos["cat"], "a cat on a sofa", 20, SIZE, SIZE)
    regenerated = text_trajectory(pipe, "a cat on a sofa", trajectory[0], 20, guidance_scale=1.0)[-1]
    other = text_trajectory(pipe, "a cat on a sofa", torch.randn(trajectory[0].shape, generator=torch.Generator()
                                                                  .manual_seed(5)), 20, guidance_scale=1.0)[-1]
    assert (regenerated - trajectory[-1]).abs().mean() * 3 < (other - trajectory[-1]).abs().mean()


def test_a_real_photo_is_edited_through_its_inversion(pipe, photos):
    result = edit(pipe, photos, source_image=photos["cat"])
    mask = np.asarray(result.mask) > 0
    assert 0 < mask.mean() < 1
    np.testing.assert_array_equal(pixels(result.source), pixels(source_pixels(photos["cat"], SIZE, SIZE)))
    assert np.abs(pixels(result.image) - pixels(result.source))[~mask].max() == 0


def test_bad_edit_input_is_a_clear_error(pipe, photos):
    with pytest.raises(ValueError, match="'horse' is not in the text"):
        pipe.edit("sitting on a sofa", "dog", "horse", photos["dog"], source_prompt="a cat sitting on a sofa",
                  height=SIZE, width=SIZE, num_inference_steps=1)
    with pytest.raises(ValueError, match="one of them"):
        pipe.edit("sitting on a sofa", "dog", "cat", photos["dog"], height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="one of them"):
        pipe.edit("on a sofa", "dog", "cat", photos["dog"], source_prompt="a cat", source_image=photos["cat"])
    with pytest.raises(ValueError, match="mask_threshold"):
        edit(pipe, photos, mask_threshold=1.5)
    with pytest.raises(ValueError, match="weights"):
        edit(pipe, photos, reference_image=[photos["dog"], photos["dog2"]], reference_weights=[1.0])


def test_interpolation_weights_walk_a_path_or_a_square():
    assert interpolation_weights(2, 3) == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    square = interpolation_weights(4, 3)
    assert len(square) == 9
    assert square[0] == [1.0, 0.0, 0.0, 0.0] and square[2] == [0.0, 1.0, 0.0, 0.0]
    assert square[6] == [0.0, 0.0, 1.0, 0.0] and square[8] == [0.0, 0.0, 0.0, 1.0]
    assert square[4] == [0.25, 0.25, 0.25, 0.25]
    assert all(abs(sum(cell) - 1) < 1e-12 for cell in square)
    with pytest.raises(ValueError, match="2 subjects .* or 4"):
        interpolation_weights(3, 3)


def test_blends_at_weights_1_and_0_are_the_single_subject(pipe, photos):
    dog = pipe.subject_embedding(photos["dog"], "dog")
    cat = pipe.subject_embedding(photos["cat"], "cat")
    torch.testing.assert_close(pipe.subject_embedding([photos["dog"], photos["cat"]], ["dog", "cat"], [1, 0]), dog,
                               rtol=0, atol=0)
    torch.testing.assert_close(pipe.subject_embedding([photos["dog"], photos["cat"]], ["dog", "cat"], [3, 7]),
                               0.3 * dog + 0.7 * cat, rtol=0, atol=1e-6)  # weights are normalised
    for weights, message in (([1.0], "one non-negative weight per image"), ([0, 0], "not all zero"),
                             ([1, -1], "non-negative")):
        with pytest.raises(ValueError, match=message):
            pipe.subject_embedding([photos["dog"], photos["cat"]], ["dog", "cat"], weights)
    with pytest.raises(ValueError, match="3 subject texts for 2 images"):
        pipe.subject_embedding([photos["dog"], photos["cat"]], ["dog", "cat", "cup"])


def test_interpolate_renders_the_path_whose_ends_are_the_subjects_alone(checkpoint, pipe, photos, tmp_path):
    runner = CliRunner()
    args = ["interpolate", "--model", str(checkpoint), "--image", str(photos["dog"]), "--image", str(photos["cat"]),
            "--subject", "dog", "--subject", "cat", "--prompt", "on the beach", "--out", str(tmp_path / "path"),
            "--steps", "3", "--denoising-steps", "2", "--height", str(SIZE), "--width", str(SIZE), "--seed", "4"]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    cells = pd.read_parquet(tmp_path / "path" / "interpolation.parquet")
    assert [list(weights) for weights in cells["weights"]] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    for cell, (photo, subject) in ((0, (photos["dog"], "dog")), (2, (photos["cat"], "cat"))):
        alone = pipe("on the beach", photo, subject, "dog", height=SIZE, width=SIZE, num_inference_steps=2,
                     generator=torch.Generator().manual_seed(4)).images[0]
        made = Image.open(tmp_path / "path" / f"cell-{cell:03d}.png")
        assert np.abs(pixels(made) - pixels(alone)).max() <= 1
    middle = pixels(Image.open(tmp_path / "path" / "cell-001.png"))
    halfway = pipe("on the beach", target_subject_category="dog", num_inference_steps=2, height=SIZE, width=SIZE,
                   subject_embeds=pipe.subject_embedding([photos["dog"], photos["cat"]], ["dog", "cat"], [0.5, 0.5]),
                   generator=torch.Generator().manual_seed(4)).images[0]
    assert np.abs(middle - pixels(halfway)).max() <= 1
    assert np.abs(middle - pixels(Image.open(tmp_path / "path" / "cell-000.png"))).max() > 0
    grid = Image.open(tmp_path / "path" / "grid.png")
    assert grid.size == (3 * SIZE, SIZE)
    np.testing.assert_array_equal(pixels(grid.crop((SIZE, 0, 2 * SIZE, SIZE))), middle)
    # A rerun makes nothing again; other settings in the same folder are refused.
    before = (tmp_path / "path" / "cell-001.png").stat().st_mtime_ns
    assert runner.invoke(app, args).exit_code == 0
    assert (tmp_path / "path" / "cell-001.png").stat().st_mtime_ns == before
    done = runner.invoke(app, [*args[:-2], "--seed", "5"])
    assert done.exit_code == 2 and "holds another run (interpolation" in done.output

    square = ["interpolate", "--model", str(checkpoint), "--steps", "2", "--denoising-steps", "1", "--height",
              str(SIZE), "--width", str(SIZE), "--prompt", "on the beach", "--out", str(tmp_path / "square")]
    for photo, subject in ((photos["dog"], "dog"), (photos["cat"], "cat"), (photos["dog2"], "dog"),
                           (photos["cat"], "cat")):
        square += ["--image", str(photo), "--subject", subject]
    assert runner.invoke(app, square).exit_code == 0
    assert Image.open(tmp_path / "square" / "grid.png").size == (2 * SIZE, 2 * SIZE)

    for extra, message in ((["--image", str(photos["dog"]), "--subject", "dog"], "2 reference images (a path) or 4"),
                           (["--image", str(photos["dog"]), "--image", str(photos["cat"]), "--subject", "dog"],
                            "1 subjects for 2 images")):
        done = runner.invoke(app, ["interpolate", "--model", str(checkpoint), "--prompt", "x", "--out",
                                   str(tmp_path / "bad"), *extra])
        assert done.exit_code == 2 and message in done.output, done.output


def test_edit_command_writes_the_three_pictures_and_its_settings(checkpoint, pipe, photos, tmp_path):
    runner = CliRunner()
    args = ["edit", "--model", str(checkpoint), "--edit-token", "cat", "--image", str(photos["dog"]), "--subject",
            "dog", "--prompt", "sitting on a sofa", "--source-prompt", "a cat sitting on a sofa", "--out",
            str(tmp_path / "edit"), "--steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE),
            "--mask-threshold", str(THRESHOLD)]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    expected = edit(pipe, photos)
    for name, image in (("edited.png", expected.image), ("source.png", expected.source), ("mask.png", expected.mask)):
        np.testing.assert_array_equal(pixels(Image.open(tmp_path / "edit" / name)), pixels(image))
    settings = json.loads((tmp_path / "edit" / "edit.json").read_text())
    assert settings["edit_token"] == "cat" and settings["mask_threshold"] == THRESHOLD and settings["seed"] == 0
    done = runner.invoke(app, args)
    assert done.exit_code == 0 and "already there" in done.output
    done = runner.invoke(app, [*args, "--seed", "1"])
    assert done.exit_code == 2 and "holds another run (edit" in done.output

    for extra, message in ((["--source-image", str(photos["cat"])], "one of them"),
                           (["--edit-token", "horse"], "'horse' is not in the source prompt"),
                           (["--weights", "1,2"], "2 weights for 1 reference images"),
                           (["--weights", "0"], "sum positive"),
                           (["--image", str(tmp_path / "missing.jpg")], "no such file")):
        out = tmp_path / "bad"
        done = runner.invoke(app, [*[arg if arg != str(tmp_path / "edit") else str(out) for arg in args], *extra])
        assert done.exit_code == 2 and message in done.output, (extra, done.output)
        assert not out.exists()
