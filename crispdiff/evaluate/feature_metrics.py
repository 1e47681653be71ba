"""Precision, recall, density and coverage of generated images in a feature space (any encoder's vectors).

SWD compares patch statistics: a grid of sharp, well-coloured but shapeless figures scores close to real images.
These four compare whole images by where they land in a feature space that knows what things are (e.g. a classifier
trained on images of the same family), so they tell "looks like some real image" (precision, density) from "every
kind of real image is produced" (recall, coverage):

- improved precision and recall (Kynkaanniemi et al. 2019): each real (resp. generated) vector gets a ball reaching
  its k-th nearest neighbour among the real (resp. generated) vectors; precision is the share of generated vectors
  inside some real ball, recall the share of real vectors inside some generated ball;
- density and coverage (Naeem et al. 2020): density counts how many real balls hold each generated vector (divided by
  k; about 1 for samples like the data, robust to real outliers), coverage is the share of real balls holding at least
  one generated vector (robust to generated outliers).

None has an absolute scale: report each beside its real-vs-real value (two disjoint sets of real images).
"""

from __future__ import annotations

import torch

__all__ = ["feature_precision_recall", "kth_neighbour_radii", "pairwise_distances"]

#: Rows of the distance matrix computed at once (1,000 x 1,000 vectors fit in one chunk).
DISTANCE_CHUNK = 2048


def pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[len(a), len(b)]`` in float64 (exact ties and small sets stay stable)."""
    a64, b64 = a.double(), b.double()
    return torch.cat([torch.cdist(a64[i : i + DISTANCE_CHUNK], b64) for i in range(0, len(a64), DISTANCE_CHUNK)])


def kth_neighbour_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each vector to its k-th nearest other vector of the same set (the radius of its ball)."""
    if len(features) <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} vectors, got {len(features)}")
    distances = pairwise_distances(features, features)
    distances.fill_diagonal_(float("inf"))  # a vector is not its own neighbour
    return distances.kthvalue(k, dim=1).values


def feature_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    """``precision``, ``recall``, ``density`` and ``coverage`` of ``fake`` vectors against ``real`` ones ``[N, D]``."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected two [N, D] feature sets of one width, got {tuple(real.shape)}, {tuple(fake.shape)}")
    real_radii = kth_neighbour_radii(real, k)
    fake_radii = kth_neighbour_radii(fake, k)
    fake_to_real = pairwise_distances(fake, real)  # [M, N]
    inside_real = fake_to_real <= real_radii[None, :]  # generated i inside real j's ball
    inside_fake = fake_to_real <= fake_radii[:, None]  # real j inside generated i's ball
    return {
        "precision": inside_real.any(dim=1).double().mean().item(),
        "recall": inside_fake.any(dim=0).double().mean().item(),
        "density": inside_real.double().sum(dim=1).mean().item() / k,
        "coverage": (fake_to_real.min(dim=0).values <= real_radii).double().mean().item(),
    }
