"""Judging a VAE: PSNR / SSIM, the seeded whole-class holdout, reconstruction metrics and grids, and measuring the
latent scaling a diffusion model needs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from crispdiff.core.images import uint8_to_model
from crispdiff.evaluate.fidelity import psnr, ssim
from crispdiff.latent.vae import (
    measure_scaling_factor,
    measure_shift_factor,
    sample_posterior,
)

logger = logging.getLogger("crispdiff")


def split_indices(num_images: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) image indices: a seeded shuffle, the held-out part at least one image when asked for."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    held = 0 if fraction <= 0 or num_images < 2 else min(num_images - 1, max(1, round(num_images * fraction)))
    return order[held:].sort().values, order[:held].sort().values


def holdout_split(
    data: Any, fraction: float, seed: int, column: str | None = None, values: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, held-out, held-out classes): whole classes of ``column`` first, then a seeded ``fraction`` of the rest.

    Holding out whole categories measures whether the VAE generalises to kinds of images it never saw, which a
    random split of near-duplicates (skin-tone variants of one emoji) cannot.
    """
    everything = torch.arange(len(data))
    if not column:
        train, held = split_indices(len(data), fraction, seed)
        return train, held, everything[:0]
    rows = data.metadata
    if rows is None or column not in rows[0]:
        available = sorted(rows[0]) if rows else []
        raise ValueError(f"--holdout_column {column!r} is not a metadata column of the data; available: {available}")
    present = {str(row.get(column)) for row in rows}
    missing = sorted(set(values or []) - present)
    if missing:
        raise ValueError(f"--holdout_values {missing} do not occur in column {column!r}; values: {sorted(present)}")
    in_class = torch.tensor([str(row.get(column)) in set(values or []) for row in rows])
    rest = everything[~in_class]
    train, held = split_indices(len(rest), fraction, seed)
    return rest[train], rest[held], everything[in_class]


uint8_to_m11 = uint8_to_model  # the old name, kept importable


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images_m11: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Deterministic reconstructions (posterior mean) in [-1, 1], in batches, on the VAE's device."""
    param = next(vae.parameters())
    outputs = []
    for chunk in images_m11.split(batch_size):
        latents = vae.encode(chunk.to(param.device, param.dtype)).latent_dist.mean
        outputs.append(vae.decode(latents).sample.float().cpu())
    return torch.cat(outputs).clamp(-1.0, 1.0)


def reconstruction_metrics(vae: AutoencoderKL, images_uint8: torch.Tensor) -> dict[str, float]:
    """PSNR, SSIM and the two sharpness ratios (reconstruction / original) on [0, 1] pixels.

    PSNR rewards a blurry average; the hf-energy and Laplacian-variance ratios (1 = as sharp as the input) say
    whether the decoder kept the detail, so both kinds are reported together.
    """
    from crispdiff.evaluate.sharpness import sharpness_ratios

    target = images_uint8.float() / 255.0
    recon = (reconstruct(vae, uint8_to_m11(images_uint8)) + 1.0) / 2.0
    ratios = sharpness_ratios(target, recon)
    return {
        "psnr": float(psnr(recon, target).mean()),
        "ssim": float(ssim(recon, target).mean()),
        "hf_energy_ratio": ratios["hf_energy_ratio"],
        "laplacian_var_ratio": ratios["laplacian_var_ratio"],
    }


def save_reconstruction_grid(vae: AutoencoderKL, images_uint8: torch.Tensor, path: Path) -> None:
    """A PNG with originals on the top row and their reconstructions below, written atomically."""
    from crispdiff.core.images import make_grid, save_image_atomic

    originals = uint8_to_m11(images_uint8)
    grid = make_grid(torch.cat([originals, reconstruct(vae, originals)]), nrow=len(images_uint8))
    save_image_atomic(grid, path)


@torch.no_grad()
@torch.no_grad()
def sample_latents(vae: AutoencoderKL, images_uint8: torch.Tensor, seed: int, batch_size: int = 64) -> torch.Tensor:
    """Posterior samples of these images (what a latent diffusion model sees), on the CPU."""
    param = next(vae.parameters())
    generator = torch.Generator(device=param.device).manual_seed(seed)
    samples = []
    for chunk in uint8_to_m11(images_uint8).split(batch_size):
        posterior = vae.encode(chunk.to(param.device, param.dtype)).latent_dist
        samples.append(sample_posterior(posterior.mean.float(), posterior.logvar.float(), generator).cpu())
    return torch.cat(samples)


def measure_latent_scaling(
    vae: AutoencoderKL, images_uint8: torch.Tensor, seed: int, batch_size: int = 64
) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` from posterior samples of these images (what the diffusion model sees).

    Sampling (not the mean) matches how latent trainers draw their latents; the shift centres them, since a VAE
    trained from scratch has no reason to have zero-mean latents.
    """
    latents = sample_latents(vae, images_uint8, seed, batch_size)
    return measure_scaling_factor(latents), measure_shift_factor(latents)
