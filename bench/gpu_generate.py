"""Throughput of BLIP-Diffusion generation (``blipdiff.models.blip_diffusion``) at real model size.

    python bench/gpu_generate.py                                  # CUDA, bf16: 50 and 100 steps, batches 1 4 8 16
    python bench/gpu_generate.py --compile                        # the U-Net under torch.compile
    python bench/gpu_generate.py --model /models/blipdiffusion    # a local checkpoint folder
    python bench/gpu_generate.py --device cpu --tiny --no-record --steps 2   # smoke run: a tiny random model

The real weights are used when ``--model`` is a folder or a hub id whose U-Net is already in the local
Hugging Face cache (``BlipDiffusionPipeline.from_pretrained``). Otherwise the script builds the released
checkpoint's architecture from the configurations written out below, with random weights, straight on
the device in the chosen dtype: the subject encoder (CLIP ViT-L/14 cut to 23 layers, the BERT-base
Q-Former, the projection), CLIP ViT-L's text encoder, and Stable Diffusion v1.5's U-Net and VAE, with
SD1.5's PNDM scheduler. The real vocabularies are not installed here, so both tokenizers are
placeholders of the real sizes: the CLIP one has no merges (a token per letter) and the WordPiece one
knows only the subject's words. Token ids do not change the cost; sequence lengths do, and they are
the real ones: the prompt is always truncated or padded to 61 tokens, plus the 16 subject tokens (77),
the negative prompt is padded to 77, and the subject text is "[CLS] subject [SEP]".

What is measured, in the chosen dtype (default bfloat16) with PyTorch's SDPA attention:
- subject-embedding latency: ``pipe.subject_embedding`` of one DreamBench photo at full resolution
  (preprocessing included), the mean of ``--embedding-calls`` calls after ``--warmup`` untimed ones,
  cycling through ``--pool`` photos;
- for every ``--steps`` and ``--batch-sizes``: images per second of the whole ``pipe(...)`` call (prompt
  encoding, guided denoising at scale 7.5, VAE decode, ``output_type="pt"``) with precomputed subject
  embeddings, as DreamBench runs it: prompts of 4 images each (fewer when the batch is not a multiple
  of 4); ``--warmup`` untimed calls, the first one's time reported (compilation, when ``--compile``),
  then ``--batches`` timed calls; peak GPU memory (``torch.cuda.max_memory_allocated``);
- the U-Net's share: CUDA events around every U-Net call (forward hooks), its achieved TFLOPS and that
  as a fraction of ``--peak-tflops`` (989: H100 SXM, bf16 dense). U-Net FLOPs are counted by
  ``torch.utils.flop_counter`` on a copy of the U-Net on the meta device (no memory, no compute) at the
  generated resolution: 803 GFLOPs per image per call for SD1.5 at 64x64 latents. The number of U-Net
  calls is counted too (PNDM with ``skip_prk_steps`` makes steps + 1); guidance doubles each call's batch.

The table is printed with the DreamBench projection (3,000 images at the largest batch, 100 steps)
and, unless ``--no-record``, appended to docs/benchmarks.md with the GPU's name. Shared options and
helpers come from ``bench/gpu_caption.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmark_record import record
from gpu_caption import (
    dtype_name,
    load_photos,
    machine,
    parse_throughput_args,
    placeholder_vocab,
    resolve,
    throughput_parser,
)
from gpu_segment import CLIP_VOCAB, clip_tokenizer

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import BertTokenizer, Blip2Config, CLIPTextConfig, CLIPTokenizer

    from blipdiff.models.blip_diffusion import BlipDiffusionPipeline

DEFAULT_MODEL = "Salesforce/blipdiffusion"
BERT_VOCAB = 30522  # bert-base-uncased; the Q-Former's 30523 adds "[DEC]"
DREAMBENCH_IMAGES = 3000
IMAGES_PER_PROMPT = 4  # DreamBench: 4 images for each of 25 prompts per subject
PROMPT = "in the jungle"  # a DreamBench prompt; its length does not matter (truncated or padded to 61 tokens)
GUIDANCE = 7.5
H100_BF16_TFLOPS = 989.0


# ---------------------------------------------------------------------------------- the architecture
@dataclass(frozen=True)
class Architecture:
    subject_encoder: Blip2Config
    text_encoder: CLIPTextConfig
    unet: dict[str, Any]
    vae: dict[str, Any]


def architecture(tiny: bool, prompt_tokenizer: CLIPTokenizer, subject_vocab: int) -> Architecture:
    """Salesforce/blipdiffusion's components (see FACTS "Model"), or a tiny model of the same layout."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, CLIPTextConfig

    specials = {"pad_token_id": prompt_tokenizer.pad_token_id, "bos_token_id": prompt_tokenizer.bos_token_id,
                "eos_token_id": prompt_tokenizer.eos_token_id}
    if tiny:
        vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
        qformer = Blip2QFormerConfig(vocab_size=subject_vocab, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32,
                                     cross_attention_frequency=1, max_position_embeddings=64)
        text = CLIPTextConfig(vocab_size=len(prompt_tokenizer), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                              hidden_act="quick_gelu", **specials)
        unet = dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, norm_num_groups=8)
        vae = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, sample_size=32)
        queries = 4
    else:
        # CLIP ViT-L/14 without its last layer, as BLIP-2 uses it; LAVIS trained it with eps 1e-5.
        vision = Blip2VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                   num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu",
                                   layer_norm_eps=1e-5)
        qformer = Blip2QFormerConfig(vocab_size=subject_vocab, hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
                                     cross_attention_frequency=1, encoder_hidden_size=1024, layer_norm_eps=1e-12)
        # Stable Diffusion v1.5's text encoder, U-Net and VAE.
        text = CLIPTextConfig(vocab_size=len(prompt_tokenizer), hidden_size=768, intermediate_size=3072,
                              num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                              hidden_act="quick_gelu", **specials)
        unet = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                    cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8,
                    norm_num_groups=32)
        vae = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32, sample_size=512)
        queries = 16
    subject = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), num_query_tokens=queries)
    unet.update(in_channels=4, out_channels=4)
    vae.update(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.18215)
    return Architecture(subject, text, unet, vae)


