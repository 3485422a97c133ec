"""BLIP-Diffusion's Python API on tiny random checkpoints in the released layout: loading (both weight
formats, every key accounted for, the subject tokenizer's three sources), saving, the pipeline's
options, and the details the reference parity depends on.

Every checkpoint is written file by file by ``tiny_models.save_tiny_blip_diffusion`` and read through
the public ``BlipDiffusionPipeline.from_pretrained``; images are 32x32 from two denoising steps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import shared_path
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_models import NUM_QUERY_TOKENS, SUBJECT_VOCAB, save_tiny_blip_diffusion, subject_tokenizer

from blipdiff.models.blip_diffusion import BlipDiffusionPipeline, CheckpointError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 2
SIZE = 32
HIDDEN = 32  # the tiny Q-Former's and text encoder's width
DECODER_ID = len(SUBJECT_VOCAB)  # [DEC] comes right after the WordPiece vocabulary


def seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def generate(pipe: BlipDiffusionPipeline, prompt="in the jungle", reference=None, subject="dog", seed=0,
             **kwargs) -> np.ndarray:
    """[N, H, W, 3] floats in [0, 1]."""
    kwargs.setdefault("generator", seeded(seed))
    return pipe(prompt, reference, subject, subject, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                output_type="np", **kwargs).images


def load(folder: Path, **kwargs) -> BlipDiffusionPipeline:
    pipe = BlipDiffusionPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def weight_file(folder: Path) -> Path:
    (path,) = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    return path


def read_state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)


def write_state(state: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":
        save_file(state, path, metadata={"format": "pt"})
    else:
        torch.save(state, path)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The released layout with safetensors weights and the subject tokenizer's copy in qformer/tokenizer/."""
    return save_tiny_blip_diffusion(tmp_path_factory.mktemp("blipdiffusion") / "checkpoint")


@pytest.fixture(scope="module")
def pickled_checkpoint(tmp_path_factory) -> Path:
    """The same weights (the builder is seeded) as pickled .bin files, as the hub has them."""
    return save_tiny_blip_diffusion(tmp_path_factory.mktemp("blipdiffusion-bin") / "checkpoint", weights="bin")


@pytest.fixture(scope="module")
def pipe(checkpoint) -> BlipDiffusionPipeline:
    return load(checkpoint)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Three different non-square photos of noise, enough for the tiny models to tell apart."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(3)]


@pytest.fixture(scope="module")
def baseline(pipe, images) -> np.ndarray:
    """The image every variant is compared with: images[0], "in the jungle", seed 0, guidance 7.5, PNDM."""
    return generate(pipe, reference=images[0])


def assert_differs(a: np.ndarray, b: np.ndarray, at_least: float = 1e-3) -> None:
    assert np.abs(a - b).max() > at_least, "the change left the image the same"


# -------------------------------------------------------------------------------- layout and loading
def test_bin_and_safetensors_layouts_load_the_same_weights_and_images(checkpoint, pickled_checkpoint, pipe, images,
                                                                    baseline):
    pickled = pickled_checkpoint
    for component, name in (("qformer", "pytorch_model.bin"), ("text_encoder", "pytorch_model.bin"),
                            ("unet", "diffusion_pytorch_model.bin"), ("vae", "diffusion_pytorch_model.bin")):
        assert weight_file(pickled / component).name == name
        assert weight_file(checkpoint / component).suffix == ".safetensors"
    from_bin = load(pickled)
    for name in ("qformer", "text_encoder", "unet", "vae"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(from_bin, name).state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}.{key}"
    assert torch.equal(from_bin.subject_embedding(images[0], "dog"), pipe.subject_embedding(images[0], "dog"))
    np.testing.assert_array_equal(generate(from_bin, reference=images[0]), baseline)
    assert baseline.shape == (1, SIZE, SIZE, 3) and baseline.std() > 0.01


@pytest.mark.parametrize("component, weights", [
    ("qformer", "safetensors"), ("qformer", "bin"), ("text_encoder", "safetensors"), ("unet", "safetensors"),
    ("vae", "bin")])
