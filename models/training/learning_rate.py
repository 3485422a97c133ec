"""The learning rate a subject fine-tuning (``finetune``, ``dreambooth``) takes when none is given: it
depends on what trains.

- ``full`` (every U-Net weight): 5e-6, LAVIS's released BLIP-Diffusion recipe (the paper's appendix) and
  diffusers' DreamBooth example (``train_dreambooth.py``).
- ``lora`` (a low-rank adapter on the attention projections, ``lora_alpha`` = rank, B starting at zero):
  2e-4, within what diffusers' LoRA examples use (1e-4 in ``train_dreambooth_lora.py``'s README and
  ``train_text_to_image_lora.py``, 5e-4 the former's argument default). An adapter changes a weight by
  ``B @ A`` only: with Adam moving each entry of B by about lr a step, a projection's output moves far
  less per step than under a full update, so that at 5e-6 an adapter hardly trains (on an H200, 80 steps
  took the loss 1.12 -> 1.11, against 1.12 -> 0.07 in ``full``). Measured on the CPU with the tests'
  small random BLIP-Diffusion (rank 16, batch 2, 32x32, fp32), as the loss's fall below the untrained
  model's on the same samples (mean over the second half of the steps): over 20 steps, full at 5e-6
  0.0143; LoRA at 5e-6 0.0002, at 1e-4 0.0050, at 2e-4 0.0107; over 80 steps, full 0.057, LoRA at 1e-4
  0.029, at 2e-4 0.075. ``tests/test_finetune.py`` holds the 20-step measurement to "about as far".

A learning rate given explicitly is used as given, in either mode; the resolved one is what a run records.
"""

from __future__ import annotations

from typing import Any

DEFAULT_LR = {"full": 5e-6, "lora": 2e-4}


def fill_default_lr(data: Any) -> Any:
    """A configuration's input with ``lr`` set to its mode's default when missing or None (a pydantic
    ``mode="before"`` model validator)."""
    if isinstance(data, dict) and data.get("lr") is None:
        mode = data.get("mode", "full")
        return {**data, "lr": DEFAULT_LR.get(mode, DEFAULT_LR["full"]) if isinstance(mode, str) else DEFAULT_LR["full"]}
    return data
