"""BLIP-Diffusion's context text encoder: CLIP's text transformer with subject embeddings spliced in.

The checkpoint's ``text_encoder`` has transformers 4.x ``CLIPTextModel``'s state-dict names
(``text_model.*``). The subject embeddings are *inserted* (not substituted) after ``ctx_begin_pos``
prompt tokens; positions then run 0.. over the spliced sequence, and a causal mask covers all of it,
the subject tokens included. transformers 5's ``CLIPTextTransformer`` builds its causal mask itself and
its ``CLIPEncoder`` ignores a ``causal_attention_mask`` argument, so a port that passes one silently
becomes bidirectional: here the causal mask is built explicitly and given as the attention mask.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextConfig
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPTextEmbeddings


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, 1, L, L] additive mask: position i sees positions 0..i."""
    blocked = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(length, length, dtype=dtype, device=device).masked_fill(
        blocked, torch.finfo(dtype).min)[None, None]


def splice(token_embeds: torch.Tensor, subject_embeds: torch.Tensor, begin: int | torch.Tensor) -> torch.Tensor:
    """Insert ``subject_embeds`` [B, Q, D] after the first ``begin`` tokens of ``token_embeds`` [B, T, D];
    ``begin`` is one position for every row, or a [B] tensor of one per row (pre-training inserts the
    subject just before each caption's end token)."""
    subject_embeds = subject_embeds.to(token_embeds.dtype)
    if isinstance(begin, int):
        return torch.cat([token_embeds[:, :begin], subject_embeds, token_embeds[:, begin:]], dim=1)
    tokens, queries = token_embeds.shape[1], subject_embeds.shape[1]
    # Output position j of row b reads token j before begin[b], subject j - begin[b] inside the
    # inserted span, token j - Q after it; tokens and subject are gathered from one concatenation.
    position = torch.arange(tokens + queries, device=token_embeds.device)[None]
    start = begin.to(token_embeds.device)[:, None]
    inside = (position >= start) & (position < start + queries)
    source = torch.where(position < start, position, torch.where(inside, tokens + position - start, position - queries))
    both = torch.cat([token_embeds, subject_embeds], dim=1)
    return both.gather(1, source[..., None].expand(-1, -1, both.shape[2]))


class ContextTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, subject_embeds: torch.Tensor | None = None,
                ctx_begin_pos: int | torch.Tensor = 2) -> torch.Tensor:
        tokens = self.embeddings.token_embedding(input_ids)
        if subject_embeds is not None:
            tokens = splice(tokens, subject_embeds, ctx_begin_pos)
        hidden = self.embeddings(inputs_embeds=tokens)
        mask = causal_mask(hidden.shape[1], hidden.dtype, hidden.device)
        return self.final_layer_norm(self.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state)


class ContextCLIPTextModel(nn.Module):
    """The ``text_encoder`` component: prompt token ids [B, T] and subject embeddings [B, Q, D] → the
    U-Net's context [B, T + Q, D] (without subject embeddings: [B, T, D], as for the negative prompt)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        if config._attn_implementation is None:
            config._attn_implementation = "sdpa"
        self.config = config
        self.text_model = ContextTextTransformer(config)

    def forward(self, input_ids: torch.Tensor, subject_embeds: torch.Tensor | None = None,
                ctx_begin_pos: int | torch.Tensor = 2) -> torch.Tensor:
        """``ctx_begin_pos``: where the subject goes, one position for all rows or a [B] tensor."""
        return self.text_model(input_ids, subject_embeds, ctx_begin_pos)
