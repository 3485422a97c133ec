"""One device rule for every command: the GPU when there is one, in its fast dtype; shown in --help."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from blipdiff.infra.cli import app
from blipdiff.models.devices import DEVICE_HELP, DTYPE_HELP, resolve_device, resolve_dtype, torch_dtype


@pytest.mark.parametrize(("cuda", "mps", "device", "dtype"), [
    (True, False, "cuda", "float16"), (True, True, "cuda", "float16"), (False, True, "mps", "float16"),
    (False, False, "cpu", "float32")])
def test_auto_is_the_gpu_when_there_is_one_in_its_fast_dtype(monkeypatch, cuda, mps, device, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    for name in ("auto", None):
        assert resolve_device(name) == device
    assert resolve_dtype("auto", device) == dtype and torch_dtype(None, device) == getattr(torch, dtype)


def test_a_named_device_or_dtype_is_kept_or_refused_with_the_reason():
    assert resolve_device("cpu") == "cpu" and resolve_dtype("bfloat16", "cuda") == "bfloat16"
    assert resolve_dtype(torch.float16, "cpu") == "float16"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no cuda device"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        resolve_dtype("half", "cpu")


def help_text(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0, result.output
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())


@pytest.mark.parametrize("command", ["generate", "edit", "interpolate", "finetune", "eval", "score", "build"])
def test_every_command_defaults_to_auto_and_says_what_it_means(command):
    text = help_text(command)
    if command != "eval":  # its actors each take the device Ray gives them, by the same rule
        assert f"--device <str> {DEVICE_HELP} [default: auto]" in text
    if command in ("generate", "edit", "interpolate", "eval"):
        assert f"--dtype <str> {DTYPE_HELP} [default: auto]" in text
