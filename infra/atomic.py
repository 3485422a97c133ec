"""Atomic file writes: a reader sees the old file or the new one, never a partial one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``.

    The temporary file lives in the same folder so that the final rename is atomic on POSIX.
    On failure it is removed and ``target`` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=target.suffix, dir=target.parent)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``target`` to fill; on success it takes ``target``'s place (an
    existing ``target`` is replaced whole), so a reader never sees a half-written folder. On failure it
    is removed and ``target`` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}.", dir=target.parent))
    # mkdtemp makes the folder private; the result is read like any folder the user makes.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}.old.", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json_atomic(data: Any, target: Path) -> None:
    with atomic_path(target) as temp:
        temp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def remove_stale_temporaries(folder: Path, below: str = "") -> int:
    """Delete temporaries that an interrupted run left in ``folder`` (or in its subfolders matching
    the glob ``below``, such as ``"*/"``); return how many."""
    removed = 0
    if folder.is_dir():
        for leftover in folder.glob(f"{below}{TEMP_PREFIX}*"):
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
                removed += 1
    return removed
