"""Model code: BLIP-Diffusion's subject encoder, training and fine-tuning, and the stage models.

The stage models' default hub ids live here, where the command line can import them cheaply."""

DEFAULT_BLIP2 = "Salesforce/blip2-opt-6.7b"
DEFAULT_CLIPSEG = "CIDAS/clipseg-rd64-refined"
