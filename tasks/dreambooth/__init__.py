"""``blipdiff dreambooth``: its config, the class images of prior preservation, and training on Ray Train."""
