"""crispdiff: train small, fast and sharp diffusion models and ship them as diffusers pipelines."""

__version__ = "0.1.0"
