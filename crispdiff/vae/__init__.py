"""VAEs of their own: training an AutoencoderKL on the user's images (``train_vae.py``) and adapting the embedded one
(``--adapt_vae``). Loading and scaling a VAE for encoding stays in :mod:`crispdiff.latent.vae`."""
