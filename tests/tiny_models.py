"""Tiny random models for the tests: the package's (BLIP-Diffusion, DINO, CLIP: the demo uses them too)
and the data pipeline's captioner and segmenter, built the same way (see blipdiff.infra.demo.random_models).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from blipdiff.infra.demo.random_models import (  # noqa: F401  (re-exported for the tests)
    CORPUS,
    NUM_QUERY_TOKENS,
    SUBJECT_VOCAB,
    clip_tokenizer,
    save_tiny_blip_diffusion,
    save_tiny_clip,
    save_tiny_controlnet,
    save_tiny_dino,
    subject_tokenizer,
)


def opt_tokenizer() -> transformers.GPT2Tokenizer:
    """An OPT-style tokenizer: GPT-2 byte-level BPE trained on CORPUS, with OPT's special tokens
    ("</s>" as BOS and EOS, "<pad>") and BOS prepended, as facebook/opt-* does."""
    base = transformers.GPT2Tokenizer(
        vocab={"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}, merges=[], bos_token="</s>", eos_token="</s>",
        unk_token="</s>", pad_token="<pad>", add_bos_token=True)
    return base.train_new_from_iterator(CORPUS, vocab_size=400)


def save_tiny_clipseg(folder: Path) -> Path:
    """A random CLIPSeg with the real decoder layout (complex transposed convolution, patch 16), 64x64 input."""
    tokenizer = clip_tokenizer()
    image_processor = transformers.ViTImageProcessorPil(
        size={"height": 64, "width": 64}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    text = transformers.CLIPSegTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    vision = transformers.CLIPSegVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16)
    config = transformers.CLIPSegConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16, extract_layers=[0, 1],
        reduce_dim=16, decoder_num_attention_heads=2, decoder_intermediate_size=32,
        use_complex_transposed_convolution=True)
    torch.manual_seed(0)
    transformers.CLIPSegForImageSegmentation(config).save_pretrained(folder)
    transformers.CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_tiny_blip2(folder: Path) -> Path:
    """A random BLIP-2 OPT: 32x32 images, 4 query tokens, hidden sizes 32, two layers everywhere."""
    tokenizer = opt_tokenizer()
    # The processor adds the "<image>" token to the tokenizer; the model must know its id.
    processor = transformers.Blip2Processor(
        image_processor=transformers.BlipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    # BLIP-2's vision default initialiser (1e-10) would make every image look the same.
    vision = transformers.Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, initializer_range=0.02)
    qformer = transformers.Blip2QFormerConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        encoder_hidden_size=32, cross_attention_frequency=1, max_position_embeddings=32)
    text = transformers.OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
        max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = transformers.Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS, image_token_index=image_token)
    torch.manual_seed(0)
    transformers.Blip2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder

