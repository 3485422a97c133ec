"""What every benchmark shares: a description of the machine, and appending a section to the docs."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"


def host() -> str:
    """CPU model, core count and memory of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB"


def record(title: str, machine: str, facts: Sequence[str], body: str) -> None:
    """Append one section to docs/benchmarks.md (created with its header when missing): the date,
    the machine, the exact command, ``facts`` (markdown list items), then ``body``."""
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    lines = [f"\n## {title}\n", f"- date: {datetime.date.today().isoformat()}", f"- machine: {machine}",
             f"- command: `{command}`", *facts, "", body, ""]
    if not DOCS.exists():
        DOCS.write_text("# Benchmarks\n\nAppended by the scripts in `bench/`; newest last.\n")
    with open(DOCS, "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
