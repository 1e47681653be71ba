"""Multi-scale sliced Wasserstein distance (SWD, Karras et al. 2018, "Progressive Growing of GANs", appendix D): how
far the distributions of small patches of two image sets are apart at every level of a Laplacian pyramid.

The finest level reacts to missing or spurious detail (blur, noise), the coarsest to layout and colour structure. It
needs no pretrained network; all randomness comes from ``torch.Generator`` objects seeded from ``seed``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from crispdiff.evaluate.inputs import to_float01

_BINOMIAL_5 = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)


def _pyr_down(x: torch.Tensor) -> torch.Tensor:
    """One Gaussian-pyramid step: 5x5 binomial blur (the Burt-Adelson kernel, reflect-padded), every second pixel.

    Written as shifted, strided slices that compute only the kept outputs, which on CPU is several times faster than
    a depthwise ``conv2d`` followed by subsampling, and the same numbers.
    """
    height, width = x.shape[-2:]
    mode = "reflect" if min(height, width) > 2 else "replicate"
    padded = F.pad(x, (2, 2, 2, 2), mode=mode)
    out_h, out_w = (height + 1) // 2, (width + 1) // 2
    rows = sum(w * padded[..., k : k + 2 * out_w - 1 : 2] for k, w in enumerate(_BINOMIAL_5))
    return sum(w * rows[..., k : k + 2 * out_h - 1 : 2, :] for k, w in enumerate(_BINOMIAL_5))


def _upsample_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Double one axis: zero insertion and the binomial blur with gain 2, in polyphase form (edges replicated).

    Even outputs are (x[i-1] + 6 x[i] + x[i+1]) / 8 and odd outputs (x[i] + x[i+1]) / 2, exactly what blurring the
    zero-inserted signal gives, without computing the zeros.
    """
    n = x.shape[dim]
    prev = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim=dim)
    nxt = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim=dim)
    even = (prev + 6.0 * x + nxt) / 8.0
    odd = (x + nxt) / 2.0
    return torch.stack([even, odd], dim=dim + 1).flatten(dim, dim + 1)


def _pyr_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Expand to twice the size (the inverse pyramid step), cropped to ``size`` for odd source sizes."""
    up = _upsample_axis(_upsample_axis(x, x.ndim - 1), x.ndim - 2)
    return up[..., : size[0], : size[1]]


def laplacian_pyramid(images: torch.Tensor, min_resolution: int = 16) -> list[torch.Tensor]:
    """Band-pass levels from the finest down, ending with the low-pass residual at >= ``min_resolution`` pixels.

    For 64 px images and ``min_resolution=16`` this gives three levels: 64 (detail), 32 (detail), 16 (low-pass),
    the decomposition ProGAN's SWD is defined on.
    """
    levels = []
    current = images
    while math.ceil(min(current.shape[-2:]) / 2) >= min_resolution:
        smaller = _pyr_down(current)
        levels.append(current - _pyr_up(smaller, current.shape[-2:]))
        current = smaller
    levels.append(current)
    return levels


def _random_patch_descriptors(
    level: torch.Tensor, patches_per_image: int, patch_size: int, generator: torch.Generator, chunk: int = 256
) -> torch.Tensor:
    """``patches_per_image`` random ``patch_size`` squares per image, flattened to [N * P, C, patch_size**2].

    Positions are drawn from ``generator`` only (not from the pixels), so two sets of equal size get the same
    positions: that makes SWD(a, a) exactly 0 and SWD(a, b) == SWD(b, a).
    """
    n, c, h, w = level.shape
    if h < patch_size or w < patch_size:
        raise ValueError(f"pyramid level of {h}x{w} px is smaller than the {patch_size}x{patch_size} SWD patch")
    ys = torch.randint(0, h - patch_size + 1, (n, patches_per_image), generator=generator)
    xs = torch.randint(0, w - patch_size + 1, (n, patches_per_image), generator=generator)
    offsets = torch.arange(patch_size)
    pixel_index = (ys[:, :, None, None] + offsets[:, None]) * w + (xs[:, :, None, None] + offsets)  # N, P, p, p
    pixel_index = pixel_index.reshape(n, 1, -1)
    flat = level.reshape(n, c, h * w)
    out = []
    for start in range(0, n, chunk):
        idx = pixel_index[start : start + chunk]
        gathered = torch.gather(flat[start : start + chunk], 2, idx.expand(-1, c, -1))
        gathered = gathered.reshape(-1, c, patches_per_image, patch_size * patch_size).transpose(1, 2)
        out.append(gathered.reshape(-1, c, patch_size * patch_size))
    return torch.cat(out)


def _normalise_descriptors(desc: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit std per colour channel over the whole set, flattened to [M, C * p * p].

    Each set is normalised by its own statistics (as ProGAN describes), so SWD measures the *shape* of the patch
    distribution; global colour shifts are the colour-blob indicator's job.
    """
    std, mean = torch.std_mean(desc, dim=(0, 2), keepdim=True)
    return ((desc - mean) / std.clamp_min(1e-8)).reshape(desc.shape[0], -1)


