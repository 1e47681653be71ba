"""Tensor <-> PIL conversion, sample grids and atomic image writes.

One place for these so that every validation grid, sample command and evaluation report quantises and lays out images
the same way: model-space tensors are in [-1, 1], display tensors in [0, 1], both NCHW (or CHW for one image).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from crispdiff.core.io import write_atomic

ValueRange = tuple[float, float]
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def uint8_to_model(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 model space [-1, 1] (``x / 127.5 - 1``), the one conversion the VAE paths share."""
    return images.float().div(127.5).sub_(1.0)  # out of place first: float input must not be changed


def to_uint8(images: torch.Tensor, value_range: ValueRange = (-1.0, 1.0)) -> torch.Tensor:
    """Map float images from ``value_range`` to uint8 [0, 255] (rounded, clamped), keeping the layout (NCHW / CHW).

    Rounding rather than truncating matches diffusers' ``numpy_to_pil``, so a grid saved here shows the same pixels
    as the pipeline's PIL output. The result is on the CPU. uint8 input is returned as it is (already quantised).
    """
    if images.dtype == torch.uint8:
        return images.detach().cpu()
    low, high = value_range
    if high <= low:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range}")
    scaled = (images.detach().to(device="cpu", dtype=torch.float32) - low) / (high - low)
    return (scaled * 255.0).round().clamp(0, 255).to(torch.uint8)


def to_pil_list(
    images: torch.Tensor | Sequence[PIL.Image.Image], value_range: ValueRange = (-1.0, 1.0)
) -> list[PIL.Image.Image]:
    """A list of PIL images from an NCHW / CHW float tensor (1, 3 or 4 channels) or a list of PIL images."""
    if not isinstance(images, torch.Tensor):
        return list(images)
    batch = images.unsqueeze(0) if images.ndim == 3 else images
    if batch.ndim != 4:
        raise ValueError(f"expected an NCHW or CHW tensor, got shape {tuple(images.shape)}")
    channels = batch.shape[1]
    if channels not in _MODES:
        raise ValueError(f"cannot make PIL images from {channels} channels (expected 1, 3 or 4)")
    array = to_uint8(batch, value_range).permute(0, 2, 3, 1).numpy()
    if channels == 1:
        array = array[..., 0]
    return [PIL.Image.fromarray(np.ascontiguousarray(a)) for a in array]  # mode from shape: L / RGB / RGBA


def make_grid(
    images: torch.Tensor | Sequence[PIL.Image.Image],
    nrow: int | None = None,
    value_range: ValueRange = (-1.0, 1.0),
    padding: int = 0,
    pad_color: tuple[int, int, int] = (255, 255, 255),
) -> PIL.Image.Image:
    """Tile images into one RGB image, ``nrow`` images per row (default: a near-square grid).

    All images must have the same size. The grid is ``cols * w + (cols + 1) * padding`` wide, so with the default
    ``padding=0`` a grid of w x h images is exactly ``cols * w`` x ``rows * h``.
    """
    pil_images = [im.convert("RGB") for im in to_pil_list(images, value_range)]
    if not pil_images:
        raise ValueError("make_grid needs at least one image")
    width, height = pil_images[0].size
    if any(im.size != (width, height) for im in pil_images):
        raise ValueError("make_grid needs images of one size")
    cols = nrow if nrow is not None else math.ceil(math.sqrt(len(pil_images)))
    if cols < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    cols = min(cols, len(pil_images))
    rows = math.ceil(len(pil_images) / cols)
    size = (cols * width + (cols + 1) * padding, rows * height + (rows + 1) * padding)
    grid = PIL.Image.new("RGB", size, pad_color)
    for index, image in enumerate(pil_images):
        row, col = divmod(index, cols)
        grid.paste(image, (padding + col * (width + padding), padding + row * (height + padding)))
    return grid


def save_image_atomic(image: PIL.Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` to ``path`` through a temp file in the same folder + ``os.replace``.

    A reader (tensorboard, a browser refreshing the grid, a crash mid-write) never sees a half-written file. The
    format comes from the extension (``.png``, ``.jpg``, ``.webp`` ...). Parent folders are created.
    """
    target = Path(path)
    extension = target.suffix.lower()
    image_format = PIL.Image.registered_extensions().get(extension)
    if image_format is None:
        raise ValueError(f"cannot tell the image format of {target} from its extension {extension!r}")
    return write_atomic(target, lambda handle: image.save(handle, format=image_format), binary=True)
