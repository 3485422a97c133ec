"""Reading and writing the released checkpoint's layout (``Salesforce/blipdiffusion``).

``model_index.json`` lists the components; each lives in its own folder with its own config. Weights
come as pickled ``.bin`` (the hub's, loaded with ``weights_only=True``) or safetensors; folders that the
index does not list (the hub repo also carries ``controlnet/`` and ``vision_encoder/``) are never read
or downloaded. Every weight must be accounted for: a missing, unexpected or misshapen key is an error
that names the keys (the ``position_ids`` buffers aside: transformers 4.x saved them, 5.x does not).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

# The components the pipeline needs, and the optional ones it knows.
REQUIRED = ("qformer", "text_encoder", "tokenizer", "unet", "vae", "scheduler", "image_processor")
OPTIONAL = ("controlnet",)
WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                "diffusion_pytorch_model.bin")
SUBJECT_TOKENIZER = "bert-base-uncased"
SUBJECT_TOKENIZER_COPY = "tokenizer"  # inside qformer/: the checkpoint's own copy of the subject tokenizer
DECODER_TOKEN = "[DEC]"
_SHOWN_KEYS = 12


class CheckpointError(ValueError):
    """The checkpoint cannot be found or does not fit the architecture; the message says why."""


def is_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def resolve(model: str | os.PathLike, components: Sequence[str] = REQUIRED,
            kind: str = "BLIP-Diffusion checkpoint") -> Path:
    """A local checkpoint folder, or a hub id fetched into (or found offline in) the Hugging Face cache,
    downloading only ``model_index.json`` and the ``components`` it lists (with the optional ones the
    pipeline knows, for a whole BLIP-Diffusion checkpoint). ``kind`` names what is wanted in errors
    (a Stable Diffusion checkpoint's U-Net, text encoder and VAE, say)."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path} is not a {kind}: it has no model_index.json")
        read_index(path, components)
        return path
    text = str(model)
    if not is_hub_id(text):
        raise CheckpointError(f"{text}: no such folder (and not a hub id of the form owner/name)")
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError)

    try:
        index = read_index(Path(hf_hub_download(text, "model_index.json")).parent, components, check_folders=False)
        wanted = (*components, *OPTIONAL) if tuple(components) == REQUIRED else tuple(components)
        listed = [name for name in wanted if name in index]
        return Path(snapshot_download(text, allow_patterns=["model_index.json", *(f"{name}/*" for name in listed)]))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise CheckpointError(
            f"{text}: not a local folder, and the hub id is not in the Hugging Face cache while offline "
            "(HF_HUB_OFFLINE=1): download it once online, or pass a local checkpoint folder") from error
    except (RepositoryNotFoundError, EntryNotFoundError) as error:
        raise CheckpointError(f"{text}: no such folder, and no {kind} on the hub under that id") from error


def read_index(root: Path, components: Sequence[str] = REQUIRED, check_folders: bool = True) -> dict[str, Any]:
    """``model_index.json``, which must list ``components`` (each with its folder, when ``check_folders``)."""
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{root / 'model_index.json'}: unreadable ({error})") from error
    missing = [name for name in components if name not in index]
    if missing:
        raise CheckpointError(f"{root / 'model_index.json'} does not list the components {', '.join(missing)}")
    absent = [name for name in components if check_folders and not (root / name).is_dir()]
    if absent:
        raise CheckpointError(f"{root} lacks the component folders {', '.join(absent)} that model_index.json lists")
    return index


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable ({error})") from error


def read_record(folder: Path, file: str, kind: str) -> dict[str, Any]:
    """The record that marks a written checkpoint complete (``file`` in ``folder``); a folder without one is
    not a ``kind``."""
    path = Path(folder) / file
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a {kind}: it has no {file}")
    return json.loads(path.read_text())


