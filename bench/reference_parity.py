"""Parity of blipdiff's BLIP-Diffusion pipeline with the reference, diffusers' own ``BlipDiffusionPipeline``.

    .venv/bin/python bench/reference_parity.py                      # build, generate, compare, record
    .venv/bin/python bench/reference_parity.py --write-fixtures tests/fixtures/reference_parity
    .venv/bin/python bench/reference_parity.py --real-size          # the released architecture, random weights

The reference only runs on diffusers 0.32.2 with transformers 4.44.2, so it runs in a side virtual
environment (``.reference-venv`` by default; created when missing, ``--fresh`` recreates it) through
bench/reference_side.py. That side builds a tiny random BLIP-Diffusion from the reference classes (every
weight perturbed) and saves it as safetensors and as ``.bin``; both sides then run the same cases (real
DreamBench photos as reference images, so the reference image resize matters; guided and unguided; a
negative prompt; a target subject other than the source; two sizes; one batch call of two prompts, each
with its own reference photo and categories) and their images (max abs on [0, 1]), subject embeddings
(each reference's) and the U-Net's context (max relative error) are compared. Then the other
way: blipdiff saves the checkpoint and the reference loads and runs it. The table goes to
docs/benchmarks.md.

``--real-size`` does the same on the released checkpoint's real architecture (CLIP ViT-L/14 of 23 layers,
the BERT-base Q-Former with 16 queries, CLIP ViT-L's text encoder, Stable Diffusion v1.5's U-Net and VAE;
1.56 billion random, perturbed weights; tokenizers padded to the real vocabulary sizes) with fewer and
cheaper cases: 64-pixel images, two or three PNDM steps. The three checkpoints (the reference's
safetensors and ``.bin``, blipdiff's save) take about 19 GB in the work folder; the two sides run one
after the other, each holding one copy of the model (7 to 10 GB resident). About four minutes on two CPU
cores. Its table goes to a section of its own.

``--write-fixtures DIR`` copies the reference-built checkpoint, the stand-in ``bert-base-uncased``
tokenizer, the cases and the reference outputs into DIR, so a regular test can guard parity without
the side environment (the DreamBench photos stay in ../shared; see the README written there).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchmark_record import ROOT, host, record
from reference_side import (REAL, TINY, call_pipeline, is_batch, offline_hub_with_bert, open_reference_image,
                            reference_paths)

SIDE_SCRIPT = Path(__file__).resolve().with_name("reference_side.py")
DEFAULT_SIDE_ENV = ROOT / ".reference-venv"
DREAMBENCH = ROOT.parent / "shared" / "data" / "dreambench" / "dataset"
# torch first and pinned: the local CPU wheel (an unpinned torch would pull a multi-GB CUDA build).
SIDE_TORCH = "torch==2.13.0"
# The last stack the reference runs on, with the versions of its dependencies it was measured with
# (huggingface_hub < 1 and tokenizers < 0.20, as transformers 4.44.2 requires).
SIDE_PACKAGES = ["diffusers==0.32.2", "transformers==4.44.2", "huggingface_hub==0.36.2", "tokenizers==0.19.1",
                 "safetensors==0.8.0", "numpy==2.4.6", "pillow==13.0.0"]
SIDE_MARKER = "reference-packages.txt"
SERIALIZATIONS = ("safetensors", "bin")  # the reference saves the checkpoint in each; blipdiff loads each
IMAGE_TOLERANCE = 1e-3
# max|a-b|/max|b|, for the U-Net's context too. Both are compared directly, not only through the image:
# at real size, noise of 1e-2 relative to the subject embedding moved the 3-step image by only 1.5e-3.
EMBEDDING_TOLERANCE = 1e-4
FIXTURE_BUDGET = 400_000
LAVIS_NEGATIVE = ("over-exposure, under-exposure, saturated, duplicate, out of frame, lowres, cropped, worst quality, "
                  "low quality, jpeg artifacts, morbid, mutilated, out of frame, ugly, bad anatomy, bad proportions, "
                  "deformed, blurry, duplicate")


def _case(name: str, prompt: str | list[str], image: str | list[str], source: str | list[str],
          target: str | list[str], guidance: float, height: int, width: int, steps: int, seed: int,
          negative: str = "", crop: tuple[int, int, int, int] | None = None, control: str | None = None,
          control_crop: tuple[int, int, int, int] | None = None) -> dict[str, Any]:
    """One call. Lists for ``prompt``, ``image``, ``source`` and ``target``, one entry per prompt, make a
    batch case (reference_side.is_batch): image i uses reference photo i and categories i."""
    if isinstance(prompt, list) and not all(isinstance(v, list) and len(v) == len(prompt) > 1
                                            for v in (image, source, target)):
        raise ValueError(f"{name}: a batch case gives several prompts and as many photos and categories")
    case = {"name": name, "prompt": prompt, "reference_image": image, "source_subject": source,
            "target_subject": target, "guidance_scale": guidance, "height": height, "width": width,
            "num_inference_steps": steps, "seed": seed, "negative_prompt": negative}
    if crop:
        case["crop"] = list(crop)
    if control:
        case["control_image"] = control
    if control_crop:
        case["control_crop"] = list(control_crop)
    return case


# Reference images are paths under the DreamBench dataset folder. dog_guided_32 and dog_other_photo_32
# differ only in the photo, dog_guided_32 and dog_unguided_32 only in guidance: the reference's own
# sensitivity to each, which a meaningful comparison needs, is checked on them.
CASES = [
    _case("dog_guided_32", "in the jungle", "dog/00.jpg", "dog", "dog", 7.5, 32, 32, 6, 0),
    _case("dog_unguided_32", "in the jungle", "dog/00.jpg", "dog", "dog", 1.0, 32, 32, 6, 0),
    _case("dog_other_photo_32", "in the jungle", "dog/03.jpg", "dog", "dog", 7.5, 32, 32, 6, 0),
    # A wide cut of the photo: the reference squashes it to a square.
    _case("cat_wide_negative_48x40", "on a red sofa", "cat/01.jpg", "cat", "cat", 7.5, 48, 40, 5, 88888, LAVIS_NEGATIVE,
          crop=(0, 300, 1277, 1000)),
    _case("backpack_as_teddy_40x48", "in the snow", "backpack/02.jpg", "backpack", "teddy bear", 5.0, 40, 48, 4, 7),
    # Several WordPiece tokens for the subject; without guidance the negative prompt must be ignored.
    _case("sloth_unguided_negative_32", "on a red sofa", "grey_sloth_plushie/00.jpg", "grey sloth plushie",
          "grey sloth plushie", 1.0, 32, 32, 5, 3, "blurry"),
    # One call, two prompts, each with its own photo and categories (the reference preprocesses the photos
    # into one batch and pairs embedding i with prompt i); one generator draws both images' noise. Its
    # first image is dog_guided_32's call.
    _case("dog_cat_batch_32", ["in the jungle", "on a red sofa"], ["dog/00.jpg", "cat/01.jpg"], ["dog", "cat"],
          ["dog", "cat"], 7.5, 32, 32, 6, 0),
    # The ControlNet pipeline (the checkpoint's own ControlNet): dog_guided_32's call under the control of a
    # wide cut of another photo, then unguided at a size that is not square.
    _case("dog_controlnet_32", "in the jungle", "dog/00.jpg", "dog", "dog", 7.5, 32, 32, 6, 0,
          control="cat/02.jpg", control_crop=(0, 200, 1282, 900)),
    _case("can_controlnet_unguided_48x40", "on the beach", "can/00.jpg", "can", "can", 1.0, 48, 40, 4, 5,
          control="backpack/01.jpg"),
]


# For the released architecture (1.56 billion parameters) on a CPU: fewer cases, 64-pixel images (8x8
# latents), two or three steps. The dog cases pair up as above; cat_wide_negative_64x48's latents (8x6) are
# not a multiple of the U-Net's downsampling factor (8), so its up-blocks are told their sizes.
REAL_SIZE_CASES = [
    _case("dog_guided_64", "in the jungle", "dog/00.jpg", "dog", "dog", 7.5, 64, 64, 3, 0),
    _case("dog_unguided_64", "in the jungle", "dog/00.jpg", "dog", "dog", 1.0, 64, 64, 3, 0),
    _case("dog_other_photo_64", "in the jungle", "dog/03.jpg", "dog", "dog", 7.5, 64, 64, 3, 0),
    _case("cat_wide_negative_64x48", "on a red sofa", "cat/01.jpg", "cat", "cat", 7.5, 64, 48, 2, 88888,
          LAVIS_NEGATIVE, crop=(0, 300, 1277, 1000)),
    _case("dog_cat_batch_64", ["in the jungle", "on a red sofa"], ["dog/00.jpg", "cat/01.jpg"], ["dog", "cat"],
          ["dog", "cat"], 7.5, 64, 64, 2, 0),
]


@dataclass(frozen=True)
class Mode:
    """What one run measures."""
    title: str  # of its docs/benchmarks.md section
    size: str  # reference_side.py build --size
    model: str  # a description for the record
    cases: list[dict[str, Any]]
    photo_pair: tuple[str, str]  # two cases that differ only in the reference photo
    guidance_pair: tuple[str, str]  # two cases that differ only in the guidance scale
    batch_case: str  # a batch case of two prompts with different reference photos
    control_pair: tuple[str, str] | None = None  # two cases that differ only in the ControlNet's control


TINY_MODE = Mode(
    "BLIP-Diffusion parity with the reference pipeline (tiny random checkpoint)", "tiny",
    f"tiny random BLIP-Diffusion built by the reference ({TINY.image_size}² subject images, {TINY.num_query_tokens} "
    f"query tokens, hidden {TINY.text_hidden}, U-Net and VAE of two blocks)",
    CASES, ("dog_guided_32", "dog_other_photo_32"), ("dog_guided_32", "dog_unguided_32"), "dog_cat_batch_32",
    ("dog_guided_32", "dog_controlnet_32"))
REAL_SIZE_MODE = Mode(
    "BLIP-Diffusion parity with the reference pipeline (real-size random checkpoint)", "real",
    "the released checkpoint's architecture with random weights, built by the reference: CLIP ViT-L/14 of "
    f"{REAL.vision['num_hidden_layers']} layers at {REAL.image_size}² (hidden {REAL.vision['hidden_size']}, "
    f"{REAL.vision['num_attention_heads']} heads, MLP {REAL.vision['intermediate_size']}, LayerNorm eps "
    f"{REAL.vision['layer_norm_eps']:g}), the BERT-base Q-Former (hidden {REAL.text_hidden}, "
    f"{REAL.qformer['num_hidden_layers']} layers, cross-attention every layer) with {REAL.num_query_tokens} queries, "
    "CLIP ViT-L's text encoder, Stable Diffusion v1.5's U-Net and VAE, SD1.5's PNDM; tokenizers: tiny trained "
    f"vocabularies padded with fillers to the real sizes ({REAL.clip_vocab:,} CLIP BPE tokens; "
    f"{REAL.wordpiece_vocab:,} WordPiece tokens, so [DEC] = {REAL.wordpiece_vocab})",
    REAL_SIZE_CASES, ("dog_guided_64", "dog_other_photo_64"), ("dog_guided_64", "dog_unguided_64"),
    "dog_cat_batch_64")


@dataclass
class Row:
    case: str
    direction: str
    image_max_abs: float
    embedding_rel_err: float
    context_rel_err: float
    diagnosis: str = ""

    @property
    def passed(self) -> bool:
        return (self.image_max_abs <= IMAGE_TOLERANCE and self.embedding_rel_err <= EMBEDDING_TOLERANCE
                and self.context_rel_err <= EMBEDDING_TOLERANCE)


def ensure_side_env(env: Path, fresh: bool) -> Path:
    """The side environment's python, creating or completing the environment when needed."""
    if fresh and env.exists():
        shutil.rmtree(env)
    python = env / "bin" / "python"
    wanted = "\n".join([SIDE_TORCH, *SIDE_PACKAGES]) + "\n"
    marker = env / SIDE_MARKER
    if python.exists() and marker.is_file() and marker.read_text() == wanted:
        return python
    print(f"setting up the reference environment in {env} ...", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    for packages in ([SIDE_TORCH], SIDE_PACKAGES):
        done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"pip install {' '.join(packages)} failed in {env}:\n{done.stdout}{done.stderr}")
    marker.write_text(wanted)
    return python


