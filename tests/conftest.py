"""Shared fixtures."""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import CLASSES, V6_HEADER, V13_HEADER

# Prefect reads its home when first imported: keep the tests' state away from the user's ~/.prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="blipdiff-tests-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# FiftyOne reads its config when first imported: the tests' datasets live in a database of their own,
# which every process the tests start inherits and the session drops at its end.
os.environ["FIFTYONE_DATABASE_NAME"] = f"blipdiff-tests-{uuid.uuid4().hex[:12]}"
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
# Ray reads its authentication mode once per process: the tests' local clusters, which CLI runs in
# subprocesses join through RAY_ADDRESS, all go without the token those subprocesses would lack.
os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture(scope="session", autouse=True)
def temporary_state():
    yield
    shutil.rmtree(os.environ["PREFECT_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def fiftyone_database() -> str:
    """The tests' temporary FiftyOne database, on FiftyOne's own MongoDB (or FIFTYONE_DATABASE_URI)."""
    import fiftyone as fo
    import fiftyone.core.odm as foo

    name = fo.config.database_name
    assert name == os.environ["FIFTYONE_DATABASE_NAME"]
    yield name
    foo.get_db_client().drop_database(name)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of two CPUs for a test module; the stages under test join it (``connect_ray``)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


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
