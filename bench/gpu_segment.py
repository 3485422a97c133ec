"""Throughput of the CLIPSeg segmenter (``blipdiff.models.clipseg``) at real model size.

    python bench/gpu_segment.py                                   # CUDA, float16, batches 1 8 16 32 64
    python bench/gpu_segment.py --model /models/clipseg-rd64-refined  # a local checkpoint folder
    python bench/gpu_segment.py --device cpu --tiny --no-record   # smoke run: a tiny random model

The real weights are used when ``--model`` is a folder or a hub id already in the local Hugging Face
cache. Otherwise the script builds CIDAS/clipseg-rd64-refined with random weights from the
architecture written out below, straight on the device, with CLIPSeg's 352x352 input processing and a
placeholder tokenizer of CLIP's size (no merges, so a class name takes a token per letter: a few more
text tokens than the real tokenizer gives, a negligible share of the work).

Inputs are real DreamBench photos at full resolution (../shared): the processor's resize and the
upsampling of every map to its photo's own size count. Timing, peak memory and recording work as in
``bench/gpu_caption.py``, whose helpers this script uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from benchmark_record import record
from gpu_caption import (
    dtype_name,
    load_photos,
    machine,
    parse_throughput_args,
    placeholder_vocab,
    ready_model,
    resolve,
    sweep_batch_sizes,
    throughput_parser,
)

from blipdiff.models import DEFAULT_CLIPSEG

if TYPE_CHECKING:
    import torch
    from transformers import CLIPSegConfig, CLIPTokenizer

CLIP_VOCAB = 49408


def clip_tokenizer(size: int) -> CLIPTokenizer:
    """A CLIP-layout tokenizer: the 256 byte-level symbols, the same with the "</w>" word end,
    placeholders, and <|startoftext|> <|endoftext|> as the last two ids (49406 and 49407 for CLIP)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = ByteLevel.alphabet()
    first = {symbol: index for index, symbol in enumerate(symbols)}
    first.update({symbol + "</w>": len(symbols) + index for index, symbol in enumerate(symbols)})
    vocab = placeholder_vocab(size - 2, first)
    vocab.update({"<|startoftext|>": size - 2, "<|endoftext|>": size - 1})
    return CLIPTokenizer(vocab=vocab, merges=[])


def clipseg_config(tiny: bool, tokenizer: CLIPTokenizer) -> CLIPSegConfig:
    """CIDAS/clipseg-rd64-refined (CLIP ViT-B/16 and its text tower, a 64-wide decoder with the
    complex transposed convolution), or a tiny model of the same layout."""
    from transformers import CLIPSegConfig, CLIPSegTextConfig, CLIPSegVisionConfig

    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    if tiny:
        text = CLIPSegTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=77, **special)
        vision = CLIPSegVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=64, patch_size=16)
        return CLIPSegConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16,
                             extract_layers=[0, 1], reduce_dim=16, decoder_num_attention_heads=2,
                             decoder_intermediate_size=32, use_complex_transposed_convolution=True)
    text = CLIPSegTextConfig(vocab_size=CLIP_VOCAB, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", **special)
    vision = CLIPSegVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                 image_size=224, patch_size=16, hidden_act="quick_gelu")
    return CLIPSegConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=512,
                         extract_layers=[3, 6, 9], reduce_dim=64, decoder_num_attention_heads=4,
                         decoder_intermediate_size=2048, decoder_hidden_act="quick_gelu", conditional_layer=0,
                         use_complex_transposed_convolution=True)


def random_segmenter(tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """A ClipSegSegmenter over random weights built straight on ``device`` (``from_modules``)."""
    import torch
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor
    from transformers.image_utils import PILImageResampling

    from blipdiff.models.clipseg import ClipSegSegmenter

    tokenizer = clip_tokenizer(600 if tiny else CLIP_VOCAB)
    side = 64 if tiny else 352
    # The CIDAS checkpoints' preprocessing: a bilinear squash to 352x352, ImageNet statistics.
    image_processor = ViTImageProcessor(size={"height": side, "width": side}, resample=PILImageResampling.BILINEAR,
                                        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    with torch.device(device):
        network = CLIPSegForImageSegmentation._from_config(clipseg_config(tiny, tokenizer), dtype=dtype)
    processor = CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return ClipSegSegmenter.from_modules(network, processor)


def main() -> None:
    args = parse_throughput_args(throughput_parser(__doc__, DEFAULT_CLIPSEG, [1, 8, 16, 32, 64]))

    from blipdiff.models.clipseg import ClipSegSegmenter

    device, dtype = resolve(args.device, args.dtype)
    images, labels = load_photos(args.photos, args.pool)
    base, weights = ready_model(
        args, device, dtype,
        real=lambda: ClipSegSegmenter(model=args.model, device=str(device), dtype=dtype_name(dtype)),
        random=lambda: random_segmenter(args.tiny, device, dtype),
    )

    def run_for(batch_size: int) -> Callable:
        segmenter = ClipSegSegmenter.from_modules(base.network, base.processor, batch_size=batch_size)

        def run(batch: list, names: list[str]) -> None:
            segmenter.probabilities(batch, names, [(0.0, 1.0, 0.0, 1.0)] * len(batch))

        return run

    result = sweep_batch_sizes(run_for, images, labels, args, device)
    (first,) = base.probabilities(images[:1], labels[:1], [(0.0, 1.0, 0.0, 1.0)])
    print(f"first map: {first.shape} {first.dtype}, mean {first.mean():.3f} (photo {images[0].shape[:2]})")
    if not args.no_record:
        name = "tiny CLIPSeg" if args.tiny else "CLIPSeg rd64-refined"
        record(f"Segmentation throughput, {name}, {weights}", machine(device), [
            f"- setup: {dtype_name(dtype)} on {device}; the class name as prompt; maps upsampled to each photo's "
            f"size; {args.warmup} warm-up and {args.batches} timed batches per batch size; "
            f"{len(images)} DreamBench photos at full resolution",
        ], result)


if __name__ == "__main__":
    main()