def side_versions(python: Path) -> str:
    code = ("import diffusers, transformers, torch, huggingface_hub, PIL; print(f'diffusers {diffusers.__version__}, "
            "transformers {transformers.__version__}, torch {torch.__version__}, huggingface_hub "
            "{huggingface_hub.__version__}, Pillow {PIL.__version__}')")
    return subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def peak_memory_gib(who: int) -> float:
    """The largest resident set so far of this process (RUSAGE_SELF) or of any of its finished children
    (RUSAGE_CHILDREN), in GiB."""
    return resource.getrusage(who).ru_maxrss / 2**20


def run_side(python: Path, *arguments: str) -> None:
    done = subprocess.run([str(python), str(SIDE_SCRIPT), *arguments], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"reference_side.py {arguments[0]} failed:\n{done.stdout}{done.stderr}")
    print(done.stdout.strip(), flush=True)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def run_blipdiff(base_pipe: Any, cases: list[dict[str, Any]], images: Path,
                 control_pipe: Any = None) -> dict[str, np.ndarray]:
    """Each case through blipdiff's pipeline with the reference's arguments (a ControlNet case through
    ``control_pipe``), plus the same intermediate tensors reference_side.py keeps, captured where
    blipdiff's pipeline hands them on. blipdiff runs the Q-Former once per reference where the reference
    runs it once on the batch: its captured pixel values and subject ids are concatenated (a batch case's
    categories must tokenize to the same length)."""
    outputs: dict[str, np.ndarray] = {}
    for case in cases:
        pipe = control_pipe if "control_image" in case else base_pipe
        if pipe is None:
            raise ValueError(f"{case['name']} is a ControlNet case: give control_pipe")
        reference_image = open_reference_image(images, case)
        captured: dict[str, list[torch.Tensor]] = collections.defaultdict(list)

        def keep(name: str, tensor: torch.Tensor) -> None:
            captured[name].append(tensor.detach().cpu().clone())

        def keep_subject_inputs(_module: torch.nn.Module, args: tuple) -> None:
            keep("pixel_values", args[0])
            keep("subject_ids", args[1])

        hooks = [
            pipe.qformer.register_forward_pre_hook(keep_subject_inputs),
            # The prompt first, then (guided only) the negative prompt.
            pipe.text_encoder.register_forward_pre_hook(lambda _m, args: keep("text_ids", args[0])),
            pipe.unet.register_forward_pre_hook(
                lambda _m, _args, kwargs: keep("context", kwargs["encoder_hidden_states"]), with_kwargs=True),
            pipe.vae.post_quant_conv.register_forward_pre_hook(
                lambda _m, args: keep("final_latents", args[0] * pipe.vae.config.scaling_factor)),
        ]
        image = call_pipeline(pipe, case, reference_image, hooks, images)
        if is_batch(case):
            embedding = torch.cat([pipe.subject_embedding(photo, source)
                                   for photo, source in zip(reference_image, case["source_subject"], strict=True)])
        else:
            embedding = pipe.subject_embedding(reference_image, case["source_subject"])
        name = case["name"]
        outputs |= {
            f"{name}.image": np.asarray(image if is_batch(case) else image[0], dtype=np.float32),
            f"{name}.subject_embedding": embedding.float().cpu().numpy(),
            f"{name}.prompt_ids": captured["text_ids"][0].numpy(),
            f"{name}.subject_ids": torch.cat(captured["subject_ids"]).numpy(),
            f"{name}.pixel_values": torch.cat(captured["pixel_values"]).float().numpy(),
            **{f"{name}.{stage}": captured[stage][0].float().numpy() for stage in ("context", "final_latents")},
        }
        if len(captured["text_ids"]) > 1:
            outputs[f"{name}.negative_ids"] = captured["text_ids"][1].numpy()
    return outputs