def parse_config(config_class: type, data: dict[str, Any], component: str) -> Any:
    """A transformers config from a component's ``config.json``, or an error naming the component."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        return config_class.from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError, StrictDataclassError) as error:
        reason = str(error).replace("\n", " ")
        raise CheckpointError(f"{component}/config.json does not describe a {config_class.__name__} ({reason})") from error


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The one weight file of a component folder, safetensors preferred."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            try:
                if path.suffix == ".safetensors":
                    return load_file(path)
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise CheckpointError(f"{path}: not a readable weight file ({reason})") from error
    raise CheckpointError(f"{folder}: no weights ({' or '.join(WEIGHT_FILES)})")


def _named(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else "")


def raise_for_keys(component: str, missing: Iterable[str], unexpected: Iterable[str],
                   misshapen: Iterable[str] = ()) -> None:
    """Raise naming every missing, unexpected and misshapen key (``position_ids`` buffers aside)."""
    def relevant(keys: Iterable[str]) -> list[str]:
        return [key for key in keys if not key.endswith("position_ids")]

    problems = [f"{what}: {_named(keys)}" for what, keys in (
        ("missing keys", relevant(missing)), ("unexpected keys", relevant(unexpected)),
        ("keys of the wrong shape", list(misshapen))) if keys]
    if problems:
        raise CheckpointError(f"{component}: the weights do not fit the architecture; " + "; ".join(problems))


def load_module(module_class: type[nn.Module], config: Any, folder: Path, component: str) -> nn.Module:
    """Build ``module_class(config)`` without initialising its weights, then fill it from ``folder``."""
    from accelerate import init_empty_weights

    # Parameters start on the meta device (initialising ~1.5B random weights would cost seconds);
    # buffers stay real, since the non-persistent ones are not in the file.
    with init_empty_weights(include_buffers=False):
        module = module_class(config)
    state = read_weights(folder)
    own = module.state_dict()
    raise_for_keys(component, own.keys() - state.keys(), state.keys() - own.keys(), [
        f"{key} {tuple(state[key].shape)} (expected {tuple(own[key].shape)})"
        for key in own.keys() & state.keys() if state[key].shape != own[key].shape])
    state = {key: value for key, value in state.items() if key in own}
    module.load_state_dict(state, strict=False, assign=True)
    return module.eval()


def save_module(module: nn.Module, folder: Path) -> None:
    """``model.safetensors`` with the metadata transformers 4.x requires to load it."""
    state = {key: value.detach().contiguous().cpu() for key, value in module.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def save_tokenizer(tokenizer, folder: Path) -> None:
    """transformers 5 writes only ``tokenizer.json``; the vocabulary files (CLIP's ``vocab.json`` and
    ``merges.txt``, BERT's ``vocab.txt``) go beside it, since the released pipeline's slow tokenizers
    read those."""
    tokenizer.save_pretrained(folder)
    tokenizer.backend_tokenizer.model.save(str(folder))


def has_vocabulary(tokenizer) -> bool:
    """transformers 5 returns a tokenizer of the special tokens alone where it finds no vocabulary."""
    return tokenizer.vocab_size > len(set(tokenizer.all_special_ids))


def require_vocabulary(tokenizer, source: object, embeddings: int) -> None:
    """A tokenizer without vocabulary, or one larger than the embedding table it indexes, is an error."""
    if not has_vocabulary(tokenizer):
        raise CheckpointError(f"{source}: no vocabulary there (vocab.json and merges.txt, vocab.txt or tokenizer.json)")
    if len(tokenizer) > embeddings:
        raise CheckpointError(f"{source}: {len(tokenizer)} tokens, more than the model's {embeddings} embeddings")


def load_diffusers_model(model_class: type, root: Path, component: str, dtype: torch.dtype,
                         label: str | None = None) -> nn.Module:
    """A diffusers model (U-Net, VAE, ControlNet) from ``root / component`` with every key accounted for;
    ``label`` names it in errors (default: ``component``)."""
    label = label or component
    from diffusers.utils import logging as diffusers_logging

    # Saying which format to read spares diffusers' search for the other one and its message about it.
    safetensors = any((root / component).glob("*.safetensors"))
    # Key problems are raised below, naming the keys: diffusers' own warnings about them (newly
    # initialised weights) would only precede the error.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(root, subfolder=component, torch_dtype=dtype,
                                                  use_safetensors=safetensors, output_loading_info=True)
    except (OSError, ValueError) as error:  # diffusers' words for a missing file or a misshapen key
        raise CheckpointError(f"{label}: {str(error).split('. If you want')[0]}") from error
    finally:
        diffusers_logging.set_verbosity(verbosity)
    raise_for_keys(label, info["missing_keys"], info["unexpected_keys"],
                   [str(key) for key in info.get("mismatched_keys", [])])
    return model.eval()


def fetch_controlnet(repo_id: str) -> Path:
    """A Stable Diffusion ControlNet repository (config.json and its weights, safetensors preferred) from
    the hub, or from the Hugging Face cache offline; its local snapshot folder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError)

    try:
        folder = Path(hf_hub_download(repo_id, "config.json")).parent
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise CheckpointError(
            f"controlnet {repo_id}: not a local folder, and the hub id is not in the Hugging Face cache while "
            "offline (HF_HUB_OFFLINE=1): download it once online, or pass a local folder") from error
    except (RepositoryNotFoundError, EntryNotFoundError) as error:
        raise CheckpointError(f"controlnet {repo_id}: no such folder, and no ControlNet on the hub under that id") from error
    for weights in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        try:
            hf_hub_download(repo_id, weights)
            return folder
        except (EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled):
            continue
    raise CheckpointError(f"controlnet {repo_id}: its weights (diffusion_pytorch_model.safetensors or .bin) are "
                          "neither on the hub nor in the Hugging Face cache")