def _sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, num_repeats: int, num_directions: int, generator: torch.Generator
) -> float:
    """Mean over repeats and random unit directions of the 1D W1 between projections (sorted, equal counts)."""
    results = []
    for _ in range(num_repeats):
        directions = torch.randn(a.shape[1], num_directions, generator=generator)
        directions /= directions.norm(dim=0, keepdim=True)
        # [directions, descriptors] rows, sorted in place with numpy: its vectorised sort is an order of magnitude
        # faster than torch.sort on CPU for this shape.
        proj_a = (directions.T @ a.T).numpy()
        proj_b = (directions.T @ b.T).numpy()
        proj_a.sort(axis=1)
        proj_b.sort(axis=1)
        np.subtract(proj_a, proj_b, out=proj_a)
        results.append(float(np.abs(proj_a, out=proj_a).mean(dtype=np.float64)))
    return float(np.mean(results))


def sliced_wasserstein_distance(
    real: torch.Tensor | np.ndarray,
    fake: torch.Tensor | np.ndarray,
    *,
    seed: int = 0,
    patches_per_image: int = 128,
    patch_size: int = 7,
    num_repeats: int = 4,
    num_directions: int = 128,
    min_resolution: int = 16,
) -> dict[str, float]:
    """Multi-scale SWD between two image sets, x1e3, per pyramid level and averaged.

    Returns ``{"swd_64": ..., "swd_32": ..., "swd_16": ..., "swd_avg": ...}`` (keys named after each level's size).
    Both sets must have the same resolution. When the sets differ in size, the larger one's descriptors are
    subsampled (seeded) to the smaller count so the sorted projections can be compared one to one.
    Lower is better, and only comparable with the floor: two disjoint random sets of real images read above 0.
    """
    real01, fake01 = to_float01(real), to_float01(fake)
    if real01.shape[-2:] != fake01.shape[-2:]:
        raise ValueError(
            f"SWD needs equal resolutions, got {tuple(real01.shape[-2:])} and {tuple(fake01.shape[-2:])}; "
            "resize with crispdiff.evaluate.metrics.resize_images first"
        )
    pyramids = (laplacian_pyramid(real01, min_resolution), laplacian_pyramid(fake01, min_resolution))
    out: dict[str, float] = {}
    direction_gen = torch.Generator().manual_seed(seed)
    for level_index, (level_real, level_fake) in enumerate(zip(*pyramids)):
        descs = []
        for level in (level_real, level_fake):
            patch_gen = torch.Generator().manual_seed(seed * 1000 + 1 + level_index)
            descs.append(_random_patch_descriptors(level, patches_per_image, patch_size, patch_gen))
        count = min(len(descs[0]), len(descs[1]))
        subsample_gen = torch.Generator().manual_seed(seed * 1000 + 500 + level_index)
        descs = [d if len(d) == count else d[torch.randperm(len(d), generator=subsample_gen)[:count]] for d in descs]
        a, b = (_normalise_descriptors(d) for d in descs)
        value = _sliced_wasserstein(a, b, num_repeats, num_directions, direction_gen)
        out[f"swd_{level_real.shape[-1]}"] = value * 1e3
    out["swd_avg"] = float(np.mean(list(out.values())))
    return out
