"""Non-leaking augmentation (``--augment_prob``, Karras et al. 2022, "Elucidating the design space", appendix C):
mirror or rotate a training sample by 90 degrees and *tell the UNet which transform it got*, so samples drawn with
"no transform" never come out mirrored or rotated, while the shared weights learn from eight views of each image.

The transform reaches the UNet through the class embedding it already has: with N classes (+ the null class), the
training UNet holds one row per (transform, class) pair, laid out so that the untransformed classes keep ids 0..N-1
and the untransformed null class keeps the last id, as in a plain conditional UNet. ``plain_class_embedding`` cuts
the model down to those N + 1 rows for everything sampled or saved (grids, the autoguidance guide, the pipeline): a
plain class-conditional ``UNet2DModel`` that knows nothing of augmentation.

On latents the transform is applied to the cached latent itself. That is not the latent of the transformed image (the
encoder is not equivariant), but those latents are never decoded: they only teach the shared weights, under their own
labels.
"""

from __future__ import annotations

from typing import Any

import torch

from crispdiff.core.errors import FlagError

#: The transforms of a square that keep it on its pixel grid (the dihedral group D4): id 0 leaves it as it is,
#: id k rotates it k % 4 quarter turns and then mirrors it when k >= 4.
NUM_TRANSFORMS = 8


def class_embed_count(num_classes: int, augment_prob: float) -> int:
    """Rows of the training UNet's class embedding: the N classes + the null class, for every transform when
    augmenting."""
    return (num_classes + 1) * (NUM_TRANSFORMS if augment_prob > 0 else 1)


def check_augment_prob(augment_prob: float, num_classes: int) -> None:
    """Refuse an augmentation the UNet could not be told about: one without class labels. (Samples are square:
    every space has one ``sample_size``.)"""
    if not 0.0 <= augment_prob <= 1.0:
        raise FlagError(f"--augment_prob must be within [0, 1], got {augment_prob}")
    if augment_prob > 0 and not num_classes:
        raise FlagError(
            "--augment_prob tells the UNet each sample's transform through its class labels, and this run has none: "
            "pass --class_column (a metadata column, or auto) or drop --augment_prob"
        )


def draw_transforms(batch_size: int, augment_prob: float, generator: torch.Generator) -> torch.Tensor:
    """Each sample's transform id: 0 (none) with probability ``1 - augment_prob``, else one of the seven others."""
    device = generator.device
    transformed = torch.rand(batch_size, generator=generator, device=device) < augment_prob
    which = torch.randint(1, NUM_TRANSFORMS, (batch_size,), generator=generator, device=device)
    return torch.where(transformed, which, torch.zeros_like(which))


def apply_transforms(x: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` with sample i rotated ``transforms[i] % 4`` quarter turns, then mirrored if >= 4."""
    out = x.clone()
    for k in transforms.unique().tolist():
        if k == 0:
            continue
        rows = (transforms == k).nonzero().flatten().to(x.device)
        turned = torch.rot90(x[rows], k % 4, dims=(-2, -1))
        out[rows] = turned.flip(-1) if k >= 4 else turned
    return out


def augmented_labels(labels: torch.Tensor, transforms: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class ids (0..N-1, the null class N) combined with transform ids into the training UNet's class ids.

    Untransformed class c stays c; class c under transform k is ``k * N + c``; the null class under transform k is
    ``8N + (k - 1) mod 8``, so the untransformed null class is the last id, as a plain conditional UNet's is.
    """
    transforms = transforms.to(labels.device)
    null = num_classes * NUM_TRANSFORMS + (transforms + NUM_TRANSFORMS - 1) % NUM_TRANSFORMS
    return torch.where(labels == num_classes, null, transforms * num_classes + labels)


def plain_class_embedding(unet: Any, num_classes: int) -> Any:
    """``unet`` (modified in place and returned) with only the untransformed rows of its class embedding: classes
    0..N-1 and the null class, as ``num_class_embeds = N + 1`` in its config. A no-op on a UNet that has them
    already."""
    embedding = unet.class_embedding
    if embedding.num_embeddings == num_classes + 1:
        return unet
    weight = embedding.weight.detach()
    rows = torch.cat([weight[:num_classes], weight[-1:]]).clone()
    unet.class_embedding = torch.nn.Embedding.from_pretrained(rows, freeze=False)  # no init: the RNG is untouched
    unet.register_to_config(num_class_embeds=num_classes + 1)
    return unet
