"""The optimiser both training loops use: AdamW with decay on weight matrices only (as LAVIS groups them:
no decay on biases, norms or embeddings-as-vectors)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw(parameters: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          undecayed: Iterable[torch.nn.Parameter] = (), fused: bool = False) -> torch.optim.AdamW:
    """``parameters`` with requires_grad, decayed when they have two or more dimensions; ``undecayed``
    (a trained subject embedding, say) never. ``fused`` is for CUDA."""
    trained = [parameter for parameter in parameters if parameter.requires_grad]
    return torch.optim.AdamW([
        {"params": [p for p in trained if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trained if p.ndim < 2] + list(undecayed), "weight_decay": 0.0}],
        lr=lr, betas=betas, eps=eps, fused=fused)
