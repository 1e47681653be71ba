"""Fine-tuning a pretrained UNet (all, decoder only, or LoRA) with its own schedule."""
