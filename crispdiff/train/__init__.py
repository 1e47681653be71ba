"""The one training loop (accelerate), its checkpoints, the pixel trainer and the time budget."""
