"""``blipdiff dreambooth``: DreamBooth (Ruiz et al., 2023) on Stable Diffusion, the baseline the paper
measures BLIP-Diffusion against, on Ray Train like ``pretrain``.

As the DreamBooth paper describes it: the subject's photos are labelled "a [identifier] [class noun]"
with a rare-token identifier ("sks"); the class-specific prior-preservation loss supervises the model with
its own samples of "a [class noun]" (weight λ = ``prior_loss_weight``, 1), generated once by the base
model and cached per (base model, class noun, count, seed, sampling settings) so that subjects of one
class share them; the U-Net (and with ``train_text_encoder`` the text encoder) is fine-tuned. The
defaults are diffusers' DreamBooth recipe for Stable Diffusion: 800 steps with prior preservation (on by
default; ``prior_preservation=False`` turns it off) and 200 class images, lr 5e-6 constant (2e-4 for
LoRA adapters, ``learning_rate``), batch 1, AdamW with weight decay 0.01, gradients clipped to a norm of
1.0 (``max_grad_norm``). Where this differs from that recipe: the photos are centre-cropped (diffusers
crops at random unless told ``--center_crop``) so that their latents are encoded once, and weight decay
spares biases and norms (the optimiser BLIP-Diffusion's fine-tuning uses, so that the two methods differ
in what they are rather than in such details). Where the paper differs: it fine-tuned Imagen (and its
super-resolution stage) for about 200 epochs (200 × N steps for N photos) at lr 1e-5, with about 200 × N
class samples, and its identifiers are rare tokens of T5's vocabulary.

Every step draws ``batch_size`` instance samples (and as many class samples with prior preservation) per
worker: each photo's latents (Resize + CenterCrop to ``resolution``, encoded once by the frozen VAE,
sampled from their distribution), noise and a timestep on the base model's DDPM schedule; the loss is
the instance MSE plus λ times the class MSE of the predicted noise. With several workers the gradients
are averaged across workers (all-reduce), as ``pretrain``'s DDP does, then clipped to a total norm of
``max_grad_norm``.

Checkpoints (``OUT/checkpoints/step-NNNNNN``: the trained weights, the optimiser and every worker's random
state) are written every ``checkpoint_every`` steps; a rerun, or a worker group that Ray restarts after a
failure, resumes from the newest. The subject checkpoint (``models.dreambooth``'s layout) is written to
OUT at the end, ``dreambooth.json`` last.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from blipdiff.infra.atomic import TEMP_PREFIX, atomic_folder, atomic_path, write_json_atomic
from blipdiff.models.dreambooth import (LORA_WEIGHTS, RECORD_FILE, TEXT_ENCODER_FOLDER, TEXT_ENCODER_LORA,
                                        TEXT_LORA_TARGETS, UNET_FOLDER, UNET_LORA, UNET_LORA_TARGETS, class_prompt,
                                        instance_prompt)
from blipdiff.infra.inputs import Identifier, ImageSide, SubjectText, find_photos, model_location
from blipdiff.models.training.learning_rate import fill_default_lr
from blipdiff.models.devices import AUTO, resolve_device, torch_dtype

CHECKPOINTS = "checkpoints"
SETTINGS_FILE = "run.json"
CLASS_RECORD = "class.json"
# What a run's weights do not depend on: changing them resumes the same run.
NOT_TRAJECTORY = {"out", "steps", "checkpoint_every", "workers_for_class_images", "max_failures", "gpus_per_worker",
                  "class_images"}  # the cache's folder: its entries are named by what they hold


class DreamBoothConfig(BaseModel):
    """One ``blipdiff dreambooth`` run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = Field(description="Stable Diffusion 1.5 (diffusers layout) or a BLIP-Diffusion checkpoint: hub id or folder.")
    images: list[Path] = Field(min_length=1, description="Photos of the subject, or folders of them.")
    class_noun: SubjectText = Field(description="The subject's class, e.g. 'dog'.")
    out: Path
    identifier: Identifier = Field("sks", description="The rare token that names the subject.")
    steps: int = Field(800, ge=1)
    lr: float | None = Field(None, gt=0, description="AdamW's learning rate (default: 5e-6 in full mode, 2e-4 in lora).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradients clipped to this total norm (None: not clipped).")
    batch_size: int = Field(1, ge=1)
    prior_preservation: bool = True
    num_class_images: int = Field(200, ge=1)
    prior_loss_weight: float = Field(1.0, ge=0)
    train_text_encoder: bool = False
    mode: Literal["full", "lora"] = "full"
    lora_rank: int = Field(16, ge=1)
    precision: Literal["bf16", "fp32"] = "bf16"
    resolution: ImageSide = 512
    seed: int = Field(0, ge=0)
    class_images: Path = Field(Path("class-images"), validate_default=True,
                               description="Cache of class images, shared by runs.")
    class_steps: int = Field(50, ge=1, description="Denoising steps of a class image.")
    class_guidance: float = Field(7.5, ge=0)
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP).")
    workers_for_class_images: int = Field(1, ge=1, description="Ray tasks that make the class images.")
    gpus_per_worker: float | None = Field(None, ge=0, description="Default: 1 when the Ray cluster has GPUs, else 0.")
    checkpoint_every: int = Field(100, ge=1)
    max_failures: int = Field(0, ge=0, description="Worker-group restarts Ray Train may make after a failure.")

    _photos: list[Path] = PrivateAttr(default_factory=list)

    @field_validator("out", "class_images")
    @classmethod
    def _absolute(cls, folder: Path) -> Path:
        return folder.resolve()  # the Ray workers run in other folders

    @field_validator("base")
    @classmethod
    def _absolute_base(cls, base: str) -> str:
        return model_location(base)

    @model_validator(mode="before")
    @classmethod
    def _default_lr(cls, data):
        return fill_default_lr(data)  # by mode; the resolved rate is what settings() records

    @model_validator(mode="after")
    def _inputs(self) -> DreamBoothConfig:
        self._photos = find_photos(self.images)
        if self.prior_preservation:
            _require_writable(self.class_images)
        return self

    def photos(self) -> list[Path]:
        return list(self._photos)

    def settings(self) -> dict:
        settings = self.model_dump(mode="json", exclude={"out"})
        settings["images"] = [str(path) for path in self.photos()]
        return settings

    def trajectory(self) -> dict:
        trajectory = {key: value for key, value in self.settings().items() if key not in NOT_TRAJECTORY}
        if trajectory["max_grad_norm"] is None:
            del trajectory["max_grad_norm"]  # as runs recorded it before gradients were clipped: they resume
        return trajectory