def test_missing_and_unexpected_keys_are_named(checkpoint, pickled_checkpoint, component, weights, tmp_path):
    folder = copy_checkpoint(pickled_checkpoint if weights == "bin" else checkpoint, tmp_path / "checkpoint")
    path = weight_file(folder / component)
    assert path.suffix == (".bin" if weights == "bin" else ".safetensors")
    state = read_state(path)
    dropped = sorted(key for key in state if not key.endswith("position_ids"))[len(state) // 2]
    del state[dropped]
    state["bogus_layer.extra.weight"] = torch.zeros(3)
    write_state(state, path)

    with pytest.raises(CheckpointError) as raised:
        load(folder)
    message = str(raised.value)
    assert component in message
    assert dropped in message and "missing" in message
    assert "bogus_layer.extra.weight" in message and "unexpected" in message


@pytest.mark.parametrize("component", ["qformer", "text_encoder", "unet"])
def test_a_key_of_the_wrong_shape_is_named(checkpoint, component, tmp_path):
    folder = copy_checkpoint(checkpoint, tmp_path / "checkpoint")
    path = weight_file(folder / component)
    state = read_state(path)
    key = sorted(key for key, value in state.items() if value.ndim == 2 and not key.endswith("position_ids"))[0]
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    write_state(state, path)
    with pytest.raises(CheckpointError, match=component) as raised:
        load(folder)
    assert key in str(raised.value)


def test_position_ids_buffers_present_or_absent_are_accepted(checkpoint, images, baseline, tmp_path):
    folder = copy_checkpoint(checkpoint, tmp_path / "checkpoint")
    qformer = read_state(weight_file(folder / "qformer"))
    assert "embeddings.position_ids" in qformer  # the builder saves the buffer, as transformers 4.x did
    del qformer["embeddings.position_ids"]
    write_state(qformer, weight_file(folder / "qformer"))
    text = read_state(weight_file(folder / "text_encoder"))
    assert "text_model.embeddings.position_ids" not in text  # transformers 5 does not save it
    text["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    write_state(text, weight_file(folder / "text_encoder"))
    np.testing.assert_array_equal(generate(load(folder), reference=images[0]), baseline)


def test_a_missing_component_folder_or_index_is_a_clear_error(checkpoint, tmp_path):
    no_vae = copy_checkpoint(checkpoint, tmp_path / "no-vae")
    shutil.rmtree(no_vae / "vae")
    with pytest.raises(CheckpointError, match=r"component folders vae\b"):
        load(no_vae)

    no_index = copy_checkpoint(checkpoint, tmp_path / "no-index")
    (no_index / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="model_index.json"):
        load(no_index)

    unlisted = copy_checkpoint(checkpoint, tmp_path / "unlisted")
    edit_json(unlisted / "model_index.json", unet=None)
    with pytest.raises(CheckpointError, match=r"does not list the components unet"):
        load(unlisted)

    with pytest.raises(CheckpointError, match="no such folder"):
        load(tmp_path / "nowhere" / "checkpoint")


@pytest.mark.parametrize(("component", "config"), [
    ("qformer", {"vision_config": "not a config", "num_query_tokens": 4}),
    ("text_encoder", {"hidden_size": "wide"}),
])
def test_a_config_that_does_not_describe_the_component_is_a_clear_error(checkpoint, tmp_path, component, config):
    folder = copy_checkpoint(checkpoint, tmp_path / "checkpoint")
    (folder / component / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=component):
        load(folder)


@pytest.mark.parametrize("damage", ["qformer garbage", "text encoder truncated"])
def test_an_unreadable_weight_file_is_a_clear_error(pickled_checkpoint, tmp_path, damage):
    folder = copy_checkpoint(pickled_checkpoint, tmp_path / "checkpoint")
    path = weight_file(folder / ("qformer" if damage.startswith("qformer") else "text_encoder"))
    if damage.endswith("garbage"):
        path.write_bytes(b"\x00 not weights" * 100)
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable weight file"):
        load(folder)


def test_a_prompt_tokenizer_without_its_vocabulary_is_a_clear_error(checkpoint, tmp_path):
    folder = copy_checkpoint(checkpoint, tmp_path / "checkpoint")
    for name in ("vocab.json", "merges.txt"):
        (folder / "tokenizer" / name).unlink()
    with pytest.raises(CheckpointError, match="tokenizer: no vocabulary"):
        load(folder)


def test_a_listed_controlnet_is_loaded_and_saved(checkpoint, tmp_path):
    from diffusers import ControlNetModel

    folder = copy_checkpoint(checkpoint, tmp_path / "checkpoint")
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(load(checkpoint).unet, conditioning_embedding_out_channels=(8, 16))
    controlnet.save_pretrained(folder / "controlnet")
    edit_json(folder / "model_index.json", controlnet=["diffusers", "ControlNetModel"])
    loaded = load(folder).controlnet
    assert isinstance(loaded, ControlNetModel)
    expected = controlnet.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())

    load(folder).save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["controlnet"] == \
        ["diffusers", "ControlNetModel"]
    assert all(torch.equal(value, expected[key]) for key, value in load(tmp_path / "saved").controlnet.state_dict().items())


def test_folders_the_index_does_not_list_are_ignored(checkpoint, images, baseline, tmp_path):
    folder = copy_checkpoint(checkpoint, tmp_path / "checkpoint")
    for extra in ("controlnet", "vision_encoder"):
        (folder / extra).mkdir()
        (folder / extra / "config.json").write_text("{ this is not json")
        (folder / extra / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 10)
        (folder / extra / "pytorch_model.bin").write_bytes(b"garbage")
    pipe = load(folder)
    assert pipe.controlnet is None
    np.testing.assert_array_equal(generate(pipe, reference=images[0]), baseline)


# ------------------------------------------------------------------------- the subject tokenizer
def assert_tiny_subject_tokenizer(tokenizer) -> None:
    """The tiny WordPiece vocabulary with [DEC] appended, BERT's template around the text."""
    assert tokenizer.convert_tokens_to_ids("[DEC]") == DECODER_ID
    assert len(tokenizer) == DECODER_ID + 1
    ids = tokenizer("dog").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "dog", "[SEP]"]
    assert ids == [2, SUBJECT_VOCAB.index("dog"), 3]


