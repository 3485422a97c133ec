"""Append-only JSON-lines journals: each finished unit of work is one line, written as it completes.

A kill -9 can tear at most the last line, which reading skips; everything before it survives, so a
rerun knows exactly what is finished. A journal is appended from one thread: the stages call it from
the thread that collects their results.
"""

from __future__ import annotations

import json
from pathlib import Path

JOURNAL_NAME = "journal.jsonl"


class Journal:
    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> list[dict]:
        entries: list[dict] = []
        if not self.path.exists():
            return entries
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries

    def append(self, entry: dict) -> None:
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
