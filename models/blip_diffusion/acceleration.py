"""Faster generation with what PyTorch and diffusers already provide, for a pipeline about to make many
images (an evaluation, a batch job): Q, K and V as one GEMM (diffusers' ``fuse_qkv_projections``), the
U-Net and VAE in channels-last memory, and ``torch.compile`` of the U-Net, either regionally (diffusers'
``compile_repeated_blocks``: the transformer block is compiled once and reused, so the first image waits
seconds, not minutes) or whole.

Both compiled forms use ``fullgraph=True``: a graph break in the U-Net step is an error, not a silent
slowdown. The images stay those of the eager pipeline within floating-point reordering (the tests measure
it on the CPU; ``bench/`` on a GPU). The attention processors are replaced, so call this after anything
that sets processors of its own, and not before ``pipe.edit`` (editing records attention maps).
"""

from __future__ import annotations

from typing import Literal

import torch

Compile = Literal["off", "regional", "full"]


def accelerate(pipe, *, compile: Compile = "regional", fuse_qkv: bool = True, channels_last: bool = True,
               mode: str | None = None) -> None:
    """Make ``pipe`` (a BLIP-Diffusion pipeline, with or without ControlNet) faster in place. ``mode`` is
    ``torch.compile``'s (None, "max-autotune-no-cudagraphs", "reduce-overhead", ...)."""
    if compile not in ("off", "regional", "full"):
        raise ValueError(f"compile must be off, regional or full, not {compile!r}")
    if fuse_qkv:
        pipe.unet.fuse_qkv_projections()
        pipe.vae.fuse_qkv_projections()
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile == "regional":
        pipe.unet.compile_repeated_blocks(fullgraph=True, mode=mode)
    elif compile == "full":
        pipe.unet.compile(fullgraph=True, mode=mode)
