"""Shared fixtures."""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import CLASSES, V6_HEADER, V13_HEADER

# Prefect reads its home when first imported: keep the tests' state away from the user's ~/.prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="blipdiff-tests-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"


@pytest.fixture
def class_file(tmp_path: Path) -> Path:
    path = tmp_path / "classes.csv"
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(CLASSES.items())
    return path


@pytest.fixture
def write_boxes(tmp_path: Path) -> Callable[..., Path]:
    """Write box rows as a V6 (21 columns) or validation/test (13 columns) CSV."""

    def write(rows: list[dict], name: str = "boxes.csv", schema: str = "v6") -> Path:
        header = V6_HEADER if schema == "v6" else V13_HEADER
        path = tmp_path / name
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header, restval="-1", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        return path

    return write


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine the threads' waiting
    makes each forward pass about a hundred times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
