"""Parity with the reference implementation (diffusers' BlipDiffusionPipeline) without its side
environment: the reference's own tiny checkpoint and outputs, committed by ``bench/reference_parity.py
--write-fixtures`` (see tests/fixtures/reference_parity/README.md).

The fixture is only worth having if the mistakes a port makes fail it, so the same comparison also runs
on deliberately broken pipelines and must fail each time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import shared_path

pytest.importorskip("diffusers")
from reference_parity import EMBEDDING_TOLERANCE, IMAGE_TOLERANCE, embedding_error, load_npz, max_abs, run_blipdiff
from reference_side import is_batch

FIXTURES = Path(__file__).parent / "fixtures" / "reference_parity"
CASES = json.loads((FIXTURES / "cases.json").read_text())
BATCH_CASES = [case for case in CASES if is_batch(case)]
CONTROL_CASES = [case for case in CASES if "control_image" in case]
BASE_CASES = [case for case in CASES if "control_image" not in case]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The reference-built checkpoint, with the stand-in bert-base-uncased as the checkpoint's tokenizer
    copy (the same vocabulary the reference read from its cache)."""
    folder = tmp_path_factory.mktemp("parity") / "checkpoint"
    shutil.copytree(FIXTURES / "checkpoint", folder)
    shutil.copytree(FIXTURES / "bert-base-uncased", folder / "qformer" / "tokenizer")
    return folder


@pytest.fixture(scope="module")
def pipe(checkpoint, one_torch_thread):
    from blipdiff.models.blip_diffusion import BlipDiffusionPipeline

    loaded = BlipDiffusionPipeline.from_pretrained(checkpoint)
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def control_pipe(checkpoint, one_torch_thread):
    """The same checkpoint through the ControlNet pipeline (its model_index.json lists the ControlNet)."""
    from blipdiff.models.blip_diffusion import BlipDiffusionControlNetPipeline

    loaded = BlipDiffusionControlNetPipeline.from_pretrained(checkpoint)
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def dreambench() -> Path:
    return shared_path("dreambench", "dataset")


def worst_errors(pipe, dreambench: Path, cases: list[dict] = BASE_CASES, control_pipe=None) -> tuple[float, float]:
    """The largest image max-abs and subject-embedding relative error (each reference's) over the cases."""
    ours = run_blipdiff(pipe, cases, dreambench, control_pipe)
    reference = load_npz(FIXTURES / "reference.npz")
    images = [max_abs(ours[f"{case['name']}.image"], reference[f"{case['name']}.image"]) for case in cases]
    embeddings = [embedding_error(ours[f"{case['name']}.subject_embedding"],
                                  reference[f"{case['name']}.subject_embedding"]) for case in cases]
    return max(images), max(embeddings)


def test_the_reference_photos_are_the_ones_the_reference_saw(dreambench):
    """The outputs were made from these exact files; another copy of ../shared must not pass for them."""
    import hashlib

    for case in CASES:
        paths = case["reference_image"] if is_batch(case) else [case["reference_image"]]
        sums = case["reference_image_sha256"] if is_batch(case) else [case["reference_image_sha256"]]
        if "control_image" in case:
            paths, sums = [*paths, case["control_image"]], [*sums, case["control_image_sha256"]]
        for path, expected in zip(paths, sums):
            assert hashlib.sha256((dreambench / path).read_bytes()).hexdigest() == expected, path


def test_the_reference_images_and_subject_embeddings_are_reproduced(pipe, control_pipe, dreambench):
    image_error, embedding_error = worst_errors(pipe, dreambench, CASES, control_pipe)
    assert image_error <= IMAGE_TOLERANCE
    assert embedding_error <= EMBEDDING_TOLERANCE


def test_the_cases_include_the_controlnet_pipeline_guided_and_not():
    assert {case["guidance_scale"] > 1 for case in CONTROL_CASES} == {True, False}


@pytest.mark.parametrize("mistake", ["control image normalised to [-1, 1]", "bilinear resize",
                                     "the mid-block residual dropped"])
