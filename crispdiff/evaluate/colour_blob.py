"""The colour-blob indicator: colour-histogram divergence plus a one-sided edge-density deficit.

It rises when images are made of large flat patches of the wrong colour and stays low for noise (see
:func:`colour_blob_score`): the failure crispdiff exists to fix.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from crispdiff.evaluate.inputs import luminance, to_float01

_SOBEL_X = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 8.0


def colour_histogram(images: torch.Tensor | np.ndarray, bins: int = 8, layout_size: int = 16) -> torch.Tensor:
    """Set-level joint RGB histogram (``bins**3`` cells, sums to 1) of the images box-filtered to ~``layout_size`` px.

    Why box-filter first: the histogram should describe the colour *content* (which colours, in what amounts), not
    pixel noise; averaging over blocks removes most of independent per-pixel noise while a wrong-coloured region of
    any reasonable size survives.
    """
    x = to_float01(images)
    block = max(1, x.shape[-1] // layout_size)
    if block > 1:
        x = F.avg_pool2d(x, block)
    q = (x * bins).long().clamp_(0, bins - 1)
    cells = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    counts = torch.bincount(cells.flatten(), minlength=bins**3).double()
    return counts / counts.sum()


def jensen_shannon_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """JSD in bits, in [0, 1]: symmetric and finite even where one histogram has empty cells."""
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mask = a > 0
        return (a[mask] * torch.log2(a[mask] / b[mask])).sum()

    return float(0.5 * kl(p, m) + 0.5 * kl(q, m))


def edge_density(images: torch.Tensor | np.ndarray, threshold: float = 0.1) -> torch.Tensor:
    """Per image: the fraction of pixels whose luminance gradient (Sobel, per pixel) exceeds ``threshold``.

    0.1 is a tenth of the full black-to-white range per pixel: crisp outlines and texture exceed it, smooth gradients
    and the inside of flat colour regions do not.
    """
    y = luminance(to_float01(images))
    kernel = torch.stack([_SOBEL_X, _SOBEL_X.T]).unsqueeze(1)
    grad = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), kernel)
    magnitude = grad.square().sum(dim=1).sqrt()
    return (magnitude > threshold).float().flatten(1).mean(dim=1)


def _quantiles(values: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` evenly spaced quantiles, so that sets of different sizes can be compared point by point."""
    probs = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    return torch.quantile(values.double(), probs)


def one_sided_deficit(real_values: torch.Tensor, fake_values: torch.Tensor, grid: int = 256) -> float:
    """How far the fake distribution falls *below* the real one: mean over quantiles of max(0, q_real - q_fake),
    divided by the real mean. 0 when the fakes have at least as much at every quantile; 1 when they have none.

    Why one-sided and per quantile: too many edges (noise) is a different failure, measured by the sharpness ratios;
    and comparing quantiles rather than means stops a mix of noisy and flat images from cancelling out.
    """
    deficit = (_quantiles(real_values, grid) - _quantiles(fake_values, grid)).clamp_min(0).mean()
    return float(deficit / real_values.double().mean().clamp_min(1e-12))


def colour_blob_score(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray) -> dict[str, float]:
    """The colour-blob indicator: ``colour_hist_jsd + edge_density_deficit`` (0 = like the data; at most 2).

    Definition and why: "blurry colour blobs" are large flat regions of the wrong colour. Two cheap signals capture
    them, and each is blind to the other half:

    * ``colour_hist_jsd``: Jensen-Shannon divergence (bits) between the sets' joint RGB histograms at ~16 px, i.e.
      *wrong colours* in wrong amounts; it barely moves under noise (averaged away) or blur (colours are kept).
    * ``edge_density_deficit``: the one-sided quantile deficit of per-image edge density, i.e. *too flat*; it rises
      with blur and blobs and stays at 0 for noisy images, which have more edges, not fewer.

    Both lie in [0, 1]; their sum is largest only when images are flat *and* wrongly coloured. Compare it with the
    real-vs-real floor (sampling noise alone gives a small positive value).
    """
    real01, fake01 = to_float01(real), to_float01(fake)
    jsd = jensen_shannon_divergence(colour_histogram(real01), colour_histogram(fake01))
    deficit = one_sided_deficit(edge_density(real01), edge_density(fake01))
    return {"colour_hist_jsd": jsd, "edge_density_deficit": deficit, "colour_blob": jsd + deficit}
