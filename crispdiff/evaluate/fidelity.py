"""Fidelity of an image to its reference: per-image PSNR and SSIM (reconstructions, upscales)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1] (peak 1)."""
    mse = (reconstruction.float() - target.float()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(reconstruction: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03) of images in [0, 1].

    Computed per channel over the valid region (no padding) and averaged, like scikit-image with
    ``gaussian_weights=True``. The Gaussian is applied as two 1-D passes (float64 convolutions have no fast CPU
    kernels, and 2 x 11 taps cost a fifth of 11 x 11).
    """
    x, y = reconstruction.double(), target.double()
    channels = x.shape[1]
    taps = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-0.5 * (taps / sigma) ** 2)
    g = (g / g.sum()).to(x.device)
    rows = g.view(1, 1, window, 1).expand(channels, 1, window, 1)
    cols = g.view(1, 1, 1, window).expand(channels, 1, 1, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).float()