def _require_writable(folder: Path) -> None:
    """The class-image cache must be a folder this process can write (made if missing)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    import os

    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"class images folder {folder}: not writable ({existing} is not a writable folder)")


# ------------------------------------------------------------------------------------------ class images
def class_image_folder(config: DreamBoothConfig) -> Path:
    """The cache entry of this (base model, class noun, count, seed, sampling) in ``config.class_images``."""
    key = {"base": config.base, "class_noun": config.class_noun, "count": config.num_class_images,
           "seed": config.seed, "resolution": config.resolution, "steps": config.class_steps,
           "guidance": config.class_guidance}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    slug = "".join(character if character.isalnum() else "-" for character in config.class_noun.lower())
    return config.class_images / f"{slug}-{config.num_class_images}-{digest}"


def class_image_seed(seed: int, index: int) -> int:
    """Each class image has its own seed, so that how the images are shared among tasks changes none."""
    return int.from_bytes(hashlib.sha256(f"class-image/{seed}/{index}".encode()).digest()[:4], "big")


def make_class_images(base: str, class_noun: str, indices: list[int], folder: str, seed: int, resolution: int,
                      steps: int, guidance: float) -> int:
    """Generate the class images ``indices`` into ``folder`` (each written atomically); returns how many."""
    import torch

    from blipdiff.models.dreambooth import load_stable_diffusion

    device = resolve_device()
    pipe = load_stable_diffusion(base, torch_dtype(AUTO, device), device)
    for index in indices:
        image = pipe(class_prompt(class_noun), height=resolution, width=resolution, num_inference_steps=steps,
                     guidance_scale=guidance,
                     generator=torch.Generator("cpu").manual_seed(class_image_seed(seed, index))).images[0]
        with atomic_path(Path(folder) / f"{index:05d}.png") as partial:
            image.save(partial, format="PNG")
    return len(indices)


def ensure_class_images(config: DreamBoothConfig, log: Callable[[str], None] = print) -> Path:
    """The class images of this configuration, made once: missing ones are generated by Ray tasks (one
    GPU each when the cluster has GPUs), then ``class.json`` marks the folder complete."""
    folder = class_image_folder(config)
    if (folder / CLASS_RECORD).is_file():
        log(f"class images: {config.num_class_images} of 'a {config.class_noun}' reused from {folder}")
        return folder
    _require_writable(folder)
    folder.mkdir(parents=True, exist_ok=True)
    missing = [index for index in range(config.num_class_images) if not (folder / f"{index:05d}.png").is_file()]
    log(f"class images: generating {len(missing)} of {config.num_class_images} 'a {config.class_noun}' into {folder}")
    if missing:
        import ray

        from blipdiff.infra.ray_cluster import cluster_has_gpus, connect_ray

        connect_ray()
        task = ray.remote(num_gpus=1 if cluster_has_gpus() else 0)(make_class_images)
        shards = [missing[start::config.workers_for_class_images] for start in range(config.workers_for_class_images)]
        ray.get([task.remote(config.base, config.class_noun, shard, str(folder), config.seed, config.resolution,
                             config.class_steps, config.class_guidance) for shard in shards if shard])
    write_json_atomic({"base": config.base, "class_noun": config.class_noun,
                       "prompt": class_prompt(config.class_noun), "count": config.num_class_images,
                       "seed": config.seed, "resolution": config.resolution, "steps": config.class_steps,
                       "guidance": config.class_guidance}, folder / CLASS_RECORD)
    return folder


# ---------------------------------------------------------------------------------------------- training
@dataclass
class LossParts:
    total: object  # torch.Tensor
    instance: object
    prior: object | None


def dreambooth_loss(unet, latents, noise, timesteps, context, instances: int, prior_loss_weight: float,
                    schedule) -> LossParts:
    """One batch of ``instances`` subject samples followed (with prior preservation) by as many class
    samples: the instance MSE of the predicted noise plus ``prior_loss_weight`` times the class MSE."""
    import torch.nn.functional as F

    noisy = schedule.add_noise(latents, noise, timesteps)
    target = noise if schedule.config.prediction_type == "epsilon" else schedule.get_velocity(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample.float()
    instance = F.mse_loss(prediction[:instances], target[:instances].float())
    if prediction.shape[0] == instances:
        return LossParts(instance, instance, None)
    prior = F.mse_loss(prediction[instances:], target[instances:].float())
    return LossParts(instance + prior_loss_weight * prior, instance, prior)


def draw_batch(instances: tuple, classes: tuple | None, batch_size: int, generator) -> tuple:
    """One step's latent distributions (mean, std) and prompt rows: ``batch_size`` subject photos (row 0,
    the instance prompt), then, with prior preservation, as many class images (row 1, the class prompt)."""
    import torch

    picks = torch.randint(0, len(instances[0]), (batch_size,), generator=generator)
    means, stds, rows = [instances[0][picks]], [instances[1][picks]], [0] * batch_size
    if classes is not None:
        chosen = torch.randint(0, len(classes[0]), (batch_size,), generator=generator)
        means.append(classes[0][chosen])
        stds.append(classes[1][chosen])
        rows += [1] * batch_size
    return torch.cat(means), torch.cat(stds), rows


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoints(out: Path) -> list[Path]:
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.is_dir() and path.name.startswith("step-")
                  and (path / "state.json").is_file())


class _Trained:
    """The modules a run trains (the U-Net, and the text encoder when asked), by name."""

    def __init__(self, pipe, config: DreamBoothConfig):
        import torch

        self.config = config
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        if config.mode == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            pipe.unet.requires_grad_(False)
            pipe.unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank,
                                             init_lora_weights="gaussian", target_modules=UNET_LORA_TARGETS))
            if config.train_text_encoder:
                # peft's own injection: transformers' add_adapter asks for a newer peft than the U-Net needs.
                inject_adapter_in_model(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank,
                                                   init_lora_weights="gaussian", target_modules=TEXT_LORA_TARGETS),
                                        pipe.text_encoder)
        elif config.train_text_encoder:
            pipe.text_encoder.requires_grad_(True)
        self.modules = torch.nn.ModuleDict({"unet": pipe.unet, "text_encoder": pipe.text_encoder})

    def state(self) -> dict[str, dict]:
        """What training changes, by module name."""
        from peft import get_peft_model_state_dict

        names = ["unet"] + (["text_encoder"] if self.config.train_text_encoder else [])
        if self.config.mode == "lora":
            return {name: get_peft_model_state_dict(self.modules[name]) for name in names}
        return {name: self.modules[name].state_dict() for name in names}

    def load(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        for name, module in self.modules.items():
            path = folder / f"{name}.safetensors"
            if path.is_file():
                if self.config.mode == "lora":
                    set_peft_model_state_dict(module, load_file(path))
                else:
                    module.load_state_dict(load_file(path), strict=False)


def _encode(pipe, photos: list[Path], resolution: int, device):
    """The photos' latent distributions (mean, std), Resize + CenterCrop to ``resolution``."""
    import torch
    from PIL import Image

    from blipdiff.models.blip_diffusion.image_processor import resize_center_crop, to_signed_tensor

    with torch.no_grad():
        means, stds = [], []
        for start in range(0, len(photos), 8):
            pixels = torch.stack([to_signed_tensor(resize_center_crop(Image.open(path).convert("RGB"), resolution))
                                  for path in photos[start:start + 8]]).to(device)
            posterior = pipe.vae.encode(pixels).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_worker(config: DreamBoothConfig, rank: int, world: int, device, class_folder: Path | None) -> None:
    """One worker's training, from the newest checkpoint of the run (or the start) to ``config.steps``."""
    import torch
    import torch.distributed as dist
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    from blipdiff.models.dreambooth import load_stable_diffusion
    from blipdiff.models.training.optimizer import adamw

    distributed = dist.is_available() and dist.is_initialized() and world > 1
    device = torch.device(device)
    saved = checkpoints(config.out)
    torch.manual_seed(config.seed)  # the same on every rank: LoRA's initial weights are drawn from it
    pipe = load_stable_diffusion(config.base, torch.float32, device)
    trained = _Trained(pipe, config)
    parameters = [parameter for parameter in trained.modules.parameters() if parameter.requires_grad]
    optimizer = adamw(parameters, lr=config.lr, weight_decay=0.01, fused=device.type == "cuda")
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(config.seed * 1_000 + rank)
    step, losses, train_seconds = 0, [], 0.0
    if saved:
        state = json.loads((saved[-1] / "state.json").read_text())
        step, losses, train_seconds = state["step"], state["losses"], state["train_seconds"]
        trained.load(saved[-1])
        optimizer.load_state_dict(torch.load(saved[-1] / "optimizer.pt", map_location=device, weights_only=True))
        generator.set_state(torch.load(saved[-1] / f"rng-rank{rank}.pt", weights_only=True))
    instance_mean, instance_std = _encode(pipe, config.photos(), config.resolution, device)
    class_mean = class_std = None
    if class_folder is not None:
        class_mean, class_std = _encode(pipe, sorted(class_folder.glob("*.png")), config.resolution, device)
    tokens = pipe.tokenizer([instance_prompt(config.identifier, config.class_noun), class_prompt(config.class_noun)],
                            padding="max_length", truncation=True, max_length=pipe.tokenizer.model_max_length,
                            return_tensors="pt").input_ids.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    contexts = None  # the two prompts' encodings, once, when the text encoder stays frozen
    if not config.train_text_encoder:
        with torch.no_grad(), autocast:
            contexts = trained.modules["text_encoder"](tokens)[0]
    scale = pipe.vae.config.scaling_factor
    pending = []  # the steps' losses, read at the checkpoints: reading one waits for the GPU
    trained.modules.train()
    clock = time.perf_counter()
    while step < config.steps:
        mean, std, rows = draw_batch((instance_mean, instance_std),
                                     (class_mean, class_std) if class_mean is not None else None,
                                     config.batch_size, generator)
        latents = (mean + std * torch.randn(mean.shape, generator=generator).to(device)) * scale
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, schedule.config.num_train_timesteps, (len(rows),), generator=generator).to(device)
        with autocast:
            context = contexts[rows] if contexts is not None else trained.modules["text_encoder"](tokens[rows])[0]
            parts = dreambooth_loss(trained.modules["unet"], latents, noise, timesteps, context, config.batch_size,
                                    config.prior_loss_weight, schedule)
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        if distributed:
            # Averaged by hand rather than by DDP, whose hooks need the step to run through one wrapped
            # module's forward: here the text encoder and the U-Net are called apart.
            for parameter in parameters:
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad)
                    parameter.grad /= world
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        step += 1
        pending.append(parts.total.detach())
        if step % config.checkpoint_every == 0 or step == config.steps:
            losses += torch.stack(pending).tolist()
            pending.clear()
            train_seconds += time.perf_counter() - clock
            states = [generator.get_state()]
            if distributed:
                states = [None] * world
                dist.all_gather_object(states, generator.get_state())
            if rank == 0:
                with atomic_folder(config.out / CHECKPOINTS / checkpoint_name(step)) as staging:
                    for name, state in trained.state().items():
                        save_file({key: value.detach().cpu().contiguous() for key, value in state.items()},
                                  staging / f"{name}.safetensors", metadata={"format": "pt"})
                    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
                    for worker, state in enumerate(states):
                        torch.save(state, staging / f"rng-rank{worker}.pt")
                    (staging / "state.json").write_text(json.dumps(
                        {"step": step, "losses": losses, "train_seconds": train_seconds, "workers": world}) + "\n")
                for old in checkpoints(config.out)[:-1]:  # the newest is all a resume needs
                    # Renamed first, so that a kill while deleting never leaves a half-deleted "complete" one.
                    doomed = old.with_name(f"{TEMP_PREFIX}{old.name}.deleted")
                    old.rename(doomed)
                    shutil.rmtree(doomed)
            if distributed:
                dist.barrier()
            clock = time.perf_counter()
    if rank == 0:
        _write_subject(config, trained, losses, train_seconds)
    if distributed:
        dist.barrier()


