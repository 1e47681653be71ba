"""How good an upscale is: fidelity (PSNR, SSIM) and sharpness (high-frequency and Laplacian ratios) against the
originals, for the SR model and for the Lanczos / bicubic upscales it must beat."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from crispdiff.evaluate.fidelity import psnr, ssim
from crispdiff.evaluate.sharpness import sharpness_ratios
from crispdiff.pipelines.sr_model import lanczos_resize


def lanczos_upscale(low01: torch.Tensor, size: int) -> torch.Tensor:
    """What the pipeline returns without an SR model (``sr_strength=0``): Lanczos-3, clamped."""
    return lanczos_resize(low01, (size, size)).clamp(0.0, 1.0)


def bicubic_upscale(low01: torch.Tensor, size: int) -> torch.Tensor:
    """torch's bicubic upscale (a = -0.75), clamped: the other common baseline."""
    return F.interpolate(low01, size=(size, size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def upscale_metrics(upscaled01: torch.Tensor, originals01: torch.Tensor, chunk: int = 100) -> dict[str, float]:
    """Mean per-image PSNR and SSIM, and the hf / Laplacian ratios of ``sharpness_ratios`` (1 = as sharp as the
    originals). PSNR and SSIM run ``chunk`` images at a time: SSIM works in float64, and a thousand 128 px images
    at once need many GB."""
    pairs = [(upscaled01[i : i + chunk], originals01[i : i + chunk]) for i in range(0, len(originals01), chunk)]
    ratios = sharpness_ratios(originals01, upscaled01)
    return {
        "psnr": float(torch.cat([psnr(fake, real) for fake, real in pairs]).mean()),
        "ssim": float(torch.cat([ssim(fake, real) for fake, real in pairs]).mean()),
        "hf_energy_ratio": ratios["hf_energy_ratio"],
        "laplacian_var_ratio": ratios["laplacian_var_ratio"],
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