def max_abs(ours: np.ndarray, reference: np.ndarray) -> float:
    if ours.shape != reference.shape:
        return float("inf")
    return float(np.abs(ours.astype(np.float64) - reference.astype(np.float64)).max())


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return max_abs(ours, reference) / float(np.abs(reference).max())


def embedding_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """The largest relative error over the subject embeddings [N, Q, D], each reference's on its own
    (a batch's embeddings may differ in scale)."""
    if ours.shape != reference.shape:
        return float("inf")
    return max(relative_error(mine, theirs) for mine, theirs in zip(ours, reference, strict=True))


def compare(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray], cases: list[dict[str, Any]],
            direction: str) -> list[Row]:
    rows = []
    for case in cases:
        name = case["name"]
        row = Row(name, direction, max_abs(ours[f"{name}.image"], reference[f"{name}.image"]),
                  embedding_error(ours[f"{name}.subject_embedding"], reference[f"{name}.subject_embedding"]),
                  relative_error(ours[f"{name}.context"], reference[f"{name}.context"]))
        if not row.passed:
            row.diagnosis = diagnose(ours, reference, name)
        rows.append(row)
    return rows


def diagnose(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray], case: str) -> str:
    """Where a failing case first departs from the reference, stage by stage."""
    lines = []
    for stage in ("pixel_values", "subject_ids", "subject_embedding", "prompt_ids", "negative_ids", "context",
                  "final_latents", "image"):
        key = f"{case}.{stage}"
        if key not in reference:
            continue
        if key not in ours:
            lines.append(f"    {stage}: blipdiff has none (reference {reference[key].shape})")
            continue
        mine, theirs = ours[key], reference[key]
        if mine.shape != theirs.shape:
            lines.append(f"    {stage}: shape {mine.shape} vs reference {theirs.shape}")
        elif np.issubdtype(theirs.dtype, np.integer):
            differing = np.flatnonzero((mine != theirs).reshape(-1))
            verdict = f"{differing.size} ids differ, the first at {differing[0]}" if differing.size else "same"
            lines.append(f"    {stage}: {verdict}")
        else:
            lines.append(f"    {stage}: max abs {max_abs(mine, theirs):.3g}, "
                         f"relative {relative_error(mine, theirs):.3g}")
    return "\n".join(lines)


