"""Training objectives, the optimiser, learning rates, and the model side of pre-training and DreamBooth."""