def load_controlnets(root: Path, index: Mapping[str, Any], dtype: torch.dtype) -> nn.Module | None:
    """The ControlNet that ``model_index.json`` lists (the official layout's ``controlnet/``), or several
    (``MultiControlNetModel``: ``controlnet/``, ``controlnet_1/``, ... as diffusers saves them); None when
    it lists none."""
    import diffusers
    from diffusers import MultiControlNetModel

    if "controlnet" not in index:
        return None
    if index["controlnet"][1] != "MultiControlNetModel":
        return load_diffusers_model(diffusers.ControlNetModel, root, "controlnet", dtype)
    names = ["controlnet"]
    while (root / f"controlnet_{len(names)}").is_dir():
        names.append(f"controlnet_{len(names)}")
    return MultiControlNetModel([load_diffusers_model(diffusers.ControlNetModel, root, name, dtype) for name in names])


def load_subject_tokenizer(root: Path, qformer_config: Mapping[str, Any]):
    """The Q-Former's WordPiece tokenizer with ``[DEC]`` added, from the first source that works:
    ``qformer/config.json``'s ``tokenizer`` entry (as the released pipeline reads it), the checkpoint's
    own copy in ``qformer/tokenizer/`` (which ``save_pretrained`` writes), or ``bert-base-uncased``
    from the Hugging Face cache or hub."""
    from transformers import BertTokenizer

    sources = []
    if qformer_config.get("tokenizer"):
        sources.append((f"qformer/config.json's tokenizer entry {qformer_config['tokenizer']!r}",
                        str(qformer_config["tokenizer"])))
    copy = root / "qformer" / SUBJECT_TOKENIZER_COPY
    if copy.is_dir():
        sources.append((f"the checkpoint's copy {copy}", str(copy)))
    sources.append((f"{SUBJECT_TOKENIZER} from the Hugging Face cache or hub", SUBJECT_TOKENIZER))
    failures = []
    for description, source in sources:
        try:
            tokenizer = BertTokenizer.from_pretrained(source, truncation_side="right")
        except (OSError, ValueError) as error:
            failures.append(f"{description}: {str(error).splitlines()[0]}")
            continue
        if not has_vocabulary(tokenizer):
            failures.append(f"{description}: no vocabulary (vocab.txt or tokenizer.json) there")
            continue
        if tokenizer.bos_token != DECODER_TOKEN:
            tokenizer.add_special_tokens({"bos_token": DECODER_TOKEN})
        return tokenizer
    raise CheckpointError(
        "no tokenizer for the Q-Former's subject text. It comes from (1) a `tokenizer` entry in "
        "qformer/config.json, (2) the checkpoint's own copy in qformer/tokenizer/ (blipdiff's save_pretrained "
        f"writes it), or (3) {SUBJECT_TOKENIZER} in the Hugging Face cache (download it once online). Tried: "
        + "; ".join(failures))
