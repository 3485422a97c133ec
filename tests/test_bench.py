"""The GPU benchmarks' code paths, run on the CPU with tiny random models: a change to the model
classes or to transformers shows here, not only on a lent GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO, shared_path

SMOKE = ["--device", "cpu", "--tiny", "--no-record", "--batch-sizes", "1", "2", "--batches", "1", "--warmup", "0",
         "--pool", "2"]


@pytest.mark.parametrize(("script", "last_line"), [("gpu_caption.py", "first caption:"), ("gpu_segment.py", "first map:")])
def test_a_gpu_benchmark_runs_end_to_end_on_the_cpu(script, last_line):
    pytest.importorskip("torch")
    photos = shared_path("dreambench", "dataset")
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *SMOKE, "--photos", str(photos)],
                          capture_output=True, text=True, timeout=600, cwd=REPO / "bench")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert {row.split("|")[1].strip() for row in rows} == {"1", "2"}, done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith(last_line)


def test_the_gpu_generate_benchmark_runs_end_to_end_on_the_cpu():
    pytest.importorskip("diffusers")
    photos = shared_path("dreambench", "dataset")
    # float32: the CPU's bf16 kernels spend seconds preparing every new shape, and a smoke run has only new shapes.
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_generate.py"), "--device", "cpu", "--tiny",
                           "--no-record", "--dtype", "float32", "--batch-sizes", "1", "2", "--steps", "2",
                           "--warmup", "0", "--batches", "1", "--embedding-calls", "1", "--pool", "2",
                           "--photos", str(photos)],
                          capture_output=True, text=True, timeout=600, cwd=REPO / "bench")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:3] for line in done.stdout.splitlines() if line.startswith("| 2 |")]
    assert {batch.strip() for _, batch in rows} == {"1", "2"}, done.stdout
    assert "subject embedding:" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("DreamBench's 3,000 images at 2 steps, batch 2:")


def test_the_gpu_finetune_benchmark_runs_end_to_end_on_the_cpu():
    pytest.importorskip("peft")
    photos = shared_path("dreambench", "dataset")
    # One thread: the tiny model's steps take milliseconds, and threads waiting on a busy machine take seconds.
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_finetune.py"), "--device", "cpu", "--tiny",
                           "--no-record", "--steps", "2", "--resolution", "32", "--photos", str(photos),
                           "--dreambooth", "--dreambooth-steps", "3", "--num-class-images", "2", "--class-steps", "1"],
                          capture_output=True, text=True, timeout=600, cwd=REPO / "bench",
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:4] for line in done.stdout.splitlines() if line.startswith(("| full |", "| lora |"))]
    assert {(mode.strip(), steps.strip(), batch.strip()) for mode, steps, batch in rows} == \
        {("full", "2", "3"), ("lora", "2", "3")}, done.stdout
    # BLIP-Diffusion at Table 3's steps for the dog (50) against DreamBooth, class images apart.
    methods = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in done.stdout.splitlines()
               if line.startswith(("| BLIP-Diffusion (Table 3) |", "| DreamBooth (prior preservation) |"))}
    assert methods == {"BLIP-Diffusion (Table 3)": "50", "DreamBooth (prior preservation)": "3"}, done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("goal: 80 steps at batch 3")
    assert "not assessed, this ran on the CPU" in done.stdout


def test_the_gpu_train_benchmark_runs_end_to_end_on_the_cpu():
    pytest.importorskip("ray")
    photos = shared_path("dreambench", "dataset")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_train.py"), "--device", "cpu", "--tiny",
                           "--no-record", "--batch-sizes", "1", "2", "--steps", "2", "--resolution", "32", "--pairs", "8",
                           "--photos", str(photos)],
                          capture_output=True, text=True, timeout=600, cwd=REPO / "bench",
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:4] for line in done.stdout.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert {(batch.strip(), steps.strip()) for batch, steps, _ in rows} == {("1", "2"), ("2", "2")}, done.stdout
    assert all(float(rate) > 0 for _, _, rate in rows)
    assert "8 DreamBench photos as pairs" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("goal: at least 60 samples/s on one H100")


def test_the_gpu_dreambench_benchmark_runs_end_to_end_on_the_cpu():
    pytest.importorskip("ray")
    photos = shared_path("dreambench", "dataset")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_dreambench.py"), "--device", "cpu", "--tiny",
                           "--no-record", "--subjects", "2", "--prompts", "1", "--images-per-prompt", "2", "--steps", "2",
                           "--resolution", "32", "--finetune-steps", "2", "--photos", str(photos)],
                          capture_output=True, text=True, timeout=600, cwd=REPO / "bench",
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:4] for line in done.stdout.splitlines() if line.startswith(("| zero-shot |", "| finetuned |"))]
    assert {(mode.strip(), subjects.strip(), images.strip()) for mode, subjects, images in rows} == \
        {("zero-shot", "2", "4"), ("finetuned", "2", "4")}, done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("goal: zero-shot under 25 min, finetuned under 30 min")
    assert "not assessed" in done.stdout
