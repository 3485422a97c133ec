"""blipdiff: the open, working pipeline behind BLIP-Diffusion (data, training, evaluation)."""

__version__ = "0.1.0"
