"""Throughput of the BLIP-2 OPT-6.7b captioner (``blipdiff.models.captioners``) at real model size.

    python bench/gpu_caption.py                                   # CUDA, float16, batches 1 4 8 16 32
    python bench/gpu_caption.py --batch-sizes 8 16 --num-captions 48   # the authors' sampled variant
    python bench/gpu_caption.py --model /models/blip2-opt-6.7b    # a local checkpoint folder
    python bench/gpu_caption.py --device cpu --tiny --no-record   # smoke run: a tiny random model

The real weights are used when ``--model`` is a folder or a hub id already in the local Hugging Face
cache. Otherwise the script builds BLIP-2 OPT-6.7b with random weights from the architecture written
out below, straight on the device, with a placeholder tokenizer of OPT's size. Random weights never
emit end-of-sequence, so every caption then runs the full ``--max-new-tokens``: an upper bound on the
cost of real captions, which stop earlier.

Inputs are real DreamBench photos at full resolution (../shared), so the processor's resize counts.
Each batch size runs ``--warmup`` batches, then ``--batches`` timed ones between
``torch.cuda.synchronize()`` calls; peak GPU memory is ``torch.cuda.max_memory_allocated``. The table
is printed and, unless ``--no-record``, appended to docs/benchmarks.md once every batch size has run.
``bench/gpu_segment.py`` shares the helpers here.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from benchmark_record import ROOT, host, record
from PIL import Image

from blipdiff.models import DEFAULT_BLIP2

if TYPE_CHECKING:
    import torch
    from transformers import Blip2Config, GPT2Tokenizer

DREAMBENCH = ROOT.parent / "shared" / "data" / "dreambench" / "dataset"
OPT_VOCAB = 50272
OPT_TOKENS = 50265  # facebook/opt-*: the tokenizer's size; "<image>" comes next, as in the hub checkpoints.


@dataclass(frozen=True)
class Measurement:
    """One batch size's result; ``seconds`` is None when the batch did not fit in memory."""

    batch_size: int
    batches: int
    seconds: float | None
    peak_gib: float | None

    def row(self) -> str:
        if self.seconds is None:
            return f"| {self.batch_size} | out of memory | | |"
        per_batch = self.seconds / self.batches
        peak = "n/a (CPU)" if self.peak_gib is None else f"{self.peak_gib:.1f}"
        return f"| {self.batch_size} | {self.batch_size / per_batch:.2f} | {per_batch:.3f} | {peak} |"


def table(measurements: Sequence[Measurement]) -> str:
    lines = ["| batch | images/s | s/batch | peak GPU memory (GiB) |", "| ---: | ---: | ---: | ---: |"]
    return "\n".join(lines + [m.row() for m in measurements])


def load_photos(folder: Path, count: int) -> tuple[list[np.ndarray], list[str]]:
    """Up to ``count`` DreamBench photos (every subject's first, then every second, ...) at full
    resolution, and each one's class name (the subject folder's name, "bear_plushie" as "bear plushie")."""
    subjects = sorted(path for path in folder.iterdir() if path.is_dir()) if folder.is_dir() else []
    per_subject = [sorted(subject.glob("*.jpg")) for subject in subjects]
    ordered = [paths[rank] for rank in range(max(map(len, per_subject), default=0))
               for paths in per_subject if rank < len(paths)]
    if not ordered:
        sys.exit(f"no DreamBench photos (<subject>/NN.jpg) under {folder}: pass --photos")
    images, labels = [], []
    for path in ordered[:count]:
        with Image.open(path) as photo:
            images.append(np.asarray(photo.convert("RGB")))
        labels.append(path.parent.name.replace("_", " "))
    return images, labels


def resolve(device_name: str, dtype_name: str | None) -> tuple[torch.device, torch.dtype]:
    """The device, and the dtype: as given, else float16 on CUDA and float32 on the CPU."""
    import torch

    from blipdiff.models.devices import torch_dtype

    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available here: pass --device cpu (with --tiny for a quick smoke run)")
    return device, torch_dtype(dtype_name, device)


