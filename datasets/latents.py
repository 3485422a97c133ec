"""Cached target latents: every pair's target photo encoded once by the VAE, for pre-training to read.

A pair's target is the original photo, Resize(resolution, bicubic) + CenterCrop(resolution), in [-1, 1];
the VAE's posterior over it is a diagonal Gaussian, whose mean and standard deviation are stored, so that
training draws a fresh latent sample each time it sees the pair, as the authors' ``latent_dist.sample()``
did, without running the encoder. The cache lives beside the pairs in
``PAIRS/latents/<VAE key>-<resolution>/``, where the key hashes the VAE's config and weights: another VAE
(Stable Diffusion's, after ``--reset-from-sd``) or another resolution gets a folder of its own and never
reads these. Inside: ``vae.json`` (what made the folder), ``<first two hex digits>/<image_id>.safetensors``
(``mean`` and ``std``, float32 [C, H/f, W/f]) and ``latents.parquet`` (one row per pair: ``image_id``,
``path`` relative to PAIRS or empty, ``status`` ``encoded`` or why not). A file appears atomically once
written, so a rerun, after a crash too, encodes only what is missing.

The encoding runs as a Ray Data ``map_batches`` over a pool of actors, each loading the VAE once (on a
GPU when the cluster has them).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from blipdiff.datasets.configs import EncodeLatentsConfig
from blipdiff.infra.atomic import atomic_path, remove_stale_temporaries, write_json_atomic
from blipdiff.infra.inputs import model_location
from blipdiff.models.devices import resolve_device

LATENTS_FOLDER = "latents"
MANIFEST = "latents.parquet"
DESCRIPTION = "vae.json"
ENCODED = "encoded"
MANIFEST_SCHEMA = pa.schema([("image_id", pa.string()), ("path", pa.string()), ("status", pa.string())])


@dataclass
class LatentSummary:
    folder: Path
    encoded: int
    skipped: int
    missing: Counter

    @property
    def available(self) -> int:
        return self.encoded + self.skipped


def vae_key(vae) -> str:
    """sha256 of the VAE's config and weights (as float32, so the file format and load dtype do not matter)."""
    import torch

    digest = hashlib.sha256()
    config = {key: value for key, value in dict(vae.config).items() if not key.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_vae(model: str, device: str = "cpu"):
    import torch
    from diffusers import AutoencoderKL

    from blipdiff.models.blip_diffusion import checkpoint

    root = checkpoint.resolve(model, ("vae",), kind="checkpoint with a VAE")
    return checkpoint.load_diffusers_model(AutoencoderKL, root, "vae", torch.float32).to(device)


def cache_folder(pairs: Path, key: str, resolution: int) -> Path:
    return pairs / LATENTS_FOLDER / f"{key[:16]}-{resolution}"


def latent_path(folder: Path, image_id: str) -> Path:
    return folder / image_id[:2] / f"{image_id}.safetensors"


def read_latent(path: Path):
    """(mean, std) of one cached target."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    return tensors["mean"], tensors["std"]


class LatentEncoder:
    """A Ray Data actor: the VAE loaded once; each batch of pairs → their latent files, and a status each."""

    def __init__(self, model: str, pairs: str, folder: str, resolution: int):
        import torch

        self.device = resolve_device()
        self.vae = load_vae(model, self.device)
        self.pairs, self.folder, self.resolution = Path(pairs), Path(folder), resolution

    def __call__(self, batch: dict) -> dict:
        import torch
        from PIL import Image, UnidentifiedImageError
        from safetensors.torch import save_file

        from blipdiff.models.blip_diffusion.image_processor import resize_center_crop, to_signed_tensor

        statuses, targets, encoded = [], [], []
        for image_id, target_path in zip(batch["image_id"], batch["target_path"]):
            path = self.pairs / target_path
            try:
                with Image.open(path) as image:
                    targets.append(to_signed_tensor(resize_center_crop(image.convert("RGB"), self.resolution)))
                encoded.append(len(statuses))
                statuses.append(ENCODED)
            except FileNotFoundError:
                statuses.append("missing target file")
            except (UnidentifiedImageError, OSError) as error:
                statuses.append(f"unreadable target: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
        if targets:
            with torch.no_grad():
                posterior = self.vae.encode(torch.stack(targets).to(self.device)).latent_dist
            for index, mean, std in zip(encoded, posterior.mean.cpu(), posterior.std.cpu()):
                target = latent_path(self.folder, str(batch["image_id"][index]))
                with atomic_path(target) as temp:
                    save_file({"mean": mean.contiguous(), "std": std.contiguous()}, temp)
        return {"image_id": batch["image_id"], "status": statuses}


def encode_latents(config: EncodeLatentsConfig, progress: Callable[[int, int], None] | None = None,
                   log: Callable[[str], None] = print) -> LatentSummary:
    """Encode every pair's target not yet in the cache of this VAE and resolution; write the manifest."""
    pairs = pq.read_table(config.pairs / "pairs.parquet", columns=["image_id", "target_path"]).to_pylist()
    vae = load_vae(config.model)
    key = vae_key(vae)
    del vae
    folder = cache_folder(config.pairs, key, config.resolution)
    description = {"vae": model_location(config.model), "sha256": key, "resolution": config.resolution}
    described = folder / DESCRIPTION
    if described.is_file():
        recorded = json.loads(described.read_text())
        if (recorded["sha256"], recorded["resolution"]) != (key, config.resolution):
            raise ValueError(f"{described} describes another VAE or resolution: the cache folder is corrupt")
    else:
        write_json_atomic(description, described)
    remove_stale_temporaries(folder, below="*/")

    statuses: dict[str, str] = {}
    todo = []
    for row in pairs:
        if latent_path(folder, row["image_id"]).is_file():
            statuses[row["image_id"]] = ENCODED
        else:
            todo.append(row)
    skipped = len(statuses)
    log(f"latents of {len(pairs)} pairs in {folder}: {skipped} cached, {len(todo)} to encode")
    if todo:
        import ray

        from blipdiff.infra.ray_cluster import cluster_has_gpus, connect_ray

        connect_ray()
        gpus = config.gpus_per_actor if config.gpus_per_actor is not None else float(cluster_has_gpus())
        dataset = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo) // config.batch_size, 256)))
        encoded = dataset.map_batches(
            LatentEncoder, fn_constructor_args=(config.model, str(config.pairs), str(folder), config.resolution),
            batch_size=config.batch_size, batch_format="numpy", num_gpus=gpus or None,
            # Without a GPU the actor's work is on the CPU: give it one; beside a GPU it mostly waits.
            num_cpus=1 if not gpus else 0.5, compute=ray.data.ActorPoolStrategy(size=config.actors))
        for done, row in enumerate(encoded.iter_rows(), start=1):
            statuses[row["image_id"]] = row["status"]
            if progress is not None:
                progress(done, len(todo))
    rows = [{"image_id": row["image_id"],
             "path": str(latent_path(folder, row["image_id"]).relative_to(config.pairs))
             if statuses[row["image_id"]] == ENCODED else "",
             "status": statuses[row["image_id"]]} for row in pairs]
    with atomic_path(folder / MANIFEST) as temp:
        pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), temp)
    missing = Counter(status for status in statuses.values() if status != ENCODED)
    summary = LatentSummary(folder=folder, encoded=len(pairs) - skipped - sum(missing.values()), skipped=skipped,
                            missing=missing)
    log(f"{summary.encoded} encoded, {skipped} already cached"
        + "".join(f", {count} skipped ({reason})" for reason, count in missing.items()))
    return summary
