"""Where models run and in what precision: one rule for every command.

``auto`` (every command's default) is the GPU when there is one (CUDA, else Apple's MPS), else the CPU;
the ``auto`` dtype is the fast one for that device: float16 on a GPU (the released checkpoint's own
precision), float32 on the CPU (where half precision is slow or missing). torch is imported only when a
device is chosen, so the configs that name these defaults stay light to import.
"""

from __future__ import annotations

from typing import Literal

AUTO = "auto"
DEVICE_HELP = "torch device: auto (the GPU when there is one, else cpu), cpu, cuda, cuda:1, mps, ..."
DTYPE_HELP = "auto (float16 on a GPU, float32 on the CPU), float32, float16 or bfloat16."
DType = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES = ("float16", "bfloat16", "float32")


def resolve_device(name=AUTO) -> str:
    """The torch device ``name`` (a string or a ``torch.device``) means: ``auto`` (or None) picks by the
    rule above; any other must be a device this machine has, else a ValueError saying why."""
    import torch

    if name is None or name == AUTO:
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    name = str(name)
    check_device(name)
    return name


def resolve_dtype(name, device) -> str:
    """The dtype's name (``float16``, ...) that ``name`` (a name, a ``torch.dtype``, ``auto`` or None)
    means on ``device``."""
    if name is None or name == AUTO:
        return "float32" if str(device).split(":")[0] == "cpu" else "float16"
    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected auto or one of {', '.join(DTYPES)}")
    return name


def torch_dtype(name, device):
    """``resolve_dtype`` as the torch dtype itself."""
    import torch

    return getattr(torch, resolve_dtype(name, device))


def check_device(name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name}: not a torch device ({error})") from error
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "device_count"):
        raise ValueError(f"--device {name}: blipdiff runs on cpu, cuda, xpu or mps devices")
    count = backend.device_count() if backend.is_available() else 0
    if count == 0:
        raise ValueError(f"--device {name}: this torch build or machine has no {device.type} device")
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} {device.type} device(s), numbered from 0")


def resolve_placement(config):
    """A copy of a config with ``device`` and ``dtype`` fields made concrete, so that what it records (its
    run file, its sidecar) is what was used."""
    device = resolve_device(config.device)
    return config.model_copy(update={"device": device, "dtype": resolve_dtype(config.dtype, device)})
