"""BLIP-Diffusion's subject encoder: the BLIP-2 vision tower, the Q-Former with text input, the projection.

The released checkpoint's ``qformer`` component holds all three under the names written here (see
FACTS "Model"). transformers' own BLIP-2 classes cannot load it: their vision tower has a top-level
layer norm instead of ``pre_layernorm``/``post_layernorm`` and a biased patch convolution, and their
Q-Former has no text input. The transformer blocks themselves are transformers' (``Blip2Encoder`` for
the ViT, ``Blip2QFormerEncoder`` for the Q-Former, with its separate query and text feed-forwards),
so attention runs through transformers' SDPA kernels; only the embeddings, the projection and the
wiring between them are written here.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig
from transformers.activations import QuickGELUActivation
from transformers.models.blip_2.modeling_blip_2 import Blip2Encoder, Blip2QFormerEncoder


def _additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] 1/0 mask → [B, 1, 1, L] additive mask: 0 where kept, the dtype's minimum where padded."""
    return (1.0 - keep[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class VisionEmbeddings(nn.Module):
    """Class token, patch embeddings (a convolution without bias) and learned positions."""

    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        dim = config.hidden_size
        positions = (config.image_size // config.patch_size) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(1, positions, dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_embedding.expand(patches.shape[0], 1, -1).to(dtype), patches], dim=1)
        return tokens + self.position_embedding[:, : tokens.shape[1]].to(dtype)


class VisionTower(nn.Module):
    """CLIP ViT-L/14 cut to 23 layers, as BLIP-2 uses it; ``post_layernorm`` is BLIP-2's ``ln_vision`` and
    applies to every token, since the Q-Former attends to all of them."""

    def __init__(self, config: Blip2VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Blip2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.pre_layernorm(self.embeddings(pixel_values))
        return self.post_layernorm(self.encoder(inputs_embeds=hidden).last_hidden_state)


class QueryAndTextEmbeddings(nn.Module):
    """The learned query tokens followed by the subject text's word and position embeddings (positions
    count from 0 at the text's first token), then LayerNorm and dropout over the whole sequence."""

    def __init__(self, config: Blip2QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)))

    def forward(self, input_ids: torch.Tensor, query_tokens: torch.Tensor) -> torch.Tensor:
        text = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:, : input_ids.shape[1]])
        queries = query_tokens.expand(input_ids.shape[0], -1, -1)
        return self.dropout(self.LayerNorm(torch.cat([queries, text], dim=1).to(query_tokens.dtype)))


class Projection(nn.Module):
    """Pre-LayerNorm residual MLP: ``x + dropout(dense2(QuickGELU(dense1(LayerNorm(x)))))``, no norm after."""

    def __init__(self, dim: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.dense1 = nn.Linear(dim, hidden)
        self.act_fn = QuickGELUActivation()
        self.dense2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.dense2(self.act_fn(self.dense1(self.LayerNorm(x)))))


def prepare_config(config: Blip2Config, attn_implementation: str = "sdpa") -> Blip2Config:
    """The checkpoint's config with what this architecture always has: text input to every Q-Former
    layer (the text feed-forward), and transformers' attention kernel chosen for both towers."""
    config.qformer_config.use_qformer_text_input = True
    for sub in (config, config.vision_config, config.qformer_config):
        sub._attn_implementation = attn_implementation
    return config


class SubjectEncoder(nn.Module):
    """The ``qformer`` component: (reference images, subject text) → ``[B, num_query_tokens, hidden]``
    subject embeddings, the multimodal representation the context text encoder splices into prompts."""

    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = prepare_config(config, config._attn_implementation or "sdpa")
        qformer = config.qformer_config
        self.embeddings = QueryAndTextEmbeddings(qformer)
        self.visual_encoder = VisionTower(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer.hidden_size))
        # LAVIS's projection drops out 0.1, the Q-Former's (BERT's) hidden dropout: it follows the config.
        self.proj_layer = Projection(qformer.hidden_size, qformer.hidden_size * 4, eps=qformer.layer_norm_eps,
                                     dropout=qformer.hidden_dropout_prob)
        self.encoder = Blip2QFormerEncoder(qformer)

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``pixel_values`` [B, 3, H, W] normalised images and ``input_ids`` [B, T] subject text (``[CLS] text
        [SEP]``, padded where ``attention_mask`` is 0) → [B, num_query_tokens, hidden]."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_tokens = self.visual_encoder(pixel_values)
        hidden = self.embeddings(input_ids, self.query_tokens)
        queries = self.num_query_tokens
        keep = torch.cat([attention_mask.new_ones(input_ids.shape[0], queries), attention_mask], dim=1)
        hidden = self.encoder(
            hidden, attention_mask=_additive_mask(keep, hidden.dtype), encoder_hidden_states=image_tokens,
            query_length=queries).last_hidden_state
        return self.proj_layer(hidden[:, :queries])
