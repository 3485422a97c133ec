"""Sampling choices that the pipelines and the commands share, light to import (no torch): the schedulers a
command may pick, and the editing method's defaults."""

from __future__ import annotations

# The commands' scheduler names, as diffusers' classes.
SCHEDULERS = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler"}
CROSS_REPLACE_STEPS = 0.8  # Prompt-to-Prompt's default share of steps with shared attention maps
MASK_THRESHOLD = 0.3  # Prompt-to-Prompt's LocalBlend threshold on max-normalised maps


def set_scheduler(pipe, name: str) -> None:
    """Replace ``pipe``'s scheduler by the one ``name`` picks, on the same noise schedule."""
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
