"""How good an upscale is: fidelity (PSNR, SSIM) and sharpness (high-frequency and Laplacian ratios) against the
originals, for the SR model and for the Lanczos / bicubic upscales it must beat."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from crispdiff.evaluate.metrics import high_frequency_share, laplacian_variance, psnr, ssim
from crispdiff.pipelines.sr_model import lanczos_resize


def lanczos_upscale(low01: torch.Tensor, size: int) -> torch.Tensor:
    """What the pipeline returns without an SR model (``sr_strength=0``): Lanczos-3, clamped."""
    return lanczos_resize(low01, (size, size)).clamp(0.0, 1.0)


def bicubic_upscale(low01: torch.Tensor, size: int) -> torch.Tensor:
    """torch's bicubic upscale (a = -0.75), clamped: the other common baseline."""
    return F.interpolate(low01, size=(size, size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def upscale_metrics(upscaled01: torch.Tensor, originals01: torch.Tensor, chunk: int = 100) -> dict[str, float]:
    """Mean per-image PSNR and SSIM, and the hf / Laplacian ratios (1 = as sharp as the originals).

    The ratios are of set means, as ``sharpness_ratios`` computes them; everything is computed ``chunk`` images at
    a time, so a thousand 128 px images need a few hundred MB rather than many GB (SSIM works in float64).
    """
    values: dict[str, list[torch.Tensor]] = {k: [] for k in ("psnr", "ssim", "hf", "hf_ref", "lap", "lap_ref")}
    for start in range(0, len(originals01), chunk):
        fake, real = upscaled01[start : start + chunk], originals01[start : start + chunk]
        values["psnr"].append(psnr(fake, real))
        values["ssim"].append(ssim(fake, real))
        values["hf"].append(high_frequency_share(fake))
        values["hf_ref"].append(high_frequency_share(real))
        values["lap"].append(laplacian_variance(fake))
        values["lap_ref"].append(laplacian_variance(real))
    mean = {k: float(torch.cat(v).mean()) for k, v in values.items()}
    return {
        "psnr": mean["psnr"],
        "ssim": mean["ssim"],
        "hf_energy_ratio": mean["hf"] / max(mean["hf_ref"], 1e-12),
        "laplacian_var_ratio": mean["lap"] / max(mean["lap_ref"], 1e-12),
    }


@torch.no_grad()
def compare_upscalers(
    upscale: Callable[[torch.Tensor], torch.Tensor],
    low_uint8: torch.Tensor,
    high_uint8: torch.Tensor,
    batch_size: int = 64,
) -> dict[str, dict[str, float]]:
    """Metrics of ``upscale`` (float [B, 3, h, w] in [0, 1] -> [B, 3, H, W]) beside Lanczos and bicubic, on pairs."""
    size = high_uint8.shape[-1]
    low01, high01 = low_uint8.float() / 255.0, high_uint8.float() / 255.0
    outputs = torch.cat([upscale(low01[i : i + batch_size]).float().cpu() for i in range(0, len(low01), batch_size)])
    return {
        "sr": upscale_metrics(outputs.clamp(0.0, 1.0), high01),
        "lanczos": upscale_metrics(lanczos_upscale(low01, size), high01),
        "bicubic": upscale_metrics(bicubic_upscale(low01, size), high01),
    }
