"""Model code: BLIP-Diffusion's subject encoder, training and fine-tuning, and the stage models.

The stage models' default hub ids live here, where the command line can import them cheaply."""

DEFAULT_BLIP2 = "Salesforce/blip2-opt-6.7b"
DEFAULT_CLIPSEG = "CIDAS/clipseg-rd64-refined"
# DreamBench's metric models (DreamBooth's protocol): DINO ViT-S/16 and CLIP ViT-B/32.
DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
