"""The VAE trainer's forward step and its losses: L1 reconstruction, KL, the spectral-amplitude loss that keeps
edges, scale equivariance and decoder noise. The GAN losses are in :mod:`crispdiff.train.gan` (shared with SR
training)."""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from crispdiff.latent.vae import (
    sample_posterior,
)

logger = logging.getLogger("crispdiff")


class AutoencoderStep(nn.Module):
    """Encode, sample and decode in one ``forward`` so distributed wrappers see a single call.

    Calling ``vae.encode`` / ``vae.decode`` on a DDP-wrapped model would bypass DDP's gradient synchronisation;
    this wrapper is what gets passed to ``accelerator.prepare``. With a frozen encoder the encoding runs without
    building a graph. With ``scale_equivariance`` the same call also decodes the latent pooled 2x (training only).
    """

    def __init__(
        self, vae: AutoencoderKL, frozen_encoder: bool, decoder_noise: float = 0.0, scale_equivariance: bool = False
    ):
        super().__init__()
        self.vae = vae
        self.frozen_encoder = frozen_encoder
        self.decoder_noise = decoder_noise
        self.scale_equivariance = scale_equivariance

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> AutoencoderOutputs:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_encoder):
            posterior = self.vae.encode(images).latent_dist
        latents = sample_posterior(posterior.mean, posterior.logvar, generator)
        if self.decoder_noise > 0 and self.training:
            latents = add_decoder_noise(latents, self.decoder_noise, generator)
        pooled = None
        if self.scale_equivariance and self.training:
            pooled = self.vae.decode(F.avg_pool2d(latents, 2)).sample
        return AutoencoderOutputs(self.vae.decode(latents).sample, posterior.mean, posterior.logvar, pooled)


class AutoencoderOutputs(NamedTuple):
    """What one training forward returns; ``pooled_reconstruction`` decodes the 2x-pooled latent (or is None)."""

    reconstruction: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor
    pooled_reconstruction: torch.Tensor | None = None


def scale_equivariance_loss(pooled_reconstruction: torch.Tensor, images: torch.Tensor, kind: str) -> torch.Tensor:
    """Reconstruction loss between the pooled latent's decoding and the images pooled by the same factor.

    A 2x average pool of an f-times-downsampled latent lines up with a 2x pool of the image, so a latent whose
    channels code the image's structure at each position (rather than arbitrary high-frequency codes) satisfies
    both. Latents like that are what a small diffusion model learns fastest.
    """
    factor = images.shape[-1] // pooled_reconstruction.shape[-1]
    return reconstruction_loss(pooled_reconstruction, F.avg_pool2d(images, factor), kind)


def add_decoder_noise(latents: torch.Tensor, max_std: float, generator: torch.Generator | None) -> torch.Tensor:
    """``latents + std * eps`` with one std per image drawn uniformly in [0, max_std] (--decoder_noise).

    Uniform stds keep clean and near-clean latents in every batch, so reconstructions of exact latents stay sharp
    while the decoder learns to map slightly-off latents (a diffusion model's samples) back onto clean images.
    """
    shape = (latents.shape[0],) + (1,) * (latents.dim() - 1)
    std = max_std * torch.rand(shape, generator=generator, device=latents.device, dtype=latents.dtype)
    eps = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return latents + std * eps


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean absolute (l1) or squared (l2) error per pixel value, in fp32."""
    diff = reconstruction.float() - target.float()
    return diff.abs().mean() if kind == "l1" else diff.square().mean()


def kl_per_value(mean: torch.Tensor, logvar: torch.Tensor, num_values: int) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over each latent, divided by the image's pixel values, averaged over the batch."""
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))
    return kl.mean() / num_values


def spectral_amplitude_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the images' Fourier amplitudes (orthonormal 2-D FFT per channel), in fp32.

    Why: an L1/L2 pixel loss under uncertainty about where an edge lies is minimised by averaging the candidates,
    which removes high-frequency energy: the blur this VAE exists to avoid. The amplitude spectrum ignores phase
    (position), so it charges the decoder for missing detail even where it cannot place it exactly, as the focal
    frequency loss of Jiang et al. 2021 does, without a discriminator's cost.
    """
    spectrum = torch.fft.rfft2(reconstruction.float(), norm="ortho")
    reference = torch.fft.rfft2(target.float(), norm="ortho")
    amplitude = (spectrum.real.square() + spectrum.imag.square() + 1e-12).sqrt()
    return (amplitude - reference.abs()).abs().mean()
