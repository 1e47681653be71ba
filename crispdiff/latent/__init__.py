"""Latent diffusion: loading and scaling a VAE for encoding, the latent cache, the latent trainer (the main job)."""
