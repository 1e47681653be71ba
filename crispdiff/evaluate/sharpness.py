"""Sharpness ratios: generated / real high-frequency energy share and Laplacian variance.

1.0 means "as sharp as the data", below 1 blurry, far above 1 noisy; unlike SWD they say *which way* samples are off.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from crispdiff.evaluate.inputs import luminance, to_float01


def high_frequency_share(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Per image: the share of (mean-removed) luminance spectral energy above half the Nyquist frequency.

    Why this measure: blur removes exactly this band and noise fills it, so the share moves in opposite directions for
    the two failure modes, independently of the image's contrast. Radial frequency is in cycles per pixel (Nyquist is
    0.5), so "above half Nyquist" is radius > 0.25. Constant images read 0.
    """
    y = luminance(to_float01(images))[:, 0].double()
    y = y - y.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(y).abs().square()
    fy = torch.fft.fftfreq(y.shape[-2], dtype=torch.float64)
    fx = torch.fft.fftfreq(y.shape[-1], dtype=torch.float64)
    radius = torch.sqrt(fy[:, None].square() + fx[None, :].square())
    high = (power * (radius > 0.25)).sum(dim=(-2, -1))
    total = power.sum(dim=(-2, -1))
    return (high / total.clamp_min(1e-12)).float()


_LAPLACIAN_3 = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian_variance(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Per image: variance of the 3x3 Laplacian of the luminance (valid region), the classic focus measure."""
    y = luminance(to_float01(images))
    response = F.conv2d(y, _LAPLACIAN_3.view(1, 1, 3, 3))
    return response.flatten(1).var(dim=1)


def sharpness_ratios(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Generated / real high-frequency energy share and Laplacian variance (means over each set).

    1.0 means "as sharp as the data"; < 1 blurry; >> 1 noisy. The raw means are returned too so that a report can show
    both sides. The two sets may have different resolutions, but the ratio is only meaningful at equal ones.
    """
    hf_real, hf_fake = high_frequency_share(real).mean().item(), high_frequency_share(fake).mean().item()
    lv_real, lv_fake = laplacian_variance(real).mean().item(), laplacian_variance(fake).mean().item()
    return {
        "hf_energy_ratio": hf_fake / max(hf_real, 1e-12),
        "laplacian_var_ratio": lv_fake / max(lv_real, 1e-12),
        "hf_energy_real": hf_real,
        "hf_energy_fake": hf_fake,
        "laplacian_var_real": lv_real,
        "laplacian_var_fake": lv_fake,
    }