def without_tokenizer_copy(checkpoint: Path, target: Path) -> Path:
    folder = copy_checkpoint(checkpoint, target)
    shutil.rmtree(folder / "qformer" / "tokenizer")
    return folder


def test_subject_tokenizer_from_the_checkpoints_copy(pipe, checkpoint):
    assert (checkpoint / "qformer" / "tokenizer" / "vocab.txt").is_file()
    assert "tokenizer" not in json.loads((checkpoint / "qformer" / "config.json").read_text())
    assert_tiny_subject_tokenizer(pipe.subject_tokenizer)


def test_subject_tokenizer_from_the_config_entry(checkpoint, images, baseline, tmp_path):
    vocabulary = subject_tokenizer(tmp_path / "bert-tiny")
    folder = without_tokenizer_copy(checkpoint, tmp_path / "checkpoint")
    edit_json(folder / "qformer" / "config.json", tokenizer=str(vocabulary))
    pipe = load(folder)
    assert_tiny_subject_tokenizer(pipe.subject_tokenizer)
    np.testing.assert_array_equal(generate(pipe, reference=images[0]), baseline)


def test_the_config_entry_comes_before_the_copy(checkpoint, tmp_path):
    # A vocabulary in which "dog" has another id tells the two sources apart.
    other = tmp_path / "other-vocab"
    other.mkdir()
    swapped = list(SUBJECT_VOCAB)
    swapped[6], swapped[7] = swapped[7], swapped[6]
    (other / "vocab.txt").write_text("\n".join(swapped) + "\n")
    folder = copy_checkpoint(checkpoint, tmp_path / "checkpoint")
    edit_json(folder / "qformer" / "config.json", tokenizer=str(other))
    assert load(folder).subject_tokenizer("dog").input_ids == [2, 7, 3]