SAME_WEIGHTS = "safetensors vs .bin checkpoint, largest difference"
OTHER_PHOTO_IMAGE = "another dog photo, image max abs"
OTHER_PHOTO_EMBEDDING = "another dog photo, embedding relative"
GUIDANCE = "guidance 7.5 vs 1.0, image max abs"
BATCH_EMBEDDING = "the batch's two references, embedding relative"
CONTROL = "ControlNet control vs none, image max abs"


def reference_sanity(references: dict[str, dict[str, np.ndarray]], mode: Mode) -> dict[str, float]:
    """The reference's own behaviour the comparison relies on: the same weights in either format give
    bit-identical outputs (two independent runs, so generation is deterministic), and the reference photo
    and the guidance each move the image far beyond the tolerance (the photo the subject embedding too:
    random weights can leave a model blind to its input), and the batch case's two references have
    embeddings far apart (so that pairing a prompt with the wrong one, or with their mean, shows), and
    the ControlNet moves the image (a ControlNet whose residuals vanish would pass with any wiring)."""
    run = references["safetensors"]
    photo, other_photo = mode.photo_pair
    guided, unguided = mode.guidance_pair
    control = {CONTROL: max_abs(run[f"{mode.control_pair[0]}.image"], run[f"{mode.control_pair[1]}.image"])} \
        if mode.control_pair else {}
    return control | {
        SAME_WEIGHTS: max(max_abs(run[key], references["bin"][key]) for key in run),
        OTHER_PHOTO_IMAGE: max_abs(run[f"{photo}.image"], run[f"{other_photo}.image"]),
        OTHER_PHOTO_EMBEDDING: relative_error(run[f"{other_photo}.subject_embedding"],
                                              run[f"{photo}.subject_embedding"]),
        GUIDANCE: max_abs(run[f"{guided}.image"], run[f"{unguided}.image"]),
        BATCH_EMBEDDING: relative_error(*run[f"{mode.batch_case}.subject_embedding"][::-1]),
    }


