"""What a diffusion UNet trains on: a ``TrainingSpace`` gives clean samples x0, classes and reference images, and the
components the saved pipeline needs; ``PixelSpace`` is pixels in [-1, 1], ``crispdiff.latent.space.LatentSpace``
a VAE's latents (both on crispdiff's image data through ``ImageDataSpace``), ``StreamSpace`` pixels straight from a
``datasets`` stream (``--streaming``)."""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch

logger = logging.getLogger("crispdiff")


class TrainingSpace(Protocol):
    """Where the diffusion happens: pixels, or a VAE's latents."""

    channels: int
    sample_size: int

    def __len__(self) -> int: ...

    def x0(self, indices: torch.Tensor, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Clean training samples for these dataset indices, randomness (crop, flip, posterior) from `generator`."""

    def pipeline_components(self) -> dict[str, Any]:
        """Extra keyword arguments for the saved pipeline (vae, latent scaling ...)."""

    def reference_images(self, count: int, seed: int = 0) -> torch.Tensor:
        """Up to `count` real images, uint8 [N, 3, H, W], for validation metrics: a `seed`ed random subset."""

    # Class-conditional spaces (--class_column) also have ``class_names: list[str] | None`` and
    # ``class_labels(indices, device) -> LongTensor | None``; the UNetTrainer reads both with getattr, so a space
    # without them is unconditional.


def space_class_names(space: Any) -> list[str] | None:
    """The space's class names (--class_column), or None for an unconditional space."""
    return getattr(space, "class_names", None)


class ImageDataSpace:
    """What every space on crispdiff's image data shares: the images' classes (``--class_column``), read from the
    data (its metadata or auto classes) rather than stored with pixels or latents, so caches are shared with
    unconditional runs on the same images."""

    def __init__(self, data: Any):
        self.data = data
        self.class_names: list[str] | None = getattr(data, "class_names", None)

    def class_labels(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """Class ids of these images (--class_column), or None when the data has no classes."""
        return self.data.class_labels(indices, device) if self.class_names else None

    def reference_images(self, count: int, seed: int = 0) -> torch.Tensor:
        """Up to ``count`` training images (uint8 centre crops) for validation metrics: a ``seed``ed random subset.

        Why not the first ``count``: files sort by name, and neighbouring names are alike (the emoji's neighbouring
        codepoints, a folder sorted by class), so the first files are a poor sample of the data.
        """
        return self.data.center_crops(reference_indices(len(self.data), count, seed))


def reference_indices(num_items: int, count: int, seed: int) -> list[int]:
    """``count`` distinct indices of ``num_items`` drawn with ``seed`` (all of them when ``count`` covers them), in
    ascending order so that a memory-mapped read walks forward."""
    if count >= num_items:
        return list(range(num_items))
    chosen = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))[:count]
    return sorted(chosen.tolist())


class PixelSpace(ImageDataSpace):
    """Diffusion directly on pixels in [-1, 1]."""

    channels = 3

    def __init__(self, data: Any):
        super().__init__(data)
        self.sample_size = data.resolution

    def __len__(self) -> int:
        return len(self.data)

    def x0(self, indices: torch.Tensor, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return self.data.batch(indices, generator, device=device)

    def prepare(self, device: torch.device) -> None:
        """On a GPU, keep the uint8 images there when they fit (on the CPU the memory map already is RAM)."""
        if device.type != "cpu" and self.data.keep_on_device(device):
            logger.info("keeping the %d training images on %s", len(self.data), device)

    def pipeline_components(self) -> dict[str, Any]:
        return {}


class StreamSpace:
    """Diffusion on pixels in [-1, 1] taken from a ``datasets`` stream as the loop goes (``--streaming``), no cache.

    The loop's dataset indices only count the batch: each ``x0`` takes the next images of this process's share of
    the stream and augments them like ``PixelSpace`` (crops, flips, jitter drawn from the loop's generator). Where it
    is in the stream is per process (``process_state``), saved in every checkpoint; unconditional only.
    """

    channels = 3
    class_names = None

    def __init__(self, stream: Any):
        self.stream = stream
        self.sample_size = int(stream.config.resolution)
        size = stream.size
        # the loop's epochs only count batches here; a stream of unknown length counts as one item
        self.num_items = int(size) if size else 1
        self.items_description = f"a stream of {size or 'an unknown number of'} examples ({stream.description})"

    def __len__(self) -> int:
        return self.num_items

    def x0(self, indices: torch.Tensor, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        count = int(torch.as_tensor(indices).numel())
        return self.stream.batch(count).batch(range(count), generator, device=device)

    def class_labels(self, indices: torch.Tensor, device: torch.device) -> None:
        return None

    def reference_images(self, count: int, seed: int = 0) -> torch.Tensor:
        return self.stream.reference_images(count, seed)

    def pipeline_components(self) -> dict[str, Any]:
        return {}

    def process_state(self) -> dict[str, Any]:
        """Where this process is in its share of the stream (saved in each checkpoint, per process)."""
        return {"stream": self.stream.position()}

    def restore_process_state(self, state: dict[str, Any]) -> None:
        if "stream" in state:
            self.stream.restore(state["stream"])


def pixel_space(config: Any, accelerator: Any) -> Any:
    """The pixel trainers' space: ``StreamSpace`` with ``--streaming``, else ``PixelSpace`` on the image cache (every
    process decoding its share of what is missing)."""
    if getattr(config, "streaming", False):
        from crispdiff.data.streaming import ImageStream

        return StreamSpace(ImageStream(config, accelerator.process_index, accelerator.num_processes))
    from crispdiff.data.loading import load_images

    return PixelSpace(load_images(config, show_progress=accelerator.is_local_main_process, processes=accelerator))
