"""Batches from the decoded images: random crops, flips, colour jitter and blur drawn from the caller's generator,
gathered on the device when the images live there (``ImageData.keep_on_device``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from crispdiff.pipelines.pipeline_crispdiff import gaussian_blur  # the same blur the pipeline sharpens with

# Random numbers drawn per image in ``ImageData.batch``; fixed so the generator advances by the same amount whatever
# augmentations are switched on (turning on blur does not change which images get flipped).
_DRAWS_PER_IMAGE = 7


# ----------------------------------------------------------------------------------------------------------------------
# Where the stored images are
# ----------------------------------------------------------------------------------------------------------------------


class PixelStore(Protocol):
    """Stored images: the cache's chunk files (``crispdiff.data.cache.ChunkedPixels``) or a batch held in memory."""

    sizes: np.ndarray  # int64 [N, 2]: height, width of each stored image

    def image(self, i: int) -> np.ndarray:
        """The stored HxWx3 uint8 image ``i``."""


class InMemoryPixels:
    """Decoded images held in memory: a streamed batch (``--streaming``), augmented like cached images."""

    def __init__(self, images: Sequence[np.ndarray]):
        self._images = list(images)
        self.sizes = np.asarray([image.shape[:2] for image in self._images], dtype=np.int64).reshape(-1, 2)

    def image(self, i: int) -> np.ndarray:
        return self._images[i]


# ----------------------------------------------------------------------------------------------------------------------
# The dataset object
# ----------------------------------------------------------------------------------------------------------------------