def blind(sanity: dict[str, float]) -> bool:
    """Whether the reference's outputs cannot tell a wrong implementation apart."""
    return (sanity[SAME_WEIGHTS] != 0 or sanity[OTHER_PHOTO_IMAGE] < 10 * IMAGE_TOLERANCE
            or sanity[OTHER_PHOTO_EMBEDDING] < 10 * EMBEDDING_TOLERANCE or sanity[GUIDANCE] < 10 * IMAGE_TOLERANCE
            or sanity[BATCH_EMBEDDING] < 10 * EMBEDDING_TOLERANCE or sanity.get(CONTROL, 1.0) < 10 * IMAGE_TOLERANCE)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def write_fixtures(target: Path, work: Path, reference: dict[str, np.ndarray], versions: str) -> None:
    """The safetensors checkpoint, the stand-in bert-base-uncased, cases.json, reference.npz (images as
    float16, whose rounding, at most 2.4e-4 on [0, 1], leaves the 1e-3 tolerance room) and a README;
    the .bin checkpoint too while everything stays within FIXTURE_BUDGET bytes."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copytree(work / "checkpoint-safetensors", target / "checkpoint")
    shutil.copytree(work / "bert-base-uncased", target / "bert-base-uncased")
    shutil.copyfile(work / "cases.json", target / "cases.json")
    kept = {}
    for key, value in reference.items():
        stage = key.rsplit(".", 1)[1]
        if stage == "image":
            kept[key] = value.astype(np.float16)
        elif stage == "subject_embedding":
            kept[key] = value
        elif stage.endswith("_ids"):
            kept[key] = value.astype(np.int32)
    np.savez_compressed(target / "reference.npz", **kept)
    with_bin = folder_bytes(target) + folder_bytes(work / "checkpoint-bin") <= FIXTURE_BUDGET
    if with_bin:
        shutil.copytree(work / "checkpoint-bin", target / "checkpoint-bin")
    bin_note = "; `checkpoint-bin/`: the same weights as `.bin`" if with_bin else ""
    (target / "README.md").write_text(f"""# Reference parity fixtures

