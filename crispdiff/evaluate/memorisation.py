"""Memorisation: the nearest training image of each sample in pixel space and the fraction of near-copies."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from crispdiff.evaluate.inputs import resize_images, to_float01

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


#: Below this ``nn_median_ratio`` the samples lie nearer to their nearest training image than half the distance
#: between neighbouring training images: the model reproduces its data more than it makes new images (new real images
#: of the same design sit near 1).
COPYING_RATIO = 0.5


def copy_check(
    samples: torch.Tensor | np.ndarray, train: torch.Tensor | np.ndarray, *, seed: int = 0
) -> tuple[dict[str, float], str | None]:
    """The end-of-training form of :func:`nearest_neighbours`: ``nn_median_ratio`` and ``near_copy_fraction`` of
    ``samples`` against the training images, and a warning when the ratio is under ``COPYING_RATIO``.

    Why: on a few hundred or thousand images, long runs drift from making new images to reproducing the training
    ones, and nothing else a run reports (sharpness, SWD against the training images) gets worse when they do.
    """
    found = nearest_neighbours(samples, train, seed=seed)
    ratio, fraction = found["nn_median_ratio"], found["near_copy_fraction"]
    warning = None
    if ratio < COPYING_RATIO:
        warning = (
            f"the samples lie {ratio:.2f}x as far from their nearest training image as the training images lie from "
            f"each other, {fraction:.0%} of them near-copies: the model is reproducing its {len(train)} training "
            "images more than making new ones. Fewer steps (--max_train_steps, --time_budget_minutes), more images "
            "or --augment_prob 0.4 give new ones; `crispdiff evaluate DIR --reference YOUR_IMAGES` measures it on "
            "more samples."
        )
    return {"nn_median_ratio": ratio, "near_copy_fraction": fraction}, warning