def test_a_controlnet_wired_wrongly_fails_parity(control_pipe, dreambench, monkeypatch, mistake):
    from PIL import Image

    from blipdiff.models.blip_diffusion import controlnet

    prepare = controlnet.prepare_control_image
    if mistake == "control image normalised to [-1, 1]":
        monkeypatch.setattr(controlnet, "prepare_control_image", lambda *args: prepare(*args) * 2 - 1)
    elif mistake == "bilinear resize":
        def bilinear(image, width, height):
            resized = controlnet.open_rgb(image).resize((width, height), resample=Image.Resampling.BILINEAR)
            return prepare(resized, width, height)

        monkeypatch.setattr(controlnet, "prepare_control_image", bilinear)
    else:
        net = control_pipe.controlnet
        original = net.forward

        def without_mid(*args, **kwargs):
            down, mid = original(*args, **kwargs)
            return down, mid * 0

        monkeypatch.setattr(net, "forward", without_mid)
    image_error, _ = worst_errors(control_pipe, dreambench, CONTROL_CASES, control_pipe)
    assert image_error > IMAGE_TOLERANCE


def test_the_reference_token_ids_are_reproduced(pipe, control_pipe, dreambench):
    ours = run_blipdiff(pipe, CASES, dreambench, control_pipe)
    reference = load_npz(FIXTURES / "reference.npz")
    for case in CASES:
        for ids in ("prompt_ids", "subject_ids", "negative_ids"):
            key = f"{case['name']}.{ids}"
            if key in reference:
                np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)


def test_the_cases_include_a_batch_of_prompts_each_with_its_own_reference():
    assert BATCH_CASES
    for case in BATCH_CASES:
        assert len(set(case["reference_image"])) == len(case["prompt"]) > 1
        assert len(set(case["source_subject"])) > 1


@pytest.mark.parametrize("mistake", ["the first reference for every prompt", "every reference averaged"])
def test_a_batch_whose_prompts_lose_their_own_references_fails_parity(pipe, dreambench, monkeypatch, mistake):
    import torch

    paired = pipe._subject_embeds

    def unpaired(count, reference_image, sources, subject_embeds, weights):
        if isinstance(reference_image, list) and len(reference_image) == count > 1:
            if mistake == "every reference averaged":  # blipdiff's reading of a list before it paired them
                return torch.cat([pipe.subject_embedding(reference_image, source) for source in sources])
            reference_image = [reference_image[0]] * count
        return paired(count, reference_image, sources, subject_embeds, weights)

    monkeypatch.setattr(pipe, "_subject_embeds", unpaired)
    image_error, _ = worst_errors(pipe, dreambench, BATCH_CASES)
    assert image_error > IMAGE_TOLERANCE


def test_a_text_encoder_without_the_causal_mask_fails_parity(pipe, dreambench, monkeypatch):
    import torch
    from blipdiff.models.blip_diffusion import text_encoder

    monkeypatch.setattr(text_encoder, "causal_mask",
                        lambda length, dtype, device: torch.zeros(1, 1, length, length, dtype=dtype, device=device))
    image_error, _ = worst_errors(pipe, dreambench)
    assert image_error > IMAGE_TOLERANCE


def test_a_subject_embedding_one_position_off_fails_parity(pipe, dreambench, monkeypatch):
    monkeypatch.setattr(pipe, "ctx_begin_pos", pipe.ctx_begin_pos + 1)
    image_error, _ = worst_errors(pipe, dreambench)
    assert image_error > IMAGE_TOLERANCE


@pytest.mark.parametrize("mistake", ["bilinear resize", "centre crop"])
def test_the_wrong_image_preprocessing_fails_parity(pipe, dreambench, monkeypatch, mistake):
    from PIL import Image

    processor = pipe.image_processor
    if mistake == "bilinear resize":
        monkeypatch.setattr(processor, "resample", Image.Resampling.BILINEAR)
    else:
        # LAVIS's evaluation transform: the shorter side to the size, then a centre crop.
        from blipdiff.models.blip_diffusion import image_processor as module

        open_rgb = module.open_rgb

        def centre_cropped(image):
            rgb = open_rgb(image)
            side = min(rgb.size)
            left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
            return rgb.crop((left, top, left + side, top + side))

        monkeypatch.setattr(module, "open_rgb", centre_cropped)
    image_error, embedding_error = worst_errors(pipe, dreambench)
    assert embedding_error > EMBEDDING_TOLERANCE
    assert image_error > IMAGE_TOLERANCE