def _write_subject(config: DreamBoothConfig, trained: _Trained, losses: list[float], train_seconds: float) -> None:
    """The subject checkpoint into OUT beside the run's checkpoints, ``dreambooth.json`` last."""
    import torch
    from safetensors.torch import save_file

    saved_dtype = torch.bfloat16 if config.precision == "bf16" and config.mode == "full" else torch.float32
    for name, state in trained.state().items():
        if config.mode == "lora" and name == "unet":
            # diffusers' own format, with peft's LoraConfig in the metadata, for load_lora_adapter.
            shutil.rmtree(config.out / UNET_LORA, ignore_errors=True)
            trained.modules["unet"].save_lora_adapter(config.out / UNET_LORA, weight_name=LORA_WEIGHTS)
            continue
        if config.mode == "lora":
            folder, file = config.out / TEXT_ENCODER_LORA, LORA_WEIGHTS
        else:
            folder, file = config.out / (UNET_FOLDER if name == "unet" else TEXT_ENCODER_FOLDER), "model.safetensors"
        folder.mkdir(exist_ok=True)
        with atomic_path(folder / file) as partial:
            save_file({key: value.detach().to(saved_dtype).cpu().contiguous() for key, value in state.items()}, partial,
                      metadata={"format": "pt"})
    write_json_atomic({"identifier": config.identifier, "class_noun": config.class_noun, "mode": config.mode,
                       "steps": config.steps,
                       "prompt": instance_prompt(config.identifier, config.class_noun), "settings": config.settings(),
                       "losses": losses, "train_seconds": train_seconds}, config.out / RECORD_FILE)


