"""Latent diffusion: loading VAEs, the latent cache, the latent trainer, the VAE trainer and VAE adaptation."""
