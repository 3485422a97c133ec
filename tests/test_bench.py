"""The GPU benchmarks' code paths, run on the CPU with tiny random models: a change to the model
classes or to transformers shows here, not only on a lent GPU."""

from __future__ import annotations

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
