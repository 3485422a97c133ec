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

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmark_record import record
from gpu_caption import (
    DREAMBENCH,
    dtype_name,
    load_photos,
    machine,
    measure,
    placeholder_vocab,
    real_weights,
    resolve,
    table,
)

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


def random_segmenter(tiny: bool, device: torch.device, dtype: torch.dtype, batch_size: int) -> Any:
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
    return ClipSegSegmenter.from_modules(network, processor, batch_size=batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="CIDAS/clipseg-rd64-refined", help="hub id or folder of real weights")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke run, e.g. on the CPU)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                        help="default: float16 on CUDA, float32 on the CPU")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per batch size")
    parser.add_argument("--batches", type=int, default=5, help="timed batches per batch size")
    parser.add_argument("--pool", type=int, default=32, help="distinct photos to cycle through")
    parser.add_argument("--photos", type=Path, default=DREAMBENCH, help="DreamBench dataset folder")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/benchmarks.md")
    args = parser.parse_args()
    if min(args.batch_sizes) < 1 or args.batches < 1 or args.warmup < 0:
        parser.error("batch sizes and --batches must be at least 1, --warmup at least 0")

    from blipdiff.models.clipseg import ClipSegSegmenter

    device, dtype = resolve(args.device, args.dtype)
    images, labels = load_photos(args.photos, args.pool)
    started = time.perf_counter()
    if not args.tiny and real_weights(args.model):
        base = ClipSegSegmenter(model=args.model, device=str(device), dtype=dtype_name(dtype))
        weights = f"real weights ({args.model})"
    else:
        base = random_segmenter(args.tiny, device, dtype, batch_size=1)
        weights = "random weights, " + ("tiny test layout" if args.tiny else "the real architecture")
    print(f"model ready in {time.perf_counter() - started:.1f} s: {weights}, {device}, {dtype_name(dtype)}",
          flush=True)

    measurements = []
    for batch_size in args.batch_sizes:
        segmenter = ClipSegSegmenter.from_modules(base.network, base.processor, batch_size=batch_size)

        def run(batch: list, names: list[str], segmenter: ClipSegSegmenter = segmenter) -> None:
            segmenter.probabilities(batch, names, [(0.0, 1.0, 0.0, 1.0)] * len(batch))

        measurement = measure(run, images, labels, batch_size, args.warmup, args.batches, device)
        measurements.append(measurement)
        print(measurement.row(), flush=True)
    result = table(measurements)
    print(result)
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
