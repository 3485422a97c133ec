"""Claiming an output folder for one run: a rerun with the same settings resumes or finds the work done,
while another run's settings, or a folder that holds something else, are refused, so two runs never mix."""

from __future__ import annotations

import json
from pathlib import Path

from blipdiff.infra.atomic import write_json_atomic

CHOOSE_ANOTHER = "choose another --out"


def claim_run_folder(out: Path, settings: dict, *, record: str, other: str, run: str, key: str | None = None,
                     must_be_new: bool = True, advice: str = CHOOSE_ANOTHER) -> bool:
    """True when ``out/record`` already holds these settings (a rerun), False when ``out`` is new.

    ``record`` names the file that holds the settings (``key``: under that key of it); ``other`` is how
    the refusal names a run made with other settings ("another run (edit)", "a build made"), ``run`` what
    this folder holds ("pre-training run"). ``must_be_new``: a folder without the record must be missing
    or empty (a data folder that a build fills in place passes False). ValueError says why not.
    """
    path = out / record
    if path.is_file():
        recorded = json.loads(path.read_text())
        if key is not None:
            recorded = recorded[key]
        if recorded != settings:
            changed = sorted(name for name in recorded.keys() | settings.keys()
                             if recorded.get(name) != settings.get(name))
            raise ValueError(f"{out} holds {other} with other settings ({', '.join(changed)}), see {path}: {advice}")
        return True
    if must_be_new and out.exists():
        if not out.is_dir():
            raise ValueError(f"{out} is a file, not a {run} folder; {CHOOSE_ANOTHER}")
        if any(out.iterdir()):
            raise ValueError(f"{out} is not empty and is not a {run} folder; {CHOOSE_ANOTHER}")
    return False


def record_run_folder(out: Path, settings: dict, record: str) -> None:
    """Write the claim; callers do it once every input has been checked, so a refused start leaves no run
    folder behind."""
    write_json_atomic(settings, out / record)
