"""Classes the user does not have to write: k-means clusters of the training images, used as class labels.

Why: a small diffusion model trained a few minutes on unlabelled images draws shapeless "confetti", while the same
model conditioned on labels and sampled with classifier-free guidance draws recognisable shapes, and a crude
clustering of the images gives nearly all of that gain (self-guided diffusion, Hu et al. 2023, does the same with
self-supervised features). ``--class_column auto`` clusters the training images into pseudo-classes; the model trains
class-conditionally on them with label dropout, and the saved pipeline, called without labels, samples in the
clusters' mix with guidance (each cluster stays addressable by its id or name, ``cluster-07``).

Everything here runs offline on the CPU in seconds and is a pure function of the pixels and the seed: features are
small thumbnails projected onto their principal components (exact eigendecomposition, no randomised PCA), clusters
come from k-means++ seeded by a ``torch.Generator``, so the same images and seed give the same classes on every
machine and on every resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

#: Thumbnail side the images are reduced to before clustering, and the principal components kept.
THUMBNAIL_SIZE = 16
FEATURE_DIMS = 32

#: With ``--num_auto_classes`` unset: about this many training images per cluster, within the bounds below. Half as
#: many clusters or twice as many gave samples further from the data.
IMAGES_PER_CLASS = 8
MIN_AUTO_CLASSES, MAX_AUTO_CLASSES = 2, 256


def default_num_classes(num_images: int) -> int:
    """How many clusters ``--class_column auto`` makes of ``num_images`` images when not told (0: too few to cluster,
    fewer than two clusters' worth)."""
    if num_images < MIN_AUTO_CLASSES * IMAGES_PER_CLASS:
        return 0
    return int(min(MAX_AUTO_CLASSES, round(num_images / IMAGES_PER_CLASS)))


def class_names(num_classes: int) -> list[str]:
    """``cluster-00`` ... in id order; zero-padded so that sorting the names keeps the ids' order."""
    width = len(str(num_classes - 1))
    return [f"cluster-{i:0{width}d}" for i in range(num_classes)]


def thumbnail_features(images: Callable[[list[int]], torch.Tensor], num_images: int, chunk: int = 1024) -> torch.Tensor:
    """``[N, 3 * THUMBNAIL_SIZE**2]`` float64 features: each image area-averaged to a thumbnail, in [0, 1].

    ``images(indices)`` returns uint8 ``[n, 3, R, R]``; read a chunk at a time so large datasets need no more memory
    than the thumbnails.
    """
    parts = []
    for start in range(0, num_images, chunk):
        batch = images(list(range(start, min(num_images, start + chunk)))).float() / 255.0
        parts.append(F.adaptive_avg_pool2d(batch, THUMBNAIL_SIZE).flatten(1).double())
    return torch.cat(parts)


def principal_components(features: torch.Tensor, dims: int = FEATURE_DIMS) -> torch.Tensor:
    """``features`` centred and projected onto their top ``dims`` principal axes (exact, deterministic)."""
    centred = features - features.mean(dim=0)
    covariance = centred.T @ centred / max(1, len(features) - 1)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    axes = vectors[:, -min(dims, vectors.shape[1]) :].flip(1)
    return centred @ axes


def kmeans(
    features: torch.Tensor, num_classes: int, seed: int, iterations: int = 100, restarts: int = 4
) -> torch.Tensor:
    """Cluster ids (int64 [N]) from k-means with k-means++ seeding, best of ``restarts`` by within-cluster error.

    A cluster left empty is re-seeded at a point far from its centre (:func:`_reseed_empty_clusters`), so every id
    0..k-1 is used.
    """
    x = features.double()
    count = len(x)
    if not 1 <= num_classes <= count:
        raise ValueError(f"cannot make {num_classes} clusters of {count} images")
    generator = torch.Generator().manual_seed(seed)
    best_error, best = math.inf, torch.zeros(count, dtype=torch.long)
    for _ in range(restarts):
        centres = _kmeans_plus_plus(x, num_classes, generator)
        assignment = torch.full((count,), -1, dtype=torch.long)
        for _ in range(iterations):
            distances = torch.cdist(x, centres).square()
            new_assignment = distances.argmin(dim=1)
            if torch.equal(new_assignment, assignment):
                break
            assignment = new_assignment
            sums = torch.zeros_like(centres).index_add_(0, assignment, x)
            sizes = torch.bincount(assignment, minlength=num_classes)
            centres = sums / sizes.clamp_min(1).unsqueeze(1)
            _reseed_empty_clusters(x, centres, distances, assignment, sizes)
        error = float(torch.cdist(x, centres).square().gather(1, assignment.unsqueeze(1)).sum())
        if error < best_error:
            best_error, best = error, assignment.clone()
    return _relabel_by_size(best, num_classes)


def _reseed_empty_clusters(
    x: torch.Tensor, centres: torch.Tensor, distances: torch.Tensor, assignment: torch.Tensor, sizes: torch.Tensor
) -> None:
    """Give each empty cluster its own point (in place): the one farthest from its centre among the points not yet
    moved whose cluster keeps another member.

    Why each its own: two empty clusters re-seeded at the same point would share one centre, and argmin would leave
    one of them empty again at every iteration (k-means++ makes such twins on data with duplicate images).
    """
    error = distances.gather(1, assignment.unsqueeze(1)).squeeze(1).clone()
    for empty in (sizes == 0).nonzero().flatten().tolist():
        error[sizes[assignment] < 2] = -math.inf  # taking a cluster's last point would only empty another
        chosen = int(error.argmax())
        sizes[assignment[chosen]] -= 1
        sizes[empty] += 1
        centres[empty] = x[chosen]
        assignment[chosen] = empty
        error[chosen] = -math.inf


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Arthur & Vassilvitskii 2007: each next centre drawn with probability proportional to squared distance."""
    centres = [x[torch.randint(len(x), (1,), generator=generator)].squeeze(0)]
    nearest = (x - centres[0]).square().sum(dim=1)
    for _ in range(1, k):
        weights = nearest if float(nearest.sum()) > 0 else torch.ones_like(nearest)
        pick = torch.multinomial(weights.float(), 1, generator=generator).item()
        centres.append(x[pick])
        nearest = torch.minimum(nearest, (x - x[pick]).square().sum(dim=1))
    return torch.stack(centres)


def _relabel_by_size(assignment: torch.Tensor, k: int) -> torch.Tensor:
    """Renumber clusters largest first (ties by old id), so ids read the same whatever order k-means found them in."""
    sizes = torch.bincount(assignment, minlength=k)
    order = sorted(range(k), key=lambda c: (-int(sizes[c]), c))
    new_id = torch.empty(k, dtype=torch.long)
    new_id[torch.tensor(order)] = torch.arange(k)
    return new_id[assignment]


def cluster_images(
    images: Callable[[list[int]], torch.Tensor], num_images: int, num_classes: int | None = None, seed: int = 0
) -> tuple[list[str], np.ndarray] | tuple[None, None]:
    """``(class names, class id per image)`` for ``--class_column auto``: k-means on thumbnail principal components.

    ``num_classes`` defaults to :func:`default_num_classes`; it is capped at the number of images. ``(None, None)``
    (unlabelled) when there are too few images for two clusters.
    """
    k = min(num_classes or default_num_classes(num_images), num_images)
    if k < MIN_AUTO_CLASSES:
        return None, None
    features = principal_components(thumbnail_features(images, num_images))
    ids = kmeans(features, k, seed)
    return class_names(k), ids.numpy()


def class_mix(class_ids: np.ndarray, num_classes: int) -> list[float]:
    """Each class's share of the training images, in id order (what an unlabelled call samples from)."""
    counts = np.bincount(np.asarray(class_ids), minlength=num_classes).astype(np.float64)
    return (counts / counts.sum()).tolist()