def subject_tokenizer(words: Sequence[str]) -> BertTokenizer:
    """A bert-base-uncased-sized WordPiece tokenizer that knows ``words`` (so each is one token, as in the
    real vocabulary), with "[DEC]" added after it, as the checkpoint loader does."""
    from transformers import BertTokenizer

    from blipdiff.models.blip_diffusion.checkpoint import DECODER_TOKEN

    first = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    for word in dict.fromkeys(word.lower() for word in words):
        first.setdefault(word, len(first))
    tokenizer = BertTokenizer(vocab=placeholder_vocab(BERT_VOCAB, first))
    tokenizer.add_special_tokens({"bos_token": DECODER_TOKEN})
    return tokenizer


@contextmanager
def default_placement(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """New parameters are made on ``device`` in ``dtype``: building 1.5B parameters in float32 on the CPU
    and converting them would take twice the memory and time."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def random_pipeline(tiny: bool, device: torch.device, dtype: torch.dtype, subject: str) -> BlipDiffusionPipeline:
    """The pipeline over random weights, built on ``device``, with placeholder tokenizers of the real sizes."""
    import diffusers

    from blipdiff.models.blip_diffusion import (BlipDiffusionPipeline, ContextCLIPTextModel, SubjectEncoder,
                                                SubjectImageProcessor)

    tokenizer = clip_tokenizer(600 if tiny else CLIP_VOCAB)
    words = subject_tokenizer(subject.split())
    arch = architecture(tiny, tokenizer, subject_vocab=len(words))
    side = arch.subject_encoder.vision_config.image_size
    with default_placement(device, dtype):
        modules = {"qformer": SubjectEncoder(arch.subject_encoder),
                   "text_encoder": ContextCLIPTextModel(arch.text_encoder),
                   "unet": diffusers.UNet2DConditionModel(**arch.unet), "vae": diffusers.AutoencoderKL(**arch.vae)}
    # Stable Diffusion v1.5's scheduler config.
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return BlipDiffusionPipeline(tokenizer=tokenizer, scheduler=scheduler, subject_tokenizer=words,
                                 image_processor=SubjectImageProcessor(height=side, width=side), ctx_begin_pos=2,
                                 **{name: module.eval() for name, module in modules.items()})


def cached_checkpoint(model: str) -> bool:
    """Whether ``model`` is a local folder, or a hub id whose index and U-Net weights are already in the
    local cache (nothing is fetched). ``gpu_caption.real_weights`` looks for a transformers layout."""
    from huggingface_hub import try_to_load_from_cache

    if Path(model).is_dir():
        return True
    return isinstance(try_to_load_from_cache(model, "model_index.json"), str) and any(
        isinstance(try_to_load_from_cache(model, f"unet/diffusion_pytorch_model.{suffix}"), str)
        for suffix in ("safetensors", "bin"))


def parameter_counts(pipe: BlipDiffusionPipeline) -> str:
    vision = pipe.qformer.visual_encoder
    counts = {"ViT": vision, "Q-Former with embeddings, queries and projection": pipe.qformer,
              "text encoder": pipe.text_encoder, "U-Net": pipe.unet, "VAE": pipe.vae}
    millions = {name: sum(p.numel() for p in module.parameters()) / 1e6 for name, module in counts.items()}
    millions["Q-Former with embeddings, queries and projection"] -= millions["ViT"]
    return ", ".join(f"{name} {value:.4g}M" for name, value in millions.items())


# ------------------------------------------------------------------------------------- measuring
def forward_gflops(model_class: type, config: Any, run: Callable[[Any], Any]) -> float:
    """GFLOPs of ``run(model)`` for a copy of the model built on the meta device from ``config`` (the
    inputs ``run`` makes land there too): shapes only, so it costs neither memory nor compute, and it
    counts whatever architecture the weights have."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = model_class.from_config(config)
        with FlopCounterMode(display=False) as counter:
            run(model)
    return counter.get_total_flops() / 1e9


class ForwardTimer:
    """Time spent inside a module's forward calls, summed: CUDA events recorded around each call (read
    after the caller synchronises, so timing never stalls the GPU's queue), plain clocks on the CPU.
    The hooks sit on the module the pipeline calls, so on a torch.compile wrapper they stay outside
    the compiled graph."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[Any, Any]] = []
        self._start: Any = None
        module.register_forward_pre_hook(lambda *_: self._mark_start())
        module.register_forward_hook(lambda *_: self.spans.append((self._start, self._now())))

    def _now(self) -> Any:
        import torch

        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _mark_start(self) -> None:
        self._start = self._now()

    def reset(self) -> None:
        self.spans.clear()

    @property
    def calls(self) -> int:
        return len(self.spans)

    def seconds(self) -> float:
        if self.cuda:
            return sum(start.elapsed_time(end) for start, end in self.spans) / 1000
        return sum(end - start for start, end in self.spans)


@dataclass(frozen=True)
class Generation:
    """One (steps, batch size) result; ``seconds`` is None when the batch did not fit in memory."""

    steps: int
    batch_size: int
    calls: int
    seconds: float | None = None
    first_call: float | None = None
    unet_seconds: float = 0.0
    unet_tflop: float = 0.0  # per timed call, guidance included
    peak_gib: float | None = None

    @property
    def images_per_second(self) -> float:
        return self.batch_size * self.calls / self.seconds if self.seconds else 0.0

    def row(self, peak_tflops: float | None) -> str:
        if self.seconds is None:
            return f"| {self.steps} | {self.batch_size} | out of memory | | | | | | |"
        per_call = self.seconds / self.calls
        unet_per_call = self.unet_seconds / self.calls
        achieved = self.unet_tflop / unet_per_call if unet_per_call else 0.0
        share = f"{achieved / peak_tflops:.0%}" if peak_tflops else "n/a (CPU)"
        first = "" if self.first_call is None else f"{self.first_call:.1f}"
        memory = "n/a (CPU)" if self.peak_gib is None else f"{self.peak_gib:.1f}"
        return (f"| {self.steps} | {self.batch_size} | {self.images_per_second:.2f} | {per_call:.2f} | "
                f"{unet_per_call / per_call:.0%} | {achieved:.3g} | {share} | {first} | {memory} |")


def table(results: Sequence[Generation], peak_tflops: float | None) -> str:
    lines = ["| steps | batch | images/s | s/batch | U-Net share of time | U-Net TFLOPS | of peak "
             "| first call (s) | peak GPU memory (GiB) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    return "\n".join(lines + [result.row(peak_tflops) for result in results])


def synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_generation(generate: Callable[[], Any], timer: ForwardTimer, steps: int, batch_size: int,
                       unet_gflop_per_image: float, warmup: int, calls: int, device: torch.device) -> Generation:
    """``warmup`` untimed calls of ``generate`` (the first one timed alone), then ``calls`` timed ones."""
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    first_call = None
    try:
        for index in range(warmup):
            started = time.perf_counter()
            generate()
            synchronize(device)
            if index == 0:
                first_call = time.perf_counter() - started
        timer.reset()
        started = time.perf_counter()
        for _ in range(calls):
            generate()
        synchronize(device)
        seconds = time.perf_counter() - started
    except torch.OutOfMemoryError:
        return Generation(steps, batch_size, calls)
    # Guidance runs every U-Net call on the unconditional and the conditional half at once.
    unet_tflop = timer.calls / calls * 2 * batch_size * unet_gflop_per_image / 1000
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return Generation(steps, batch_size, calls, seconds, first_call, timer.seconds(), unet_tflop, peak)


def time_subject_embedding(pipe: BlipDiffusionPipeline, photos: Sequence[np.ndarray], labels: Sequence[str],
                           warmup: int, calls: int, device: torch.device) -> float:
    """Mean seconds of one ``subject_embedding`` call on one photo, cycling through the photos."""
    for index in range(warmup):
        pipe.subject_embedding(photos[index % len(photos)], labels[index % len(labels)])
    synchronize(device)
    started = time.perf_counter()
    for index in range(warmup, warmup + calls):
        pipe.subject_embedding(photos[index % len(photos)], labels[index % len(labels)])
    synchronize(device)
    return (time.perf_counter() - started) / calls


def generation_call(pipe: BlipDiffusionPipeline, subject_embeds: torch.Tensor, subject: str, side: int, steps: int,
                    batch_size: int) -> Callable[[], Any]:
    """One ``pipe(...)`` call making ``batch_size`` images, grouped as DreamBench does: prompts of 4
    images each when the batch allows."""
    per_prompt = math.gcd(batch_size, IMAGES_PER_PROMPT)
    prompts = [PROMPT] * (batch_size // per_prompt)
    return lambda: pipe(prompts, target_subject_category=subject, subject_embeds=subject_embeds,
                        guidance_scale=GUIDANCE, height=side, width=side, num_inference_steps=steps,
                        num_images_per_prompt=per_prompt, output_type="pt")


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    # bfloat16 on every device: the goal is stated in bf16.
    parser = throughput_parser(__doc__, DEFAULT_MODEL, [1, 4, 8, 16], dtype="bfloat16")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100], help="guided PNDM steps")
    parser.add_argument("--embedding-calls", type=int, default=20, help="timed subject-embedding calls")
    parser.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="torch.compile the U-Net (MODE: default unless given)")
    parser.add_argument("--channels-last", action="store_true", help="U-Net and VAE in channels-last memory format")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS,
                        help="the GPU's dense peak in the chosen dtype (default: H100 SXM, bf16)")
    # A call at 100 steps and batch 16 takes seconds, so fewer calls suffice.
    parser.set_defaults(warmup=1, batches=3)
    args = parse_throughput_args(parser)
    if min(args.steps) < 1 or args.embedding_calls < 1 or args.pool < 1:
        parser.error("steps, --embedding-calls and --pool must be at least 1")

    import torch

    from blipdiff.models.blip_diffusion import BlipDiffusionPipeline

    device, dtype = resolve(args.device, args.dtype)
    photos, labels = load_photos(args.photos, args.pool)
    started = time.perf_counter()
    if not args.tiny and cached_checkpoint(args.model):
        pipe = BlipDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, device=device)
        weights = f"real weights ({args.model})"
    else:
        pipe = random_pipeline(args.tiny, device, dtype, " ".join(labels))
        weights = "random weights, " + ("tiny test layout" if args.tiny else "the real architecture")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    print(f"pipeline ready in {time.perf_counter() - started:.1f} s: {weights}, {device} ({gpu}), "
          f"{dtype_name(dtype)}", flush=True)
    parameters = parameter_counts(pipe)
    print(f"parameters: {parameters}", flush=True)
    pipe.set_progress_bar_config(disable=True)

    latent_side = pipe.unet.config.sample_size
    side = latent_side * pipe.vae_scale_factor
    context_length = pipe.text_encoder.config.max_position_embeddings
    unet_gflop = forward_gflops(type(pipe.unet), pipe.unet.config, lambda unet: unet(
        torch.empty(1, unet.config.in_channels, latent_side, latent_side), torch.tensor(999),
        encoder_hidden_states=torch.empty(1, context_length, unet.config.cross_attention_dim)))
    vae_gflop = forward_gflops(type(pipe.vae), pipe.vae.config, lambda vae: vae.decode(
        torch.empty(1, vae.config.latent_channels, latent_side, latent_side)))
    flops = (f"one U-Net forward at {latent_side}x{latent_side} latents {unet_gflop:,.4g} GFLOPs, "
             f"one VAE decode at {side}x{side} {vae_gflop:,.4g} GFLOPs (per image)")
    print(flops, flush=True)

    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if args.compile:
        # One graph per batch size: dynamic shapes would give every batch slower, generic kernels.
        pipe.unet = torch.compile(pipe.unet, mode=args.compile, dynamic=False)
    timer = ForwardTimer(pipe.unet, device)

    embedding_seconds = time_subject_embedding(pipe, photos, labels, args.warmup, args.embedding_calls, device)
    print(f"subject embedding: {embedding_seconds * 1000:.1f} ms per photo (mean of {args.embedding_calls})",
          flush=True)
    subject_embeds = pipe.subject_embedding(photos[0], labels[0])

    peak_tflops = args.peak_tflops if device.type == "cuda" else None
    results = []
    for steps in args.steps:
        for batch_size in args.batch_sizes:
            generate = generation_call(pipe, subject_embeds, labels[0], side, steps, batch_size)
            result = measure_generation(generate, timer, steps, batch_size, unet_gflop, args.warmup, args.batches,
                                        device)
            results.append(result)
            print(result.row(peak_tflops), flush=True)
    result_table = table(results, peak_tflops)
    print(result_table)

    fitted = [result for result in results if result.seconds is not None]
    projection = ""
    if fitted:
        most_steps = 100 if any(result.steps == 100 for result in fitted) else max(result.steps for result in fitted)
        best = max((result for result in fitted if result.steps == most_steps), key=lambda result: result.batch_size)
        minutes = DREAMBENCH_IMAGES / best.images_per_second / 60
        projection = (f"DreamBench's {DREAMBENCH_IMAGES:,} images at {most_steps} steps, batch {best.batch_size}: "
                      f"{minutes:.1f} min")
        print(projection)
    if not args.no_record:
        name = "tiny BLIP-Diffusion" if args.tiny else "BLIP-Diffusion"
        options = ", ".join(filter(None, [f"torch.compile mode {args.compile}" if args.compile else "",
                                          "channels-last" if args.channels_last else ""])) or "eager"
        record(f"Generation throughput, {name}, {weights}", machine(device), [
            f"- setup: {dtype_name(dtype)} on {device} ({gpu}), SDPA attention, {options}; PNDM, guidance "
            f"{GUIDANCE}, {side}x{side}, prompts of up to {IMAGES_PER_PROMPT} images, precomputed subject "
            f"embeddings; {args.warmup} warm-up and {args.batches} timed calls per row; peak taken as "
            f"{args.peak_tflops:g} TFLOPS",
            f"- parameters: {parameters}",
            f"- FLOPs: {flops}",
            f"- subject embedding: {embedding_seconds * 1000:.1f} ms per photo (one DreamBench photo at full "
            f"resolution, preprocessing included)",
            *([f"- projection: {projection}"] if projection else []),
        ], result_table)


if __name__ == "__main__":
    main()