def measure(run: Callable[[list[np.ndarray], list[str]], Any], images: Sequence[np.ndarray],
            labels: Sequence[str], batch_size: int, warmup: int, batches: int, device: torch.device) -> Measurement:
    """Time ``batches`` calls of ``run`` on ``batch_size`` photos (cycling through the pool) after
    ``warmup`` untimed ones."""
    import torch

    cuda = device.type == "cuda"

    def batch(index: int) -> tuple[list[np.ndarray], list[str]]:
        picked = [(index * batch_size + k) % len(images) for k in range(batch_size)]
        return [images[i] for i in picked], [labels[i] for i in picked]

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for index in range(warmup):
            run(*batch(index))
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for index in range(warmup, warmup + batches):
            run(*batch(index))
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    except torch.OutOfMemoryError:
        return Measurement(batch_size, batches, None, None)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return Measurement(batch_size, batches, seconds, peak)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def machine(device: torch.device) -> str:
    """The accelerator (or CPU), the host, and library versions."""
    import torch
    import transformers

    description = host()
    if device.type == "cuda":
        gpu = torch.cuda.get_device_properties(device)
        description = f"{gpu.name} ({gpu.total_memory / 2**30:.0f} GiB), {description}"
    return f"{description}, torch {torch.__version__}, transformers {transformers.__version__}"


def placeholder_vocab(size: int, first: dict[str, int]) -> dict[str, int]:
    """``first`` and then filler tokens up to ``size`` entries: random weights make text meaningless,
    so the vocabulary only has to cover every id the model can emit, at the real size."""
    vocab = dict(first)
    vocab.update({f"tok{index}": index for index in range(len(vocab), size)})
    return vocab


def opt_tokenizer(size: int) -> GPT2Tokenizer:
    """An OPT-layout tokenizer: <s> <pad> </s> <unk>, the 256 byte-level symbols, placeholders."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import GPT2Tokenizer

    first = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    first.update({symbol: 4 + index for index, symbol in enumerate(ByteLevel.alphabet())})
    return GPT2Tokenizer(vocab=placeholder_vocab(size, first), merges=[], bos_token="</s>", eos_token="</s>",
                         unk_token="</s>", pad_token="<pad>", add_bos_token=True)


def blip2_config(tiny: bool, image_token: int) -> Blip2Config:
    """BLIP-2 OPT-6.7b (Salesforce/blip2-opt-6.7b), or a tiny model of the same layout."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    if tiny:
        vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=8, initializer_range=0.02)
        qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     encoder_hidden_size=32, cross_attention_frequency=2, vocab_size=64)
        text = OPTConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                         max_position_embeddings=128, word_embed_proj_dim=32)
        queries = 4
    else:
        # EVA ViT-g/14 without its last layer, as BLIP-2 uses it.
        vision = Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                   num_attention_heads=16, image_size=224, patch_size=14, layer_norm_eps=1e-6)
        qformer = Blip2QFormerConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, max_position_embeddings=512, cross_attention_frequency=2,
                                     encoder_hidden_size=1408)
        text = OPTConfig(vocab_size=OPT_VOCAB, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         ffn_dim=16384, max_position_embeddings=2048, word_embed_proj_dim=4096,
                         do_layer_norm_before=True, activation_function="relu", enable_bias=True,
                         pad_token_id=1, bos_token_id=2, eos_token_id=2)
        queries = 32
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                       num_query_tokens=queries, image_token_index=image_token)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def real_weights(model: str) -> bool:
    """Whether ``model`` is a local folder or a hub id whose weights are already in the local cache
    (nothing is fetched; a cached config alone does not count)."""
    from huggingface_hub import try_to_load_from_cache

    if Path(model).is_dir():
        return True
    return isinstance(try_to_load_from_cache(model, "config.json"), str) and any(
        isinstance(try_to_load_from_cache(model, name), str) for name in WEIGHT_FILES)


def random_captioner(tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """A Blip2Captioner over random weights built straight on ``device`` (``from_modules``)."""
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    from blipdiff.models.captioners import Blip2Captioner

    tokenizer = opt_tokenizer(OPT_TOKENS if not tiny else 500)
    side = 32 if tiny else 224
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": side, "width": side}),
                               tokenizer=tokenizer, num_query_tokens=4 if tiny else 32)
    config = blip2_config(tiny, image_token=tokenizer.convert_tokens_to_ids("<image>"))
    with torch.device(device):
        network = Blip2ForConditionalGeneration._from_config(config, dtype=dtype)
    if dtype == torch.float16:
        # As from_pretrained does: the Q-Former and its queries stay in float32 under float16.
        network.qformer.float()
        network.query_tokens.data = network.query_tokens.data.float()
    # Random weights would stop at arbitrary points; without an end token every caption runs to
    # max_new_tokens, so every batch costs the same.
    network.generation_config.eos_token_id = None
    network.language_model.generation_config.eos_token_id = None
    return Blip2Captioner.from_modules(network, processor)