class ImageData:
    """Decoded, resized uint8 images (a ``PixelStore``: the cache's memory-mapped chunk files, or a streamed batch in
    memory) plus their metadata, ready to be batched.

    Attributes: ``num_images``, ``resolution``, ``captions`` (or ``None``), ``metadata`` (rows aligned with the
    images, or ``None``), ``source`` (human description), ``num_skipped`` (unreadable or too-small files),
    ``skipped_names`` (every one, as ``"name (reason)"``), ``cache_path`` and
    ``cache_hit`` (whether this load decoded nothing); with ``--class_column``, ``class_names`` (sorted) and
    ``class_ids`` (int64 per image, 0..N-1), else both ``None``. Labels come from the metadata at every load rather
    than from the cache, so one pixel (and latent) cache serves conditional and unconditional runs alike.
    """

    def __init__(
        self,
        pixels: PixelStore,
        *,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        color_jitter: float,
        blur_prob: float,
        blur_sigma: float,
        color_remap_prob: float,
        captions: list[str] | None,
        metadata: list[dict[str, Any]] | None,
        source: str,
        num_skipped: int,
        skipped_names: list[str],
        cache_path: Path,
        cache_hit: bool,
        class_names: list[str] | None = None,
        class_ids: np.ndarray | None = None,
        source_rows: np.ndarray | None = None,
    ) -> None:
        self._pixels = pixels
        self._sizes = np.asarray(pixels.sizes, dtype=np.int64).reshape(-1, 2)  # height, width of each stored image
        self._resident: torch.Tensor | None = None  # all images on a device, see keep_on_device
        self.num_images = int(self._sizes.shape[0])
        self.resolution = int(resolution)
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)
        self.color_jitter = float(color_jitter)
        self.blur_prob = float(blur_prob)
        self.blur_sigma = float(blur_sigma)
        self.color_remap_prob = float(color_remap_prob)
        self.captions = captions
        self.metadata = metadata
        self.source = source
        self.num_skipped = int(num_skipped)
        self.skipped_names = skipped_names
        self.cache_path = cache_path
        self.cache_hit = cache_hit
        #: each stored image's position in the source list (skipped files leave gaps), or None when unknown
        self.source_rows = None if source_rows is None else np.asarray(source_rows, dtype=np.int64)
        self.set_classes(class_names, class_ids)

    def set_classes(self, class_names: list[str] | None, class_ids: np.ndarray | None) -> None:
        """Label the images: names in id order and one id per image (both None: unlabelled)."""
        if (class_names is None) != (class_ids is None):
            raise ValueError("class_names and class_ids go together")
        if class_ids is not None and len(class_ids) != self.num_images:
            raise ValueError(f"{len(class_ids)} class ids for {self.num_images} images")
        self.class_names = class_names
        self.class_ids = None if class_ids is None else np.asarray(class_ids, dtype=np.int64)

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return f"ImageData({self.num_images} images at {self.resolution}px from {self.source})"

    def class_labels(self, indices: torch.Tensor | Sequence[int], device: torch.device | str | None = None) -> Any:
        """The class ids of these images as a LongTensor on ``device``, or ``None`` for unlabelled data."""
        if self.class_ids is None:
            return None
        labels = torch.from_numpy(self.class_ids[_as_index_list(indices)])
        return labels if device is None else labels.to(device)

    def stored_image(self, i: int) -> np.ndarray:
        """The stored HxWx3 uint8 image ``i`` (short side == resolution), a read-only view (of the cache's memory
        map, checked against its digest on first read)."""
        return self._pixels.image(i)

    def _crop(self, i: int, u_top: float, u_left: float, center: bool) -> np.ndarray:
        """An RxR crop of image ``i``: centred, or placed by two uniform numbers in [0, 1)."""
        image = self.stored_image(i)
        height, width = image.shape[:2]
        res = self.resolution
        if center:
            top, left = crop_origin(height, width, res)
        else:
            top = min(int(u_top * (height - res + 1)), height - res)
            left = min(int(u_left * (width - res + 1)), width - res)
        return image[top : top + res, left : left + res]

    def center_crops(self, indices: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic centre crops as uint8 [N, 3, R, R] (all images, or ``indices``) for caches and metrics."""
        ids = list(range(self.num_images)) if indices is None else _as_index_list(indices)
        crops = np.empty((len(ids), self.resolution, self.resolution, 3), dtype=np.uint8)
        for j, i in enumerate(ids):
            crops[j] = self._crop(i, 0.0, 0.0, center=True)
        return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()

    def crops_at(self, position: float, indices: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [N, 3, R, R] crops at ``position`` in [0, 1] of each image's slack (0: top / left edge, 1: bottom /
        right edge; the short side has none), the crops a latent cache encodes for random crops."""
        ids = list(range(self.num_images)) if indices is None else _as_index_list(indices)
        crops = np.empty((len(ids), self.resolution, self.resolution, 3), dtype=np.uint8)
        for j, i in enumerate(ids):
            height, width = self.stored_image(i).shape[:2]
            top, left = crop_origin(height, width, self.resolution, position)
            crops[j] = self.stored_image(i)[top : top + self.resolution, left : left + self.resolution]
        return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()

    def has_crop_slack(self) -> bool:
        """Whether any stored image is larger than its RxR crop (so that random crops differ from centre crops)."""
        return bool((self._sizes != self.resolution).any()) if self.num_images else False

    def keep_on_device(self, device: torch.device | str, max_bytes: int | None = None) -> bool:
        """Copy all stored images to ``device`` as one uint8 tensor, so batches never leave it; True if done.

        Only when every stored image has the same size (always with ``--center_crop``; common for icon and emoji
        sets) and the pixels fit in ``max_bytes`` (default: a quarter of the GPU's free memory; 1,000 emoji at
        64 px are 12 MB). Otherwise batches keep coming from the memory map through pinned memory.
        """
        device = torch.device(device)
        sizes = self._sizes
        if self.num_images == 0 or not (sizes == sizes[0]).all():
            return False
        height, width = (int(v) for v in sizes[0])
        total = self.num_images * height * width * 3
        if max_bytes is None:
            max_bytes = torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else 0
        if total > max_bytes:
            return False
        pixels = np.empty((self.num_images, height, width, 3), dtype=np.uint8)
        for i in range(self.num_images):  # each image checked on this first read, as a batch would
            pixels[i] = self.stored_image(i)
        self._resident = torch.from_numpy(pixels).to(device)
        return True

    @property
    def resident_device(self) -> torch.device | None:
        """Where ``keep_on_device`` put the images, or None (batches come from the memory map)."""
        return None if self._resident is None else self._resident.device

    def _crop_offsets(self, ids: list[int], u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top and left corner of each RxR crop: centred, or placed by two uniform numbers in [0, 1) per image."""
        heights, widths = self._sizes[ids, 0], self._sizes[ids, 1]
        res = self.resolution
        if self.center_crop:
            return crop_origin(heights, widths, res)
        tops = np.minimum((u[:, 0] * (heights - res + 1)).astype(np.int64), heights - res)
        lefts = np.minimum((u[:, 1] * (widths - res + 1)).astype(np.int64), widths - res)
        return tops, lefts

    def _crops_uint8(self, ids: list[int], u: np.ndarray, device: torch.device | str | None) -> torch.Tensor:
        """uint8 [B, R, R, 3] crops on ``device``: gathered where the images live (device or memory map)."""
        tops, lefts = self._crop_offsets(ids, u)
        res = self.resolution
        if self._resident is not None:
            on = self._resident.device
            span = torch.arange(res, device=on)
            rows = torch.from_numpy(tops).to(on).view(-1, 1, 1) + span.view(1, -1, 1)
            cols = torch.from_numpy(lefts).to(on).view(-1, 1, 1) + span.view(1, 1, -1)
            crops = self._resident[torch.tensor(ids, device=on).view(-1, 1, 1), rows, cols]
            return crops if device is None else crops.to(device)
        crops = np.empty((len(ids), res, res, 3), dtype=np.uint8)
        for j, i in enumerate(ids):
            image = self.stored_image(i)
            crops[j] = image[tops[j] : tops[j] + res, lefts[j] : lefts[j] + res]
        return to_device(torch.from_numpy(crops), device)

    def batch(
        self,
        indices: torch.Tensor | Sequence[int],
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """A float32 [B, 3, R, R] batch in [-1, 1] with crop / flip / jitter / blur drawn from ``generator``.

        Exactly ``7 * B`` uniform numbers are drawn from ``generator`` per call whatever the crop / flip / jitter /
        blur options, and ``7 * B`` more with ``--color_remap_prob`` (never a number that depends on what was drawn),
        so the data stream of a resumed run (generator state restored from a checkpoint) is identical bit for bit.
        Nothing here waits for the device: crops are gathered on it (``keep_on_device``) or copied from pinned memory
        without blocking, and the blur is applied with a mask rather than by asking the device which images drew it.
        """
        ids = _as_index_list(indices)
        draws = torch.rand(len(ids), _DRAWS_PER_IMAGE, generator=generator, device=generator.device).cpu().double()
        x = uint8_to_unit(self._crops_uint8(ids, draws.numpy(), device).permute(0, 3, 1, 2))
        draws = to_device(draws.float(), x.device)
        if self.random_flip:
            flip = (draws[:, 2] < 0.5).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(3), x)
        if self.color_remap_prob > 0:  # drawn after the fixed draws, so runs without it keep their stream
            remap = torch.rand(len(ids), 7, generator=generator, device=generator.device).to(x.device)
            x = _color_remap(x, remap, self.color_remap_prob)
        if self.color_jitter > 0:
            x = _color_jitter(x, draws[:, 3:6], self.color_jitter)
        if self.blur_prob > 0 and self.blur_sigma > 0:
            chosen = (draws[:, 6] < self.blur_prob).view(-1, 1, 1, 1)
            x = torch.where(chosen, gaussian_blur(x, self.blur_sigma), x)
        return x.mul_(2.0).sub_(1.0).contiguous()


def crop_origin(height: Any, width: Any, resolution: int, position: float | None = None) -> tuple[Any, Any]:
    """Top-left corner of the RxR crop of an image of ``height`` x ``width`` (ints, or arrays of them): the centre
    crop (``position`` None), else the crop at ``position`` in [0, 1] of the slack along each side (0: top / left
    edge, 1: bottom / right edge). The one place the cached crops are placed, so what SDXL is told about a crop is
    where it was taken."""
    if position is None:
        return (height - resolution) // 2, (width - resolution) // 2
    return round(position * (height - resolution)), round(position * (width - resolution))


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1 (exact: the values are k / 255)."""
    return images.float().div_(255.0)


def to_device(tensor: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """CPU -> ``device``; to a GPU through pinned memory without blocking the host (the copy overlaps compute)."""
    if device is None or torch.device(device).type == "cpu":
        return tensor if device is None else tensor.to(device)
    if torch.cuda.is_available() and torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _as_index_list(indices: torch.Tensor | Iterable[int]) -> list[int]:
    if isinstance(indices, torch.Tensor):
        return [int(i) for i in indices.reshape(-1).tolist()]
    return [int(i) for i in indices]


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma of an NCHW RGB batch in [0, 1], keeping a channel dim."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _color_remap(x: torch.Tensor, uniforms: torch.Tensor, prob: float) -> torch.Tensor:
    """With probability ``prob`` per image, send each channel's 0 and 1 to random levels (uniforms: [B, 7] in [0, 1)).

    ``low + (high - low) * x`` per channel, so a white background becomes a random colour and, when ``low > high``,
    the channel is inverted; shapes and edges are untouched. Emoji on white never show a VAE a large saturated or
    dark field (a flag, a black square), and one trained only on them decodes such fields washed out; with this
    the reconstruction target is still the (remapped) input, so nothing is taught that is not in the image.
    """
    chosen = (uniforms[:, 0] < prob).view(-1, 1, 1, 1)
    low, high = uniforms[:, 1:4, None, None], uniforms[:, 4:7, None, None]
    return torch.where(chosen, low + (high - low) * x, x)


def _color_jitter(x: torch.Tensor, uniforms: torch.Tensor, strength: float) -> torch.Tensor:
    """Brightness, contrast and saturation each scaled by a factor in [1 - s, 1 + s] (uniforms in [0, 1))."""
    factors = (1.0 + strength * (2.0 * uniforms - 1.0)).view(-1, 3, 1, 1, 1)
    brightness, contrast, saturation = factors[:, 0], factors[:, 1], factors[:, 2]
    x = (x * brightness).clamp_(0.0, 1.0)
    mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp_(0.0, 1.0)
    gray = _luma(x)
    return ((x - gray) * saturation + gray).clamp_(0.0, 1.0)
