"""BLIP-Diffusion fine-tuning (Table 3: the dog's 50 steps) against DreamBooth's training loop, on one GPU in one process.

    python bench/gpu_dreambooth_without_ray.py [NUM_CLASS_IMAGES]    # CUDA; the released architecture, random weights

For a GPU machine that Ray cannot reach (bench/gpu_finetune.py --dreambooth needs Ray Train): DreamBooth runs its
worker function (``train_worker``, what each Ray Train worker runs) directly, and its class images through
``make_class_images`` (what each Ray task runs), timed apart. Prints the table; docs/benchmarks.md has the H200 run."""
import gc
import json
import sys
import time
from pathlib import Path
import torch
from gpu_caption import DREAMBENCH
from gpu_generate import random_pipeline
from blipdiff.tasks.finetune import FinetuneConfig, finetune
from blipdiff.tasks.dreambooth.class_images import class_image_folder, make_class_images
from blipdiff.tasks.dreambooth.config import DreamBoothConfig
from blipdiff.tasks.dreambooth.train import train_worker

n_class = int(sys.argv[1]) if len(sys.argv) > 1 else 200  # read first: a bad argument fails before minutes of GPU work
work = Path("/tmp/dbw"); work.mkdir(exist_ok=True)
photos = DREAMBENCH / "dog"
torch.manual_seed(0)
pipe = random_pipeline(False, torch.device("cuda"), torch.float32, "dog"); pipe.save_pretrained(work / "ckpt"); del pipe; gc.collect(); torch.cuda.empty_cache()
model = str(work / "ckpt")
t = time.perf_counter(); finetune(FinetuneConfig(model=model, images=[photos], subject="dog", out=work / "blip", steps=50, device="cuda"), log=lambda l: None); blip_total = time.perf_counter() - t
blip = json.loads((work / "blip" / "subject.json").read_text())
cfg = DreamBoothConfig(base=model, images=[photos], class_noun="dog", out=work / "db", steps=800, prior_preservation=True, num_class_images=n_class, class_images=work / "classes", checkpoint_every=800)
folder = class_image_folder(cfg); folder.mkdir(parents=True, exist_ok=True)
t = time.perf_counter(); make_class_images(cfg.base, "dog", list(range(n_class)), str(folder), cfg.seed, cfg.resolution, cfg.class_steps, cfg.class_guidance); class_s = time.perf_counter() - t
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
t = time.perf_counter(); train_worker(cfg, 0, 1, "cuda", folder); db_total = time.perf_counter() - t
db = json.loads((work / "db" / "dreambooth.json").read_text())
peak = torch.cuda.max_memory_allocated() / 2**30
rows = ["| method | steps | batch | whole call (s) | training loop (s) | class images (s) | whole call vs BLIP-Diffusion | training loop vs BLIP-Diffusion |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| BLIP-Diffusion (Table 3, dog) | 50 | 3 | {blip_total:.1f} | {blip['train_seconds']:.2f} | | 1.0x | 1.0x |",
        f"| DreamBooth (prior preservation) | 800 | 1 (+1 class) | {db_total:.1f} | {db['train_seconds']:.2f} | {class_s:.1f} ({n_class} images, 50 steps each) | {db_total / blip_total:.1f}x | {db['train_seconds'] / blip['train_seconds']:.1f}x |"]
print("\n".join(rows)); print(f"DreamBooth peak GPU memory {peak:.1f} GiB; final loss {db['losses'][-1]:.4f}; BLIP loss {blip['losses'][0]:.3f} -> {blip['losses'][-1]:.3f}")
print(f"class images per second: {n_class / class_s:.2f}; 200 class images would take about {200 * class_s / n_class:.0f} s")
