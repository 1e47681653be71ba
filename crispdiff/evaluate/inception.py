"""FID / KID through torch-fidelity, only when Inception weights exist locally (crispdiff never downloads them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from crispdiff.evaluate.inputs import to_float01

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
