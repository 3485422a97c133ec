"""A training run's checkpoints, ``RUN/checkpoints/step-N``: their names, the complete ones in step order,
writing one atomically, dropping old ones, and every worker's random state inside them."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from blipdiff.infra.atomic import TEMP_PREFIX, atomic_folder

STEP = re.compile(r"step-(\d+)")


@dataclass(frozen=True)
class StepCheckpoints:
    """The checkpoints under ``folder``, named ``step-`` and the step in ``digits`` digits; one is complete
    once ``marker`` (a path inside it) exists."""

    folder: Path
    digits: int
    marker: str

    def name(self, step: int) -> str:
        return f"step-{step:0{self.digits}d}"

    def complete(self) -> list[Path]:
        """Oldest first, ordered by the step the name holds, not by the name: a run that outgrows its
        digits, or whose names were written at another width, still resumes from its newest."""
        if not self.folder.is_dir():
            return []
        found = [(int(match.group(1)), path) for path in self.folder.iterdir()
                 if (match := STEP.fullmatch(path.name)) and (path / self.marker).is_file()]
        return [path for _, path in sorted(found)]

    def newest(self) -> Path | None:
        saved = self.complete()
        return saved[-1] if saved else None

    @contextmanager
    def writing(self, step: int) -> Iterator[Path]:
        """A staging folder to fill; it takes the checkpoint's name only once complete."""
        with atomic_folder(self.folder / self.name(step)) as staging:
            yield staging

    def prune(self, keep: int) -> None:
        """Keep the newest ``keep`` complete checkpoints (0: all)."""
        if not keep:
            return
        for old in self.complete()[:-keep]:
            # Renamed first, so that a kill while deleting never leaves a half-deleted "complete" one.
            doomed = old.with_name(f"{TEMP_PREFIX}{old.name}.deleted")
            old.rename(doomed)
            shutil.rmtree(doomed)

    def clear_leftovers(self) -> None:
        """What a killed run left half-written or half-deleted."""
        for leftover in self.folder.glob(f"{TEMP_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)


def gather_rng(device, world: int, generator=None) -> list[dict]:
    """Every rank's random state (torch's CPU one, the device's, and ``generator``'s when given), in rank
    order; every rank calls it, as it gathers across the process group when there are several."""
    import torch
    import torch.distributed as dist

    device = torch.device(device)
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if generator is not None:
        state["generator"] = generator.get_state()
    if world > 1 and dist.is_available() and dist.is_initialized():
        states = [None] * world
        dist.all_gather_object(states, state)
        return states
    return [state]


def save_rng(folder: Path, states: list[dict]) -> None:
    import torch

    for rank, state in enumerate(states):
        torch.save({key: value.cpu() for key, value in state.items()}, folder / f"rng-rank{rank}.pt")


def restore_rng(folder: Path, rank: int, device, generator=None) -> None:
    """Put back this rank's random state as ``gather_rng`` saved it."""
    import torch

    state = torch.load(folder / f"rng-rank{rank}.pt", weights_only=True)
    if isinstance(state, torch.Tensor):
        state = {"generator": state}  # DreamBooth checkpoints written before held the generator's state alone
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    device = torch.device(device)
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if generator is not None:
        generator.set_state(state["generator"])
