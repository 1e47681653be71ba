"""Offline image-quality metrics aimed at the failure crispdiff exists to fix: blurry colour blobs.

FID needs Inception weights that are often not available (and cannot be downloaded on many training machines), so
the default metrics here need no pretrained network at all:

* **Multi-scale sliced Wasserstein distance** (SWD, Karras et al. 2018, "Progressive Growing of GANs", appendix D):
  compares the distributions of small patches at every level of a Laplacian pyramid. The finest level reacts to
  missing or spurious detail (blur, noise), the coarsest to layout and colour structure.
* **Sharpness ratios**: generated / real high-frequency energy share and Laplacian variance. 1.0 means "as sharp as
  the data", below 1 blurry, far above 1 noisy. Unlike SWD they say *which way* the samples are off.
* **Colour-blob indicator**: colour-histogram divergence plus a one-sided edge-density deficit; it rises when images
  are made of large flat patches of the wrong colour and stays low for noise (see :func:`colour_blob_score`).
* **Memorisation**: nearest training image in pixel space and the fraction of near-copies.
* **FID / KID** through torch-fidelity, only when Inception weights exist locally (never downloaded).

Every result is only meaningful beside the same number computed between two disjoint halves of the real data
(:func:`real_vs_real_floor`): that is what "perfect" reads as for the given sample count.

Images are accepted as uint8 (0..255) or float in [0, 1], as torch tensors or numpy arrays, NCHW or NHWC, and
converted with :func:`to_float01`. All randomness comes from ``torch.Generator`` objects seeded from ``seed``, so
every function here is deterministic.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------------
# Input handling


def to_float01(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Convert a batch of images to float32 NCHW RGB in [0, 1] on the CPU.

    Why so permissive: metrics are fed from pipelines (float NCHW), datasets (uint8 NCHW) and ``.npz`` files written by
    other tools (uint8 NHWC), and a silent layout mix-up would produce plausible-looking garbage numbers. Floats far
    outside [0, 1] (for example model-space [-1, 1] tensors) are rejected rather than clipped for the same reason.
    """
    x = torch.from_numpy(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch tensor or numpy array of images, got {type(images).__name__}")
    x = x.detach().cpu()
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images with 4 dimensions (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 colour channels (RGB; composite RGBA first), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0).contiguous()
    if not x.is_floating_point():
        raise TypeError(f"expected uint8 or floating-point images, got {x.dtype}")
    x = x.float()
    if x.numel() and (x.min() < -0.02 or x.max() > 1.02):
        raise ValueError(
            f"float images must lie in [0, 1] (got values in [{x.min():.3f}, {x.max():.3f}]); "
            "convert model-space [-1, 1] tensors with (x + 1) / 2 first"
        )
    return x.clamp(0.0, 1.0).contiguous()


def resize_images(images01: torch.Tensor, size: int) -> torch.Tensor:
    """Resize square images to ``size`` pixels with an antialiased bicubic filter.

    Why antialiased: comparing upscaled samples with the data at the data's resolution must not alias the samples'
    fine detail into spurious high frequencies that the metrics would then read as sharpness or noise.
    """
    if images01.shape[-1] == size and images01.shape[-2] == size:
        return images01
    return F.interpolate(images01, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def _luminance(images01: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma, [N, 1, H, W]: sharpness is perceived mostly in brightness, not chroma."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images01.dtype).view(1, 3, 1, 1)
    return (images01 * weights).sum(dim=1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------------------
# Multi-scale sliced Wasserstein distance

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


# ----------------------------------------------------------------------------------------------------------------------
# Fidelity to a reference image


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


# ----------------------------------------------------------------------------------------------------------------------
# Sharpness


def high_frequency_share(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Per image: the share of (mean-removed) luminance spectral energy above half the Nyquist frequency.

    Why this measure: blur removes exactly this band and noise fills it, so the share moves in opposite directions for
    the two failure modes, independently of the image's contrast. Radial frequency is in cycles per pixel (Nyquist is
    0.5), so "above half Nyquist" is radius > 0.25. Constant images read 0.
    """
    y = _luminance(to_float01(images))[:, 0].double()
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
    y = _luminance(to_float01(images))
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


# ----------------------------------------------------------------------------------------------------------------------
# Colour-blob indicator

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
    y = _luminance(to_float01(images))
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


# ----------------------------------------------------------------------------------------------------------------------
# Memorisation

# A near-copy is closer to a training image than this fraction of the median real-to-nearest-real distance.
NEAR_COPY_FACTOR = 0.25


def _flatten_for_distance(images01: torch.Tensor) -> torch.Tensor:
    return images01.reshape(images01.shape[0], -1)


def _nearest(
    queries: torch.Tensor, keys: torch.Tensor, exclude: torch.Tensor | None = None, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS pixel distance to, and index of, the nearest key for every query (``exclude[i]``: a key index to skip).

    RMS (root of the *mean* squared difference) keeps distances comparable across resolutions.
    """
    q = _flatten_for_distance(queries)
    k = _flatten_for_distance(keys)
    key_norms = k.square().sum(dim=1)
    dims = q.shape[1]
    dists, idxs = [], []
    for start in range(0, len(q), batch_size):
        qb = q[start : start + batch_size]
        sq = qb.square().sum(dim=1, keepdim=True) + key_norms[None] - 2.0 * qb @ k.T
        if exclude is not None:
            rows = torch.arange(len(qb))
            sq[rows, exclude[start : start + batch_size]] = float("inf")
        best, index = sq.min(dim=1)
        dists.append((best.clamp_min(0) / dims).sqrt())
        idxs.append(index)
    return torch.cat(dists), torch.cat(idxs)


def real_nn_distances(train: torch.Tensor | np.ndarray, *, max_queries: int = 500, seed: int = 0) -> torch.Tensor:
    """Leave-one-out nearest-neighbour distances inside the training set (on up to ``max_queries`` random images).

    This is the scale against which a sample's distance to its nearest training image is judged.
    """
    train01 = to_float01(train)
    if len(train01) < 2:
        raise ValueError("the memorisation check needs at least 2 training images")
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(train01), generator=gen)[: min(max_queries, len(train01))]
    dists, _ = _nearest(train01[chosen], train01, exclude=chosen)
    return dists


def nearest_neighbours(
    samples: torch.Tensor | np.ndarray,
    train: torch.Tensor | np.ndarray,
    *,
    threshold: float | None = None,
    threshold_factor: float = NEAR_COPY_FACTOR,
    real_nn_median: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Nearest training image (RMS pixel L2, in [0, 1] units) for each sample, and the fraction of near-copies.

    A near-copy is a sample closer to a training image than ``threshold``. By default the threshold is
    ``threshold_factor`` x the median leave-one-out nearest-neighbour distance among training images: an absolute
    pixel threshold would mean different things on flat-background emoji and on photos, whereas "four times closer
    than real images typically are to each other" does not. Samples are resized to the training resolution first.
    Pass ``real_nn_median`` (from :func:`real_nn_distances`) to reuse it across calls.

    Returns ``distances`` [N] and ``indices`` [N] (tensors), plus floats ``threshold``, ``near_copy_fraction``,
    ``nn_distance_median``, ``real_nn_distance_median`` and ``nn_median_ratio`` (sample / real medians; << 1 is a
    warning sign).
    """
    train01 = to_float01(train)
    samples01 = resize_images(to_float01(samples), train01.shape[-1])
    real_median = real_nn_median
    if real_median is None:
        real_median = float(real_nn_distances(train01, seed=seed).median())
    if threshold is None:
        threshold = threshold_factor * real_median
    distances, indices = _nearest(samples01, train01, batch_size=batch_size)
    median = float(distances.median())
    return {
        "distances": distances,
        "indices": indices,
        "threshold": float(threshold),
        "near_copy_fraction": float((distances < threshold).double().mean()),
        "nn_distance_median": median,
        "real_nn_distance_median": real_median,
        "nn_median_ratio": median / max(real_median, 1e-12),
    }


# ----------------------------------------------------------------------------------------------------------------------
# FID / KID (optional: torch-fidelity plus locally available Inception weights)

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"


def inception_weights_help(missing: str | Path | None = None) -> str:
    """How a user provides the weights: the message shown instead of FID / KID when they are missing."""
    cache = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    found = f"--inception_weights {missing} does not exist" if missing is not None else "no Inception weights found"
    return (
        f"FID/KID skipped: {found}. crispdiff never downloads them. Get torch-fidelity's "
        f"'{INCEPTION_WEIGHTS_FILENAME}' (from https://github.com/toshas/torch-fidelity/releases, on a machine with "
        f"internet) and pass it with --inception_weights PATH, or put it at {cache}. "
        "FID/KID also need: pip install 'crispdiff[metrics]' (torch-fidelity)."
    )


def find_inception_weights(path: str | Path | None = None) -> Path | None:
    """The explicit ``path`` if it exists, else torch-fidelity's file in the torch hub cache, else ``None``."""
    if path is not None:
        candidate = Path(path).expanduser()
        return candidate if candidate.is_file() else None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    return cached if cached.is_file() else None


def _inception_extractor(weights: Path) -> torch.nn.Module:
    """torch-fidelity's InceptionV3 built from a local file only.

    The file is opened with ``weights_only=True`` first so that a file containing anything but tensors is refused before
    torch-fidelity (which unpickles fully) reads it.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a plain state dict"
        raise ValueError(f"{weights} is not a plain PyTorch state dict of Inception weights: {exc}") from exc
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))


@torch.no_grad()
def _inception_features(
    extractor: torch.nn.Module, images01: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    feats = []
    for start in range(0, len(images01), batch_size):
        batch = (images01[start : start + batch_size] * 255.0).round().to(torch.uint8).to(device)
        out = extractor(batch)
        feats.append((out[0] if isinstance(out, (tuple, list)) else out).reshape(len(batch), -1).double().cpu())
    return torch.cat(feats)


def inception_metrics(
    real: torch.Tensor | np.ndarray,
    fake: torch.Tensor | np.ndarray,
    *,
    weights: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 50,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """FID and KID (polynomial-kernel MMD, mean and std over subsets) with torch-fidelity's InceptionV3.

    Never downloads: without torch-fidelity or without a local weights file this returns ``{"fid_status": message}``
    explaining what to install or where to put the file, instead of raising, so an evaluation still reports the
    offline metrics. Values follow torch-fidelity's conventions (uint8 images, resized inside the network).
    """
    try:
        from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
        from torch_fidelity.metric_kid import kid_features_to_metric
    except ImportError:
        return {"fid_status": "FID/KID skipped: torch-fidelity is not installed (pip install 'crispdiff[metrics]')."}
    found = find_inception_weights(weights)
    if found is None:
        return {"fid_status": inception_weights_help(weights)}
    device = torch.device(device)
    extractor = _inception_extractor(found).to(device)
    real_f = _inception_features(extractor, to_float01(real), batch_size, device)
    fake_f = _inception_features(extractor, to_float01(fake), batch_size, device)
    fid = fid_statistics_to_metric(fid_features_to_statistics(real_f), fid_features_to_statistics(fake_f), False)
    subset = min(kid_subset_size, len(real_f), len(fake_f))
    kid = kid_features_to_metric(
        real_f, fake_f, kid_subsets=kid_subsets, kid_subset_size=subset, rng_seed=seed, verbose=False
    )
    return {
        "fid": float(fid["frechet_inception_distance"]),
        "kid_mean": float(kid["kernel_inception_distance_mean"]),
        "kid_std": float(kid["kernel_inception_distance_std"]),
        "fid_status": f"computed with {found}",
    }


# ----------------------------------------------------------------------------------------------------------------------
# Putting it together


def compute_validation_metrics(
    real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, *, seed: int = 0
) -> dict[str, float]:
    """The cheap subset for logging during training: SWD, sharpness ratios and the colour-blob indicator.

    Flat ``{name: float}`` so it can go straight to tensorboard. Fakes are resized to the real resolution.
    With the usual 16 validation images SWD is noisy in absolute terms but still tracks the trend.
    """
    real01 = to_float01(real)
    fake01 = resize_images(to_float01(fake), real01.shape[-1])
    return {**sliced_wasserstein_distance(real01, fake01, seed=seed), **compute_sharpness_metrics(real01, fake01)}


def compute_sharpness_metrics(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray) -> dict[str, float]:
    """The cheap part of :func:`compute_validation_metrics`: the sharpness ratios and the
    colour-blob indicator, without SWD (which costs much more on a CPU). Fakes are resized to the real
    resolution."""
    real01 = to_float01(real)
    fake01 = resize_images(to_float01(fake), real01.shape[-1])
    ratios = sharpness_ratios(real01, fake01)
    out = {"hf_energy_ratio": ratios["hf_energy_ratio"], "laplacian_var_ratio": ratios["laplacian_var_ratio"]}
    out.update(colour_blob_score(real01, fake01))
    return out


def compute_all(
    real: torch.Tensor | np.ndarray,
    fake: torch.Tensor | np.ndarray,
    *,
    seed: int = 0,
    train: torch.Tensor | np.ndarray | None = None,
    memorisation_threshold: float | None = None,
    real_nn_median: float | None = None,
    inception_weights: str | Path | None = None,
    fid: bool = False,
    device: str | torch.device = "cpu",
    swd_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every metric between ``real`` and ``fake``, as a JSON-ready flat dict.

    ``fake`` is resized (antialiased bicubic) to the real resolution first, so upscaled samples are judged against the
    data at the data's resolution. Memorisation is measured only when ``train`` is given (usually the whole reference
    set); FID/KID only when ``fid`` is true or ``inception_weights`` is given, and report a status message instead of
    failing when the weights are missing.
    """
    real01 = to_float01(real)
    fake01 = resize_images(to_float01(fake), real01.shape[-1])
    out: dict[str, Any] = {"num_real": len(real01), "num_fake": len(fake01), "resolution": real01.shape[-1]}
    out.update(sliced_wasserstein_distance(real01, fake01, seed=seed, **(swd_kwargs or {})))
    out.update(sharpness_ratios(real01, fake01))
    out.update(colour_blob_score(real01, fake01))
    if train is not None:
        nn = nearest_neighbours(
            fake01, train, threshold=memorisation_threshold, real_nn_median=real_nn_median, seed=seed
        )
        out.update({k: v for k, v in nn.items() if k not in ("distances", "indices")})
    if fid or inception_weights is not None:
        out.update(inception_metrics(real01, fake01, weights=inception_weights, seed=seed, device=device))
    return out


def split_reference(num_reference: int, num_images: int | None = None, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Indices of two disjoint, equally sized random subsets A and B of the reference set.

    ``A`` is the "real" side of every comparison and ``B`` plays the generator in the floor, so generated-vs-A and
    B-vs-A differ only in who made the images. Each subset has ``min(num_images, num_reference // 2)`` images.
    """
    half = num_reference // 2
    if half < 2:
        raise ValueError(f"the real-vs-real floor needs at least 4 reference images, got {num_reference}")
    size = half if num_images is None else max(2, min(num_images, half))
    perm = torch.randperm(num_reference, generator=torch.Generator().manual_seed(seed))
    return perm[:size], perm[size : 2 * size]


def real_vs_real_floor(
    reference: torch.Tensor | np.ndarray,
    *,
    num_images: int | None = None,
    seed: int = 0,
    memorisation: bool = True,
    memorisation_threshold: float | None = None,
    real_nn_median: float | None = None,
    inception_weights: str | Path | None = None,
    fid: bool = False,
    device: str | torch.device = "cpu",
    swd_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metrics between two disjoint halves (A, B from :func:`split_reference`) of the reference data.

    This is what a perfect generator would score with the same number of images. For memorisation, B is compared with
    the reference minus B (comparing it with itself would read as 100% copies).
    """
    ref01 = to_float01(reference)
    a_idx, b_idx = split_reference(len(ref01), num_images, seed=seed)
    train = None
    if memorisation:
        keep = torch.ones(len(ref01), dtype=torch.bool)
        keep[b_idx] = False
        train = ref01[keep]
    return compute_all(
        ref01[a_idx],
        ref01[b_idx],
        seed=seed,
        train=train,
        memorisation_threshold=memorisation_threshold,
        real_nn_median=real_nn_median,
        inception_weights=inception_weights,
        fid=fid,
        device=device,
        swd_kwargs=swd_kwargs,
    )