def throughput_parser(doc: str, model: str, batch_sizes: list[int],
                      dtype: str | None = None) -> argparse.ArgumentParser:
    """The options every model-throughput benchmark shares; ``dtype`` None: float16 on CUDA, float32 on the CPU."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=model, help="hub id or folder of real weights")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke run, e.g. on the CPU)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=dtype,
                        help=f"default: {dtype}" if dtype else "default: float16 on CUDA, float32 on the CPU")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=batch_sizes)
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per batch size")
    parser.add_argument("--batches", type=int, default=5, help="timed batches per batch size")
    parser.add_argument("--pool", type=int, default=32, help="distinct photos to cycle through")
    parser.add_argument("--photos", type=Path, default=DREAMBENCH, help="DreamBench dataset folder")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/benchmarks.md")
    return parser


def parse_throughput_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if min(args.batch_sizes) < 1 or args.batches < 1 or args.warmup < 0:
        parser.error("batch sizes and --batches must be at least 1, --warmup at least 0")
    return args


def ready_model(args: argparse.Namespace, device: Any, dtype: Any, real: Callable[[], Any],
                random: Callable[[], Any]) -> tuple[Any, str]:
    """The real weights when they are on disk (and not --tiny), else random ones; and which it is."""
    started = time.perf_counter()
    if not args.tiny and real_weights(args.model):
        base, weights = real(), f"real weights ({args.model})"
    else:
        base = random()
        weights = "random weights, " + ("tiny test layout" if args.tiny else "the real architecture")
    print(f"model ready in {time.perf_counter() - started:.1f} s: {weights}, {device}, {dtype_name(dtype)}",
          flush=True)
    return base, weights


def sweep_batch_sizes(run_for: Callable[[int], Callable], images: list, labels: list[str],
                      args: argparse.Namespace, device: Any) -> str:
    """Measure ``run_for(batch_size)`` at every batch size; the markdown table of the results."""
    measurements = []
    for batch_size in args.batch_sizes:
        measurement = measure(run_for(batch_size), images, labels, batch_size, args.warmup, args.batches, device)
        measurements.append(measurement)
        print(measurement.row(), flush=True)
    result = table(measurements)
    print(result)
    return result


def main() -> None:
    parser = throughput_parser(__doc__, DEFAULT_BLIP2, [1, 4, 8, 16, 32])
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--num-captions", type=int, default=1, help="more than 1: the sampled variant")
    args = parse_throughput_args(parser)

    from blipdiff.models.captioners import Blip2Captioner

    device, dtype = resolve(args.device, args.dtype)
    images, labels = load_photos(args.photos, args.pool)
    base, weights = ready_model(
        args, device, dtype, real=lambda: Blip2Captioner(model=args.model, device=str(device), dtype=dtype_name(dtype)),
        random=lambda: random_captioner(args.tiny, device, dtype),
    )

    def run_for(batch_size: int) -> Callable:
        return Blip2Captioner.from_modules(base.network, base.processor, batch_size=batch_size,
                                           max_new_tokens=args.max_new_tokens, num_captions=args.num_captions,
                                           min_length=min(5, args.max_new_tokens)).caption

    mode = "greedy" if args.num_captions == 1 else f"{args.num_captions} nucleus-sampled captions per image"
    result = sweep_batch_sizes(run_for, images, labels, args, device)
    print(f"first caption: {base.caption(images[:1], labels[:1])[0].caption!r}")
    if not args.no_record:
        name = "tiny BLIP-2" if args.tiny else "BLIP-2 OPT-6.7b"
        length = "natural length" if weights.startswith("real") else "always the full length (no end token)"
        record(f"Captioning throughput, {name}, {mode}, {weights}", machine(device), [
            f"- setup: {dtype_name(dtype)} on {device}; up to {args.max_new_tokens} new tokens, {length}; "
            f"{args.warmup} warm-up and {args.batches} timed batches per batch size; "
            f"{len(images)} DreamBench photos at full resolution",
        ], result)


if __name__ == "__main__":
    main()
