"""SDXL's micro-conditioning: the ``time_ids`` the SDXL UNet gets beside the text, one row per training latent.

SDXL was trained knowing each picture's original size, where the training crop was taken and the size asked for
(``original_size + crop_top_left + target_size``, the six numbers of ``StableDiffusionXLPipeline._get_add_time_ids``).
diffusers' SDXL scripts give it those of every training image; so does crispdiff, for the crops its latent cache
really encoded: the original size read from the file (EXIF rotation applied), the crop's top-left corner in the image
resized to ``--resolution`` on its short side (mirrored for a flipped variant: the crop as seen in the flipped
image, which is what a flip-then-crop pipeline reports), and the training resolution as the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from crispdiff.core.errors import DataError
from crispdiff.data.batches import crop_origin
from crispdiff.data.decode import resized_size
from crispdiff.data.loading import original_sizes


@dataclass
class MicroConditioning:
    """Per image its original ``(height, width)``, and per cached latent variant its crop's ``(top, left)``."""

    original_sizes: torch.Tensor  # int64 [N, 2]
    crop_top_lefts: torch.Tensor  # int64 [N, V, 2]: variant = crop * num_flips + flipped, as in the latent cache
    resolution: int

    def time_ids(self, rows: torch.Tensor, variants: torch.Tensor) -> torch.Tensor:
        """float32 ``[B, 6]``: original size, crop top-left, target size of each (image, variant) drawn."""
        rows, variants = rows.cpu(), variants.cpu()
        target = torch.tensor([self.resolution, self.resolution]).expand(len(rows), 2)
        return torch.cat([self.original_sizes[rows], self.crop_top_lefts[rows, variants], target], dim=1).float()


def micro_conditioning(view: Any, data: Any, spec: Any) -> MicroConditioning:
    """The micro-conditioning of ``data`` (loaded from the data flags ``view``) for the latent cache of ``spec``
    (its crop positions and flips)."""
    resolution = int(data.resolution)
    sizes = original_sizes(view, data)
    crops = torch.empty((len(data), spec.num_variants, 2), dtype=torch.long)
    for i, (height0, width0) in enumerate(sizes.tolist()):
        height, width = resized_size(height0, width0, resolution)
        if not data.center_crop and data.stored_image(i).shape[:2] != (height, width):
            raise DataError(
                f"image {i} of {data.source} is stored at {data.stored_image(i).shape[:2]}, not at the "
                f"{(height, width)} its file's {(height0, width0)} gives; its file changed since it was cached"
            )
        for crop in range(spec.crop_positions):
            position = None if spec.crop_positions == 1 else spec.crop_position(crop)  # 1: the centre crop
            top, left = crop_origin(height, width, resolution, position)
            for flipped in range(spec.num_flips):
                mirrored = width - resolution - left if flipped else left
                crops[i, crop * spec.num_flips + flipped] = torch.tensor([top, mirrored])
    return MicroConditioning(torch.from_numpy(sizes), crops, resolution)
