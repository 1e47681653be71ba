"""Every metric at once (``compute_all``, the training-time subsets) and the real-vs-real floor; each kind of metric
lives in its own module, all aimed at the failure crispdiff exists to fix: blurry colour blobs.

FID needs Inception weights that are often not available (and cannot be downloaded on many training machines), so
the default metrics here need no pretrained network at all:

* **Multi-scale sliced Wasserstein distance** (SWD, Karras et al. 2018, "Progressive Growing of GANs", appendix D;
  ``distribution.py``): compares the distributions of small patches at every level of a Laplacian pyramid. The
  finest level reacts to missing or spurious detail (blur, noise), the coarsest to layout and colour structure.
* **Sharpness ratios** (``sharpness.py``): generated / real high-frequency energy share and Laplacian variance. 1.0
  means "as sharp as the data", below 1 blurry, far above 1 noisy. Unlike SWD they say *which way* samples are off.
* **Colour-blob indicator** (``colour_blob.py``): colour-histogram divergence plus a one-sided edge-density deficit;
  it rises when images are made of large flat patches of the wrong colour and stays low for noise.
* **Memorisation** (``memorisation.py``): nearest training image in pixel space and the fraction of near-copies.
* **FID / KID** (``inception.py``) through torch-fidelity, only when Inception weights exist locally (never
  downloaded).

Every result is only meaningful beside the same number computed between two disjoint halves of the real data
(:func:`real_vs_real_floor`): that is what "perfect" reads as for the given sample count.

Images are accepted as uint8 (0..255) or float in [0, 1], as torch tensors or numpy arrays, NCHW or NHWC, and
converted with :func:`crispdiff.evaluate.inputs.to_float01`; PSNR / SSIM against a reference image are in
``fidelity.py``. All randomness comes from ``torch.Generator`` objects seeded from ``seed``, so
every function here is deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from crispdiff.evaluate.colour_blob import colour_blob_score
from crispdiff.evaluate.distribution import sliced_wasserstein_distance
from crispdiff.evaluate.inception import inception_metrics
from crispdiff.evaluate.inputs import resize_images, to_float01
from crispdiff.evaluate.memorisation import nearest_neighbours
from crispdiff.evaluate.sharpness import sharpness_ratios


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