Written by `bench/reference_parity.py --write-fixtures` with the reference pipeline (diffusers'
`BlipDiffusionPipeline`; {versions}); regenerate them the same way, never by hand.

- `checkpoint/`: a tiny random BLIP-Diffusion with a ControlNet (the layout of
  `Salesforce/blipdiffusion-controlnet`) built from the reference classes, every weight perturbed, saved
  by the reference's `save_pretrained` (safetensors){bin_note}.
  Like `Salesforce/blipdiffusion`, `qformer/config.json` names no `tokenizer`: the Q-Former loads
  `bert-base-uncased`.
- `bert-base-uncased/`: the tiny uncased WordPiece tokenizer standing in for `bert-base-uncased`; serve
  it as that repository's snapshot in a private Hugging Face cache (`HF_HOME`, `HF_HUB_OFFLINE=1`).
  `[DEC]` is added as the next id, so the Q-Former's vocabulary is one larger.
- `cases.json`: the calls; `reference_image` is relative to `../shared/data/dreambench/dataset` (not
  committed: skip when absent), `reference_image_sha256` its checksum. In a batch case `prompt`,
  `reference_image` (and its checksum), `source_subject` and `target_subject` are lists, one entry per
  prompt: one call, image i from reference photo i and categories i. A case with a `control_image`
  (relative to the same folder, cut to `control_crop` when given; `control_image_sha256` its checksum)
  ran through the reference's `BlipDiffusionControlNetPipeline` with that photo as conditioning image.
