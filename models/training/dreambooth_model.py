"""The model side of DreamBooth training: which modules train (the U-Net, and the text encoder when asked;
whole or as LoRA adapters), the photos' latent distributions, and each step's draw of samples."""

from __future__ import annotations

from pathlib import Path

from blipdiff.models.stable_diffusion import TEXT_LORA_TARGETS, UNET_LORA_TARGETS


def draw_batch(instances: tuple, classes: tuple | None, batch_size: int, generator) -> tuple:
    """One step's latent distributions (mean, std) and prompt rows: ``batch_size`` subject photos (row 0,
    the instance prompt), then, with prior preservation, as many class images (row 1, the class prompt)."""
    import torch

    picks = torch.randint(0, len(instances[0]), (batch_size,), generator=generator)
    means, stds, rows = [instances[0][picks]], [instances[1][picks]], [0] * batch_size
    if classes is not None:
        chosen = torch.randint(0, len(classes[0]), (batch_size,), generator=generator)
        means.append(classes[0][chosen])
        stds.append(classes[1][chosen])
        rows += [1] * batch_size
    return torch.cat(means), torch.cat(stds), rows


class TrainedModules:
    """The modules a run trains (the U-Net, and the text encoder when asked), by name."""

    def __init__(self, pipe, *, mode: str, lora_rank: int, train_text_encoder: bool):
        import torch

        self.mode, self.train_text_encoder = mode, train_text_encoder
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        if mode == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            pipe.unet.requires_grad_(False)
            pipe.unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank,
                                             init_lora_weights="gaussian", target_modules=UNET_LORA_TARGETS))
            if train_text_encoder:
                # peft's own injection: transformers' add_adapter asks for a newer peft than the U-Net needs.
                inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_rank,
                                                   init_lora_weights="gaussian", target_modules=TEXT_LORA_TARGETS),
                                        pipe.text_encoder)
        elif train_text_encoder:
            pipe.text_encoder.requires_grad_(True)
        self.modules = torch.nn.ModuleDict({"unet": pipe.unet, "text_encoder": pipe.text_encoder})

    def state(self) -> dict[str, dict]:
        """What training changes, by module name."""
        from peft import get_peft_model_state_dict

        names = ["unet"] + (["text_encoder"] if self.train_text_encoder else [])
        if self.mode == "lora":
            return {name: get_peft_model_state_dict(self.modules[name]) for name in names}
        return {name: self.modules[name].state_dict() for name in names}

    def load(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        for name, module in self.modules.items():
            path = folder / f"{name}.safetensors"
            if path.is_file():
                if self.mode == "lora":
                    set_peft_model_state_dict(module, load_file(path))
                else:
                    module.load_state_dict(load_file(path), strict=False)


def encode_latent_distributions(pipe, photos: list[Path], resolution: int, device):
    """The photos' latent distributions (mean, std), Resize + CenterCrop to ``resolution``."""
    import torch
    from PIL import Image

    from blipdiff.models.blip_diffusion.image_processor import resize_center_crop, to_signed_tensor

    with torch.no_grad():
        means, stds = [], []
        for start in range(0, len(photos), 8):
            pixels = torch.stack([to_signed_tensor(resize_center_crop(Image.open(path).convert("RGB"), resolution))
                                  for path in photos[start:start + 8]]).to(device)
            posterior = pipe.vae.encode(pixels).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)
