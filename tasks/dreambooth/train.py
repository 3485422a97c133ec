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
failure, resumes from the newest. The subject checkpoint (``models.stable_diffusion``'s layout) is written
to OUT at the end, ``dreambooth.json`` last.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from blipdiff.infra import ray_train
from blipdiff.infra.atomic import atomic_path, write_json_atomic
from blipdiff.infra.checkpoints import gather_rng, restore_rng, save_rng
from blipdiff.infra.run_folder import claim_run_folder, record_run_folder
from blipdiff.models.stable_diffusion import (LORA_WEIGHTS, RECORD_FILE, TEXT_ENCODER_FOLDER, TEXT_ENCODER_LORA,
                                              UNET_FOLDER, UNET_LORA, class_prompt, instance_prompt)
from blipdiff.models.training.dreambooth_model import TrainedModules, draw_batch, encode_latent_distributions
from blipdiff.tasks.dreambooth.class_images import ensure_class_images
from blipdiff.tasks.dreambooth.config import SETTINGS_FILE, DreamBoothConfig, run_checkpoints


def train_worker(config: DreamBoothConfig, rank: int, world: int, device, class_folder: Path | None) -> None:
    """One worker's training, from the newest checkpoint of the run (or the start) to ``config.steps``."""
    import torch
    import torch.distributed as dist
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    from blipdiff.models.stable_diffusion import load_stable_diffusion
    from blipdiff.models.training.objective import dreambooth_loss
    from blipdiff.models.training.optimizer import adamw

    distributed = dist.is_available() and dist.is_initialized() and world > 1
    device = torch.device(device)
    saved = run_checkpoints(config.out)
    newest = saved.newest()
    torch.manual_seed(config.seed)  # the same on every rank: LoRA's initial weights are drawn from it
    pipe = load_stable_diffusion(config.base, torch.float32, device)
    trained = TrainedModules(pipe, mode=config.mode, lora_rank=config.lora_rank,
                             train_text_encoder=config.train_text_encoder)
    parameters = [parameter for parameter in trained.modules.parameters() if parameter.requires_grad]
    optimizer = adamw(parameters, lr=config.lr, weight_decay=0.01, fused=device.type == "cuda")
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(config.seed * 1_000 + rank)
    step, losses, train_seconds = 0, [], 0.0
    if newest is not None:
        state = json.loads((newest / "state.json").read_text())
        step, losses, train_seconds = state["step"], state["losses"], state["train_seconds"]
        trained.load(newest)
        optimizer.load_state_dict(torch.load(newest / "optimizer.pt", map_location=device, weights_only=True))
        restore_rng(newest, rank, device, generator)
    instance_mean, instance_std = encode_latent_distributions(pipe, config.photos(), config.resolution, device)
    class_mean = class_std = None
    if class_folder is not None:
        class_mean, class_std = encode_latent_distributions(pipe, sorted(class_folder.glob("*.png")), config.resolution, device)
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
            recent = torch.stack(pending)
            if distributed:  # the workers' mean, as pre-training records it, whatever the number of workers
                dist.all_reduce(recent)
                recent /= world
            losses += recent.tolist()
            pending.clear()
            train_seconds += time.perf_counter() - clock
            states = gather_rng(device, world, generator)
            if rank == 0:
                with saved.writing(step) as staging:
                    for name, state in trained.state().items():
                        save_file({key: value.detach().cpu().contiguous() for key, value in state.items()},
                                  staging / f"{name}.safetensors", metadata={"format": "pt"})
                    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
                    save_rng(staging, states)
                    (staging / "state.json").write_text(json.dumps(
                        {"step": step, "losses": losses, "train_seconds": train_seconds, "workers": world}) + "\n")
                saved.prune(keep=1)  # the newest is all a resume needs
            if distributed:
                dist.barrier()
            clock = time.perf_counter()
    if rank == 0:
        _write_subject(config, trained, losses, train_seconds, step)
    if distributed:
        dist.barrier()


def _write_subject(config: DreamBoothConfig, trained: TrainedModules, losses: list[float], train_seconds: float,
                   steps: int) -> None:
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
                       # The steps reached: a rerun asking fewer than a killed run's checkpoint holds gets those.
                       "steps": steps,
                       "prompt": instance_prompt(config.identifier, config.class_noun), "settings": config.settings(),
                       "losses": losses, "train_seconds": train_seconds}, config.out / RECORD_FILE)


def _train_loop(loop_config: dict) -> None:
    """What each Ray Train worker runs."""
    payload = dict(loop_config)
    class_folder = payload.pop("class_folder")
    config = DreamBoothConfig.model_validate(payload)
    train_worker(config, *ray_train.worker_place(), Path(class_folder) if class_folder else None)


def run_dreambooth(config: DreamBoothConfig, log: Callable[[str], None] = print) -> Path:
    """Train the subject checkpoint into ``config.out`` on Ray Train, resuming from the run's newest
    checkpoint; a finished run is not redone."""
    from blipdiff.models.stable_diffusion import resolve_base

    if claim_run_folder(config.out, config.trajectory(), record=SETTINGS_FILE, other="another DreamBooth run",
                        run="DreamBooth run"):
        record = config.out / RECORD_FILE
        if record.is_file():
            if json.loads(record.read_text())["steps"] >= config.steps:
                log(f"{config.out} already holds this DreamBooth checkpoint")
                return config.out
            # Trained on: until the new subject checkpoint is complete, the folder claims none.
            record.unlink()
    resolve_base(config.base)
    class_folder = ensure_class_images(config, log) if config.prior_preservation else None
    ray_train.connect_workers(config.workers)
    config.out.mkdir(parents=True, exist_ok=True)
    record_run_folder(config.out, config.trajectory(), SETTINGS_FILE)
    saved = run_checkpoints(config.out)
    saved.clear_leftovers()
    newest = saved.newest()
    if newest is not None:
        log(f"resuming from {newest}")
    loop_config = {**config.model_dump(mode="json"), "class_folder": str(class_folder) if class_folder else None}
    ray_train.fit(_train_loop, loop_config, name="dreambooth", storage=config.out / "ray", workers=config.workers,
                  gpus_per_worker=config.gpus_per_worker, max_failures=config.max_failures)
    record = json.loads((config.out / RECORD_FILE).read_text())
    log(f"{record['steps']} steps in {record['train_seconds']:.1f} s; DreamBooth checkpoint -> {config.out}")
    return config.out
