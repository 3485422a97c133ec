"""What the CPU can prove of the fast generation path (issue 24): the denoising loop never waits on the
device, the accelerated pipeline (fused QKV, channels-last, the U-Net compiled with fullgraph=True) gives
the eager pipeline's images, and an image does not depend on what else is in its batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import save_tiny_blip_diffusion

from blipdiff.models.blip_diffusion import BlipDiffusionPipeline
from blipdiff.models.blip_diffusion.acceleration import accelerate

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = ["in the jungle", "on the beach", "on a cobblestone street"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_blip_diffusion(tmp_path_factory.mktemp("speed") / "checkpoint")


@pytest.fixture(scope="module")
def reference():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))


def load(checkpoint) -> BlipDiffusionPipeline:
    pipe = BlipDiffusionPipeline.from_pretrained(str(checkpoint))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, reference, prompts=PROMPTS, seeds=(1, 2, 3), output_type="np"):
    return pipe(prompts, reference, "dog", num_inference_steps=3, height=32, width=32,
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
                output_type=output_type).images


def test_generation_never_reads_the_device_back_and_gives_the_unet_device_timesteps(checkpoint, reference):
    """On the meta device every value is unknown: any read of one back to the host (``.item()``, a branch on a
    tensor, ``.tolist()``) raises. Generation runs through, and each U-Net call gets its timestep already on
    the device, not a CPU scalar to copy (a blocking copy per step on a GPU, and no CUDA graph)."""
    pipe = load(checkpoint).to("meta")
    forward, seen = pipe.unet.forward, []

    def recording(sample, timestep, *args, **kwargs):
        seen.append(timestep.device if torch.is_tensor(timestep) else type(timestep))
        return forward(sample, timestep, *args, **kwargs)

    pipe.unet.forward = recording
    images = generate(pipe, reference, output_type="pt")
    assert images.device.type == "meta" and tuple(images.shape) == (3, 3, 32, 32)
    assert seen and set(seen) == {torch.device("meta")}


def test_the_accelerated_pipeline_gives_the_eager_images(checkpoint, reference):
    eager = load(checkpoint)
    first, again = generate(eager, reference), generate(eager, reference)
    assert np.array_equal(first, again), "the eager path is deterministic here: its noise floor is 0"
    fast = load(checkpoint)
    accelerate(fast, compile="regional")  # fullgraph=True: a graph break in a block fails here
    assert hasattr(fast.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1, "to_qkv")
    compiled = generate(fast, reference)
    # Fusing and compiling reorder float sums: measured 5e-6 on [0, 1] here.
    assert np.abs(compiled - first).max() < 1e-4
    assert np.abs(compiled - generate(fast, reference, seeds=(4, 5, 6))).max() > 0.05, "the seeds still matter"


def test_an_image_is_the_same_whatever_else_is_in_its_batch(checkpoint, reference):
    pipe = load(checkpoint)
    batch = generate(pipe, reference)
    for index, (prompt, seed) in enumerate(zip(PROMPTS, (1, 2, 3))):
        alone = generate(pipe, reference, [prompt], (seed,))[0]
        assert np.abs(alone - batch[index]).max() < 1e-5