def _train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    payload = dict(loop_config)
    class_folder = payload.pop("class_folder")
    config = DreamBoothConfig.model_validate(payload)
    context = ray.train.get_context()
    train_worker(config, context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(),
                 Path(class_folder) if class_folder else None)


def run_dreambooth(config: DreamBoothConfig, log: Callable[[str], None] = print) -> Path:
    """Train the subject checkpoint into ``config.out`` on Ray Train, resuming from the run's newest
    checkpoint; a finished run is not redone."""
    from blipdiff.models.dreambooth import resolve_base

    settings_file = config.out / SETTINGS_FILE
    if settings_file.is_file():
        if json.loads(settings_file.read_text()) != config.trajectory():
            raise ValueError(f"{config.out} holds another DreamBooth run (see {settings_file}); choose another --out")
        record = config.out / RECORD_FILE
        if record.is_file():
            if json.loads(record.read_text())["steps"] >= config.steps:
                log(f"{config.out} already holds this DreamBooth checkpoint")
                return config.out
            # Trained on: until the new subject checkpoint is complete, the folder claims none.
            record.unlink()
    elif config.out.exists() and (not config.out.is_dir() or any(config.out.iterdir())):
        raise ValueError(f"{config.out} exists and is not a DreamBooth run; choose another --out")
    resolve_base(config.base)
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from blipdiff.infra.ray_cluster import cluster_has_gpus, connect_ray

    class_folder = ensure_class_images(config, log) if config.prior_preservation else None
    connect_ray()
    gpus = config.gpus_per_worker if config.gpus_per_worker is not None else float(cluster_has_gpus())
    config.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config.trajectory(), settings_file)
    for leftover in (config.out / CHECKPOINTS).glob(f"{TEMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    done = checkpoints(config.out)
    if done:
        log(f"resuming from {done[-1]}")
    trainer = TorchTrainer(
        _train_loop, train_loop_config={**config.model_dump(mode="json"),
                                        "class_folder": str(class_folder) if class_folder else None},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=gpus > 0,
                                               resources_per_worker={"CPU": 1, **({"GPU": gpus} if gpus else {})}),
        run_config=ray.train.RunConfig(storage_path=str(config.out / "ray"), name="dreambooth",
                                       failure_config=ray.train.FailureConfig(max_failures=config.max_failures)))
    trainer.fit()
    record = json.loads((config.out / RECORD_FILE).read_text())
    log(f"{config.steps} steps in {record['train_seconds']:.1f} s; DreamBooth checkpoint -> {config.out}")
    return config.out