- `reference.npz`: per case `NAME.image` ([H, W, 3] float16 in [0, 1], `output_type="np"`),
  `NAME.subject_embedding` ([1, {TINY.num_query_tokens}, {TINY.text_hidden}] float32), `NAME.prompt_ids`,
  `NAME.negative_ids` (guided cases) and `NAME.subject_ids` (int32, as the reference tokenizes them); a
  batch case of N prompts has N images ([N, H, W, 3]), N subject embeddings (one per reference) and N
  rows of ids. Tolerances: image max abs {IMAGE_TOLERANCE:g}, embedding max|a-b|/max|b| (each
  reference's) {EMBEDDING_TOLERANCE:g}.
""")
    print(f"fixtures in {target}: {folder_bytes(target):,} bytes"
          f"{'' if with_bin else ' (the .bin checkpoint left out: over the budget)'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side-env", type=Path, default=DEFAULT_SIDE_ENV, help="the reference's virtual environment")
    parser.add_argument("--fresh", action="store_true", help="delete and recreate the side environment")
    parser.add_argument("--images", type=Path, default=DREAMBENCH, help="the DreamBench dataset folder")
    parser.add_argument("--workdir", type=Path, help="keep the checkpoints and outputs here")
    parser.add_argument("--real-size", action="store_true",
                        help="the released checkpoint's architecture (random weights) instead of a tiny model")
    parser.add_argument("--write-fixtures", type=Path, metavar="DIR", help="copy checkpoint, cases and outputs here")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/benchmarks.md")
    args = parser.parse_args()
    if args.real_size and args.write_fixtures:
        parser.error("--write-fixtures writes the tiny checkpoint's fixtures; it does not go with --real-size")
    mode = REAL_SIZE_MODE if args.real_size else TINY_MODE
    missing = [path for case in mode.cases for path in [*reference_paths(case), *filter(None, [case.get("control_image")])]
               if not (args.images / path).is_file()]
    if missing:
        sys.exit(f"reference photos not found under {args.images}: {', '.join(missing)} (pass --images)")

    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="blipdiff-parity-")))
        work.mkdir(parents=True, exist_ok=True)
        measure(args, mode, work)


def blipdiff_side(work: Path, cases: list[dict[str, Any]], images: Path, bert: Path,
                  references: dict[str, dict[str, np.ndarray]]) -> tuple[list[Row], dict[str, np.ndarray]]:
    """blipdiff loads each checkpoint the reference saved and runs the cases; the rows, and its outputs
    on the safetensors checkpoint, which it saves to ``work / "checkpoint-blipdiff"``. A function of its
    own so that the pipeline is freed before the reference runs again."""
    rows: list[Row] = []
    outputs: dict[str, np.ndarray] = {}
    with offline_hub_with_bert(bert):
        # Imported only now: the private Hugging Face cache must be in place first (see offline_hub_with_bert).
        from blipdiff.models.blip_diffusion import BlipDiffusionControlNetPipeline, BlipDiffusionPipeline

        for serialization in SERIALIZATIONS:
            pipe = BlipDiffusionPipeline.from_pretrained(work / f"checkpoint-{serialization}")
            pipe.set_progress_bar_config(disable=True)
            control_pipe = None
            if any("control_image" in case for case in cases):
                control_pipe = BlipDiffusionControlNetPipeline.from_pretrained(work / f"checkpoint-{serialization}")
                control_pipe.set_progress_bar_config(disable=True)
            ours = run_blipdiff(pipe, cases, images, control_pipe)
            rows += compare(ours, references[serialization], cases, f"reference {serialization} → blipdiff")
            if serialization == "safetensors":
                outputs = ours
                pipe.save_pretrained(work / "checkpoint-blipdiff")
            del pipe, control_pipe
    return rows, outputs


def measure(args: argparse.Namespace, mode: Mode, work: Path) -> None:
    """Build, generate on both sides, compare, report; exits non-zero when a case fails."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal started
        seconds[phase] = time.perf_counter() - started
        started = time.perf_counter()

    python = ensure_side_env(args.side_env, args.fresh)
    versions = side_versions(python)
    print(f"reference: {versions}", flush=True)
    bert = work / "bert-base-uncased"

    def sha256(path: str) -> str:
        return hashlib.sha256((args.images / path).read_bytes()).hexdigest()

    cases = [{**case, "reference_image_sha256": [sha256(path) for path in case["reference_image"]] if is_batch(case)
              else sha256(case["reference_image"]),
              **({"control_image_sha256": sha256(case["control_image"])} if "control_image" in case else {})}
             for case in mode.cases]
    (work / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    lap("side environment set-up or check")

    def reference_generate(checkpoint: Path, out: Path) -> dict[str, np.ndarray]:
        run_side(python, "generate", "--model", str(checkpoint), "--bert-tokenizer", str(bert),
                 "--cases", str(work / "cases.json"), "--images", str(args.images), "--out", str(out))
        return load_npz(out)

    references: dict[str, dict[str, np.ndarray]] = {}
    for serialization in SERIALIZATIONS:
        folder = work / f"checkpoint-{serialization}"
        shutil.rmtree(folder, ignore_errors=True)
        run_side(python, "build", "--out", str(folder), "--bert-tokenizer", str(bert), "--format", serialization,
                 "--size", mode.size, *(["--controlnet"] if mode.control_pair else []))
        lap(f"reference build ({serialization})")
        references[serialization] = reference_generate(folder, work / f"reference-{serialization}.npz")
        lap(f"reference load and cases ({serialization})")
    sanity = reference_sanity(references, mode)
    checkpoint_bytes = folder_bytes(work / "checkpoint-safetensors")

    rows, ours = blipdiff_side(work, cases, args.images, bert, references)
    lap("blipdiff loads, cases and save")
    # The other way: the reference loads what blipdiff saved, and must give what blipdiff gave.
    on_saved = reference_generate(work / "checkpoint-blipdiff", work / "reference-on-blipdiff.npz")
    rows += compare(ours, on_saved, cases, "blipdiff save → reference")
    lap("reference load and cases (blipdiff's save)")

    lines = ["| case | direction | image max abs | embedding rel err | context rel err | result |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {row.case} | {row.direction} | {row.image_max_abs:.2e} | {row.embedding_rel_err:.2e} | "
              f"{row.context_rel_err:.2e} | {'pass' if row.passed else 'FAIL'} |" for row in rows]
    table = "\n".join(lines)
    print(table)
    first_case, first_run = cases[0]["name"], references["safetensors"]
    shapes = ", ".join(f"{stage} {list(first_run[f'{first_case}.{stage}'].shape)}"
                       for stage in ("pixel_values", "subject_embedding", "context", "final_latents"))
    facts = [f"- reference: diffusers' `BlipDiffusionPipeline` in a side environment ({versions})",
             f"- tolerances: image max abs ≤ {IMAGE_TOLERANCE:g} on [0, 1]; subject embedding and context (the "
             f"U-Net's encoder_hidden_states at the first step) max|a-b|/max|b| ≤ {EMBEDDING_TOLERANCE:g}",
             f"- model: {mode.model}, every weight perturbed ({checkpoint_bytes:,} bytes as safetensors); "
             "real DreamBench photos as reference images",
             f"- shapes in {first_case}: {shapes}",
             *(f"- reference sanity, {what}: {value:.3g}" for what, value in sanity.items()),
             f"- time: {sum(seconds.values()):.0f} s in all: "
             + "; ".join(f"{phase} {value:.0f} s" for phase, value in seconds.items()),
             f"- peak resident memory: reference side {peak_memory_gib(resource.RUSAGE_CHILDREN):.1f} GiB, "
             f"blipdiff {peak_memory_gib(resource.RUSAGE_SELF):.1f} GiB (separate processes, one after the other)"]
    print("\n".join(facts))
    failed = [row for row in rows if not row.passed]
    for row in failed:
        print(f"{row.case} ({row.direction}) departs from the reference:\n{row.diagnosis}")
    if args.write_fixtures:
        write_fixtures(args.write_fixtures, work, references["safetensors"], versions)
    if not args.no_record:
        record(mode.title, f"{host()}, Python {platform.python_version()}, torch {torch.__version__}", facts, table)
    if blind(sanity):
        print("the reference's own outputs cannot tell a wrong implementation apart (see the sanity lines)",
              file=sys.stderr)
    if failed or blind(sanity):
        sys.exit(1)


if __name__ == "__main__":
    main()
