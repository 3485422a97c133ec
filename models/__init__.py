"""Model code: BLIP-Diffusion's subject encoder, training and fine-tuning, and the stage models."""