def test_a_tokenizer_source_without_a_vocabulary_is_passed_over(checkpoint, tmp_path):
    """A source that holds no vocabulary (here the config entry names an empty folder) is no tokenizer:
    the next source serves, rather than a tokenizer that knows only the special tokens."""
    empty = tmp_path / "empty-tokenizer-folder"
    empty.mkdir()
    folder = copy_checkpoint(checkpoint, tmp_path / "checkpoint")
    edit_json(folder / "qformer" / "config.json", tokenizer=str(empty))
    assert_tiny_subject_tokenizer(load(folder).subject_tokenizer)


# The cache-based sources need a fresh interpreter: huggingface_hub reads HF_HOME when first imported.
LOAD_IN_SUBPROCESS = """
import json, sys
from blipdiff.models.blip_diffusion import BlipDiffusionPipeline, CheckpointError
try:
    pipe = BlipDiffusionPipeline.from_pretrained(sys.argv[1])
except CheckpointError as error:
    print(json.dumps({"error": str(error)}))
else:
    tokenizer = pipe.subject_tokenizer
    ids = tokenizer("dog").input_ids
    print(json.dumps({"dec": tokenizer.convert_tokens_to_ids("[DEC]"), "length": len(tokenizer), "ids": ids,
                      "tokens": tokenizer.convert_ids_to_tokens(ids)}))
"""


def load_in_subprocess(folder: Path | str, hf_home: Path) -> dict:
    environment = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    environment.pop("HF_HUB_CACHE", None)
    environment.pop("HUGGINGFACE_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", LOAD_IN_SUBPROCESS, str(folder)], capture_output=True, text=True,
                          env=environment, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def fake_hub_cache(hf_home: Path) -> Path:
    """bert-base-uncased as huggingface_hub caches it, holding the tiny vocabulary."""
    repo = hf_home / "hub" / "models--bert-base-uncased"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "vocab.txt").write_text("\n".join(SUBJECT_VOCAB) + "\n")
    (snapshot / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    return hf_home


def test_subject_tokenizer_from_the_hugging_face_cache(checkpoint, tmp_path):
    folder = without_tokenizer_copy(checkpoint, tmp_path / "checkpoint")
    loaded = load_in_subprocess(folder, fake_hub_cache(tmp_path / "hf-home"))
    assert "error" not in loaded, loaded
    assert loaded == {"dec": DECODER_ID, "length": DECODER_ID + 1, "ids": [2, SUBJECT_VOCAB.index("dog"), 3],
                      "tokens": ["[CLS]", "dog", "[SEP]"]}


def test_a_hub_id_loads_offline_from_the_hugging_face_cache(checkpoint, tmp_path):
    """The checkpoint as huggingface_hub caches Salesforce/blipdiffusion, with the hub repo's unlisted
    vision_encoder/ (here unreadable, so reading it would fail)."""
    repo = tmp_path / "hf-home" / "hub" / "models--Salesforce--blipdiffusion"
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = copy_checkpoint(checkpoint, repo / "snapshots" / commit)
    (snapshot / "vision_encoder").mkdir()
    (snapshot / "vision_encoder" / "config.json").write_text("{ not json")
    loaded = load_in_subprocess("Salesforce/blipdiffusion", tmp_path / "hf-home")
    assert loaded == {"dec": DECODER_ID, "length": DECODER_ID + 1, "ids": [2, SUBJECT_VOCAB.index("dog"), 3],
                      "tokens": ["[CLS]", "dog", "[SEP]"]}
    missing = load_in_subprocess("Salesforce/blipdiffusion-controlnet", tmp_path / "hf-home")
    assert "not in the Hugging Face cache while offline" in missing["error"]


def test_no_subject_tokenizer_offline_is_one_error_naming_the_three_ways(checkpoint, tmp_path):
    folder = without_tokenizer_copy(checkpoint, tmp_path / "checkpoint")
    (tmp_path / "empty-hf-home").mkdir()
    loaded = load_in_subprocess(folder, tmp_path / "empty-hf-home")
    assert "error" in loaded, loaded
    message = loaded["error"]
    assert "subject text" in message
    assert "qformer/config.json" in message and "qformer/tokenizer/" in message and "bert-base-uncased" in message


# ------------------------------------------------------------------------------------------- saving
def test_save_then_load_gives_the_same_pipeline(checkpoint, images, tmp_path):
    # Loaded through the config entry, with no copy: the save must still carry the tokenizer itself.
    vocabulary = subject_tokenizer(tmp_path / "bert-tiny")
    source = without_tokenizer_copy(checkpoint, tmp_path / "source")
    edit_json(source / "qformer" / "config.json", tokenizer=str(vocabulary))
    original = load(source)
    saved = tmp_path / "saved"
    original.save_pretrained(saved)

    index = json.loads((saved / "model_index.json").read_text())
    for component in ("qformer", "text_encoder", "tokenizer", "unet", "vae", "scheduler", "image_processor"):
        assert component in index, component
        assert (saved / component).is_dir(), component
    assert index["ctx_begin_pos"] == 2 and index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert (saved / "qformer" / "model.safetensors").is_file()
    assert (saved / "text_encoder" / "model.safetensors").is_file()
    assert (saved / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (saved / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(saved.rglob("*.bin"))
    assert (saved / "qformer" / "tokenizer" / "vocab.txt").read_text().split() == SUBJECT_VOCAB
    assert (saved / "tokenizer" / "vocab.json").is_file() and (saved / "tokenizer" / "merges.txt").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "staging folders left behind"

    # Offline, without the entry's folder and without any entry: the copy serves.
    shutil.rmtree(vocabulary)
    edit_json(saved / "qformer" / "config.json", tokenizer=None)
    again = load(saved)
    assert_tiny_subject_tokenizer(again.subject_tokenizer)
    for name in ("qformer", "text_encoder", "unet", "vae"):
        ours, theirs = getattr(original, name).state_dict(), getattr(again, name).state_dict()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}.{key}"
    before = original.subject_embedding(images[0], "dog")
    after = again.subject_embedding(images[0], "dog")
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    np.testing.assert_allclose(generate(again, reference=images[0]), generate(original, reference=images[0]),
                               rtol=0, atol=1e-6)

    # Saving over a checkpoint replaces it; over a folder of something else is refused.
    again.save_pretrained(saved)
    assert_tiny_subject_tokenizer(load(saved).subject_tokenizer)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        again.save_pretrained(other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------------ the pipeline
def test_scheduler_swap(checkpoint, images, baseline):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, PNDMScheduler

    pipe = load(checkpoint)  # its own scheduler, so the shared pipe keeps PNDM
    assert type(pipe.scheduler) is PNDMScheduler
    # Euler ancestral scales the model input and draws noise at every step from the generator.
    for scheduler_class in (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler):
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
        swapped = generate(pipe, reference=images[0])
        assert swapped.shape == baseline.shape and 0.01 < swapped.std()
        assert_differs(swapped, baseline)
        np.testing.assert_array_equal(generate(pipe, reference=images[0]), swapped)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    np.testing.assert_array_equal(generate(pipe, reference=images[0]), baseline)


# Batched and single forward passes may round differently in the last float bits.
BATCH_TOLERANCE = 5e-5


def test_one_reference_serves_several_prompts(pipe, images):
    prompts = ["in the jungle", "on the beach"]
    both = generate(pipe, prompts, images[0], generator=[seeded(3), seeded(4)])
    assert both.shape == (2, SIZE, SIZE, 3)
    for i, prompt in enumerate(prompts):
        alone = generate(pipe, prompt, images[0], seed=3 + i)
        np.testing.assert_allclose(both[i], alone[0], rtol=0, atol=BATCH_TOLERANCE)
    assert_differs(both[0], both[1])


def test_a_reference_per_prompt_is_paired_as_the_released_pipeline_pairs_them(pipe, images):
    """A list of references as long as a list of several prompts: reference i (an image, or a list of
    images averaged) with prompt i and source category i."""
    prompts, subjects = ["in the jungle", "on the beach"], ["dog", "cat"]
    paired = pipe(prompts, [images[0], [images[1], images[2]]], subjects, subjects, height=SIZE, width=SIZE,
                  num_inference_steps=STEPS, generator=[seeded(5), seeded(6)], output_type="np").images
    np.testing.assert_allclose(paired[0], generate(pipe, prompts[0], images[0], "dog", seed=5)[0], rtol=0,
                               atol=BATCH_TOLERANCE)
    np.testing.assert_allclose(paired[1], generate(pipe, prompts[1], [images[1], images[2]], "cat", seed=6)[0],
                               rtol=0, atol=BATCH_TOLERANCE)
    with pytest.raises(ValueError, match="reference_weights"):
        pipe(prompts, [images[0], images[1]], subjects, reference_weights=[1, 2], height=SIZE, width=SIZE,
             num_inference_steps=1)
    # Otherwise a list is one subject's photos, averaged, for every prompt.
    three = generate(pipe, ["in the jungle", "on the beach", "in the snow"], [images[0], images[1]],
                     generator=[seeded(5), seeded(6), seeded(7)])
    np.testing.assert_allclose(three[0], generate(pipe, "in the jungle", [images[0], images[1]], seed=5)[0],
                               rtol=0, atol=BATCH_TOLERANCE)


def test_generators_must_be_one_or_one_per_image(pipe, images):
    with pytest.raises(ValueError, match="3 generators for 2 images"):
        generate(pipe, ["in the jungle", "on the beach"], images[0], generator=[seeded(1), seeded(2), seeded(3)])


def test_num_images_per_prompt_uses_one_generator_per_image(pipe, images):
    several = generate(pipe, "on the beach", images[1], generator=[seeded(11), seeded(12)], num_images_per_prompt=2)
    assert several.shape == (2, SIZE, SIZE, 3)
    for k in range(2):
        np.testing.assert_allclose(several[k], generate(pipe, "on the beach", images[1], seed=11 + k)[0], rtol=0,
                                   atol=BATCH_TOLERANCE)
    assert_differs(several[0], several[1])
    # Two prompts, two images each: prompt-major order.
    grid = generate(pipe, ["in the jungle", "on the beach"], images[1], num_images_per_prompt=2,
                    generator=[seeded(s) for s in (1, 2, 1, 2)])
    assert grid.shape == (4, SIZE, SIZE, 3)
    np.testing.assert_allclose(grid[3], generate(pipe, "on the beach", images[1], seed=2)[0], rtol=0,
                               atol=BATCH_TOLERANCE)


def test_several_references_are_averaged(pipe, images):
    first = pipe.subject_embedding(images[0], "dog")
    second = pipe.subject_embedding(images[1], "dog")
    assert_differs(first.numpy(), second.numpy())
    mean = pipe.subject_embedding([images[0], images[1]], "dog")
    torch.testing.assert_close(mean, (first + second) / 2, rtol=0, atol=1e-6)
    weighted = pipe.subject_embedding([images[0], images[1]], "dog", weights=[3, 1])
    torch.testing.assert_close(weighted, (3 * first + second) / 4, rtol=0, atol=1e-6)
    for bad in ([1], [1, 2, 3], [1, -1], [0, 0]):
        with pytest.raises(ValueError, match="weights"):
            pipe.subject_embedding([images[0], images[1]], "dog", weights=bad)
    with pytest.raises(ValueError, match="weights"):
        pipe(["x"], [images[0], images[1]], "dog", reference_weights=[1], num_inference_steps=1, height=SIZE,
             width=SIZE)

    averaged = generate(pipe, reference=[images[0], images[1]])
    np.testing.assert_array_equal(averaged, generate(pipe, subject_embeds=mean))
    assert_differs(averaged, generate(pipe, reference=images[0]))
    np.testing.assert_array_equal(generate(pipe, reference=[images[0], images[1]], reference_weights=[3, 1]),
                                  generate(pipe, subject_embeds=weighted))


def test_real_photos_of_a_subject(pipe):
    """The reference images as files: real JPEGs of different sizes, by path."""
    folder = shared_path("dreambench", "dataset", "dog")
    photos = sorted(folder.glob("*.jpg"))[:2]
    assert len(photos) == 2
    embeds = pipe.subject_embedding(photos, "dog")
    assert embeds.shape == (1, NUM_QUERY_TOKENS, HIDDEN) and torch.isfinite(embeds).all()
    opened = [Image.open(path) for path in photos]
    torch.testing.assert_close(pipe.subject_embedding(opened, "dog"), embeds, rtol=0, atol=0)
    np.testing.assert_array_equal(generate(pipe, reference=[str(p) for p in photos]),
                                  generate(pipe, subject_embeds=embeds))


def test_ready_subject_embeddings(pipe, images, baseline):
    embeds = pipe.subject_embedding(images[0], "dog")
    assert embeds.shape == (1, NUM_QUERY_TOKENS, HIDDEN)
    assert embeds.dtype == torch.float32
    np.testing.assert_array_equal(generate(pipe, subject_embeds=embeds), baseline)
    # One embedding per prompt.
    other = pipe.subject_embedding(images[1], "dog")
    pair = generate(pipe, ["in the jungle", "in the jungle"], subject_embeds=torch.cat([embeds, other]),
                    generator=[seeded(0), seeded(0)])
    np.testing.assert_allclose(pair[0], baseline[0], rtol=0, atol=BATCH_TOLERANCE)
    assert_differs(pair[0], pair[1])

    for shape in ([NUM_QUERY_TOKENS, HIDDEN], [3, NUM_QUERY_TOKENS, HIDDEN], [1, NUM_QUERY_TOKENS, HIDDEN // 2],
                  [1, NUM_QUERY_TOKENS + 1, HIDDEN], [1, 1, NUM_QUERY_TOKENS, HIDDEN]):
        with pytest.raises(ValueError, match="subject_embeds"):
            generate(pipe, ["a", "b"], subject_embeds=torch.zeros(shape), generator=None)
    with pytest.raises(ValueError):
        generate(pipe, subject=None)  # neither a reference image nor subject_embeds
    with pytest.raises(ValueError, match="subject"):
        pipe.subject_embedding(images[0], "  ")


def test_bfloat16_on_the_cpu(checkpoint, images, baseline):
    pipe = load(checkpoint, torch_dtype=torch.bfloat16)
    for name in ("qformer", "text_encoder", "unet", "vae"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.bfloat16}, name
    assert pipe.dtype == torch.bfloat16
    seen = []
    pipe.unet.register_forward_hook(lambda module, args, kwargs_or_output: seen.append(args[0].dtype))
    image = generate(pipe, reference=images[0])
    assert seen and set(seen) == {torch.bfloat16}
    assert image.dtype == np.float32 and image.shape == baseline.shape
    difference = np.abs(image - baseline)
    assert difference.mean() < 0.05
    assert difference.max() > 0, "bit-identical to float32: it did not run in bfloat16"
    assert pipe.subject_embedding(images[0], "dog").dtype == torch.bfloat16


def test_float16_on_the_cpu_starts_from_the_float32_noise(checkpoint, images, baseline):
    pipe = load(checkpoint, torch_dtype=torch.float16)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float16}
    image = generate(pipe, reference=images[0])
    difference = np.abs(image - baseline)
    assert difference.mean() < 0.02 and difference.max() > 0


def test_to_takes_a_dtype_or_a_device_as_diffusers_does(checkpoint):
    pipe = load(checkpoint)
    assert pipe.to(torch.bfloat16) is pipe and pipe.dtype == torch.bfloat16
    pipe.to("cpu", torch.float32)
    assert pipe.dtype == torch.float32 and pipe.device.type == "cpu"
    assert {p.dtype for p in pipe.qformer.parameters()} == {torch.float32}


def test_pil_output_rounds_the_float_image(pipe, images, baseline):
    (picture,) = pipe("in the jungle", images[0], "dog", "dog", height=SIZE, width=SIZE, num_inference_steps=STEPS,
                      generator=seeded(0)).images
    assert picture.mode == "RGB" and picture.size == (SIZE, SIZE)
    np.testing.assert_array_equal(np.asarray(picture), (baseline[0] * 255).round().astype(np.uint8))
    tensor = pipe("in the jungle", images[0], "dog", "dog", height=SIZE, width=SIZE, num_inference_steps=STEPS,
                  generator=seeded(0), output_type="pt").images
    np.testing.assert_array_equal(tensor.permute(0, 2, 3, 1).numpy(), baseline)


def test_a_negative_prompt_past_77_tokens_is_truncated(pipe, images):
    words = [f"word{i}" for i in range(120)]
    long = generate(pipe, reference=images[0], neg_prompt=" ".join(words))
    tokens = pipe.tokenizer(" ".join(words), truncation=True, max_length=77).input_ids
    kept = pipe.tokenizer.decode(tokens, skip_special_tokens=True)
    assert len(pipe.tokenizer(" ".join(words)).input_ids) > 77
    np.testing.assert_array_equal(long, generate(pipe, reference=images[0], neg_prompt=kept))


def test_the_inputs_change_the_image(pipe, images, baseline):
    assert_differs(generate(pipe, reference=images[2]), baseline)
    assert_differs(generate(pipe, reference=images[0], subject="cat"), baseline)
    assert_differs(generate(pipe, "on the beach", images[0]), baseline)
    unguided = generate(pipe, reference=images[0], guidance_scale=1.0)
    assert_differs(unguided, baseline)
    assert_differs(generate(pipe, reference=images[0], neg_prompt="a red photo"), baseline)
    # Without guidance the negative prompt plays no part.
    np.testing.assert_array_equal(generate(pipe, reference=images[0], guidance_scale=1.0, neg_prompt="a red photo"),
                                  unguided)
    assert_differs(generate(pipe, reference=images[0], seed=1), baseline)
    np.testing.assert_array_equal(generate(pipe, reference=images[0]), baseline)


# --------------------------------------------------------- what the reference parity depends on
def test_the_text_encoders_causal_mask_matters(pipe, images, monkeypatch):
    from blipdiff.models.blip_diffusion import text_encoder

    embeds = pipe.subject_embedding(images[0], "dog")
    prompt = ["a dog in the jungle"]
    causal = pipe.encode_prompt(embeds, prompt)
    assert causal.shape == (1, 77, HIDDEN)

    def no_mask(length, dtype, device):
        return torch.zeros(1, 1, length, length, dtype=dtype, device=device)

    monkeypatch.setattr(text_encoder, "causal_mask", no_mask)
    bidirectional = pipe.encode_prompt(embeds, prompt)
    assert (bidirectional - causal).abs().max() > 1e-3
    monkeypatch.undo()
    torch.testing.assert_close(pipe.encode_prompt(embeds, prompt), causal, rtol=0, atol=0)


def test_the_context_is_causal_over_the_spliced_sequence(pipe, images):
    """A change in the prompt's k-th token (after the splice) leaves every earlier position alone,
    the subject tokens included, and changes that position."""
    embeds = pipe.subject_embedding(images[0], "dog")
    first = pipe.encode_prompt(embeds, ["a dog on the grass"])
    second = pipe.encode_prompt(embeds, ["a dog on the table"])
    ids = pipe.tokenizer(["a dog on the grass", "a dog on the table"]).input_ids
    changed = next(i for i, (x, y) in enumerate(zip(*ids)) if x != y)
    position = changed + NUM_QUERY_TOKENS  # after ctx_begin_pos the subject's tokens come first
    torch.testing.assert_close(first[:, :position], second[:, :position], rtol=0, atol=0)
    assert (first[:, position] - second[:, position]).abs().max() > 1e-3
    # The subject tokens sit at ctx_begin_pos: the positions before them ignore the subject.
    other = pipe.encode_prompt(pipe.subject_embedding(images[1], "dog"), ["a dog on the grass"])
    torch.testing.assert_close(first[:, :pipe.ctx_begin_pos], other[:, :pipe.ctx_begin_pos], rtol=0, atol=0)
    assert (first[:, pipe.ctx_begin_pos] - other[:, pipe.ctx_begin_pos]).abs().max() > 1e-3


def test_ctx_begin_pos_matters(checkpoint, images, baseline):
    pipe = load(checkpoint)
    assert pipe.ctx_begin_pos == 2
    pipe.ctx_begin_pos = 3
    assert_differs(generate(pipe, reference=images[0]), baseline)
    pipe.ctx_begin_pos = 2
    np.testing.assert_array_equal(generate(pipe, reference=images[0]), baseline)
