"""``--streaming``: images straight from a ``datasets`` stream, for data that does not fit on disk twice.

``load_dataset(..., streaming=True)`` gives an ``IterableDataset`` read as it is iterated (a Hub id or a local folder,
the same call); nothing is cached. Each process takes its share of the stream with datasets'
``split_dataset_by_node``, after ``IterableDataset.shuffle`` (a buffer of ``--shuffle_buffer_size`` examples, seeded
by ``--seed``; ``set_epoch`` shuffles each pass anew), as diffusers and accelerate users do. Every image is decoded
by the same recipe as the cache's (``crispdiff.data.decode``) when its batch is taken, and batches are augmented by
the same code (``ImageData.batch``), so a streamed run differs from a cached one only in the order of its images.

Resuming: a checkpoint stores, per process, the pass over the stream and how many examples of it were taken; a
resumed run reads the stream again up to there (reading, not decoding) and continues with exactly the batches it
would have seen. datasets' own ``state_dict`` would not do: it loses the shuffle buffer's contents.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crispdiff.core.cores import available_cores
from crispdiff.core.errors import DataError
from crispdiff.data.batches import ImageData, InMemoryPixels
from crispdiff.data.decode import DecodeRecipe, decode_image, parse_background
from crispdiff.data.sources import open_hf_dataset


def stream_recipe(config: Any) -> DecodeRecipe:
    """The decoding recipe of the data flags (the image cache's, see ``crispdiff.data.loading``)."""
    return DecodeRecipe(
        resolution=int(config.resolution),
        interpolation=str(config.interpolation),
        background=parse_background(config.background),
        center=bool(config.center_crop),
        min_image_size=int(config.min_image_size),
    )


def open_image_stream(config: Any) -> Any:
    """``--dataset_name`` as an ``IterableDataset`` of its ``--image_column`` alone, images left undecoded (so a
    broken file is skipped rather than stop the stream); ``--max_train_samples`` keeps its first N examples."""
    import datasets

    stream = open_hf_dataset(config, streaming=True)
    column = config.image_column
    features = stream.features
    if features is not None:  # a stream of JSON rows may not know its columns before the first one
        if column not in features:
            raise DataError(
                f"--image_column {column!r} is not a column of --dataset_name {config.dataset_name}; "
                f"available columns: {list(features)}"
            )
        if isinstance(features[column], datasets.Image):
            stream = stream.cast_column(column, datasets.Image(decode=False))
        stream = stream.select_columns([column])
    if config.max_train_samples is not None:
        stream = stream.take(int(config.max_train_samples))  # a stream has no random subset: its first N
    return stream


def _example_name(example: dict[str, Any], column: str, fallback: str) -> str:
    """A readable name for warnings: the image's file name where the stream has one."""
    item = example.get(column)
    if isinstance(item, dict) and item.get("path"):
        return Path(str(item["path"])).name
    return fallback


def images_batch(images: list[np.ndarray], config: Any, description: str) -> ImageData:
    """Decoded images as an ``ImageData`` with the config's augmentation (crops, flips, jitter, blur)."""
    return ImageData(
        InMemoryPixels(images),
        resolution=int(config.resolution),
        center_crop=bool(config.center_crop),
        random_flip=bool(config.random_flip),
        color_jitter=float(config.color_jitter),
        blur_prob=float(config.blur_prob),
        blur_sigma=float(config.blur_sigma),
        color_remap_prob=float(config.color_remap_prob),
        captions=None,
        metadata=None,
        source=description,
        num_skipped=0,
        skipped_names=[],
        cache_path=None,
        cache_hit=False,
    )


class ImageStream:
    """This process's share of ``--dataset_name``'s stream, pass after pass, decoded as batches are taken.

    ``position()`` / ``restore(position)``: where it is (the pass, examples taken in it), for checkpoints.
    """

    def __init__(self, config: Any, process_index: int = 0, num_processes: int = 1):
        from datasets.distributed import split_dataset_by_node

        self.config = config
        self.recipe = stream_recipe(config)
        self.column = config.image_column
        self.description = f"stream of --dataset_name {config.dataset_name}"
        self.base = open_image_stream(config)
        shuffled = self.base.shuffle(seed=int(config.seed), buffer_size=int(config.shuffle_buffer_size))
        self.share = split_dataset_by_node(shuffled, rank=process_index, world_size=num_processes)
        self.process_index, self.num_processes = process_index, num_processes
        self.epoch = 0
        self.taken = 0  # examples taken from this pass (decodable or not)
        self.skipped = 0
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(8, available_cores())))
        self._references: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def size(self) -> int | None:
        """Examples in the whole stream when the dataset states it (many Hub datasets do), else None."""
        splits = getattr(self.base.info, "splits", None) or {}
        total = splits["train"].num_examples if "train" in splits else None
        if total is not None and self.config.max_train_samples is not None:
            total = min(total, int(self.config.max_train_samples))
        return total

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "taken": self.taken}

    def restore(self, position: dict[str, int]) -> None:
        """Continue at ``position`` (from a checkpoint): the pass is reread up to it, not decoded."""
        self.epoch, self.taken = int(position["epoch"]), int(position["taken"])
        self._iterator = None

    def _examples(self) -> Iterator[dict[str, Any]]:
        """This pass's iterator, positioned after the examples already taken (replayed on a restored stream)."""
        if self._iterator is None:
            self.share.set_epoch(self.epoch)
            self._iterator = iter(self.share)
            for _ in range(self.taken):
                if next(self._iterator, None) is None:
                    break
        return self._iterator

    def _next_example(self) -> dict[str, Any]:
        """The next example of this process's share; a pass that ends starts the next (shuffled anew)."""
        example = next(self._examples(), None)
        if example is None:
            if self.taken == 0:
                raise DataError(
                    f"the {self.description} holds no example for process {self.process_index} of "
                    f"{self.num_processes} (--max_train_samples, or fewer examples than processes?)"
                )
            self.epoch, self.taken, self._iterator = self.epoch + 1, 0, None
            example = next(self._examples(), None)
            if example is None:
                raise DataError(f"the {self.description} ended and gave nothing on its next pass")
        self.taken += 1
        return example

    def _decoded(self, examples: list[dict[str, Any]]) -> list[np.ndarray]:
        """Decode examples on a few threads; unreadable and too-small images are skipped (the first one named)."""
        names = [_example_name(e, self.column, f"example {self.taken} of pass {self.epoch}") for e in examples]
        results = self._pool.map(lambda pair: decode_image(pair[0][self.column], pair[1], self.recipe),
                                 zip(examples, names))  # fmt: skip
        images = []
        for name, decoded in zip(names, results):
            if decoded.pixels is None:
                if self.skipped == 0:
                    warnings.warn(
                        f"skipped {name} of the {self.description} ({decoded.skipped_because}); later skipped images "
                        "are only counted",
                        UserWarning,
                        stacklevel=4,
                    )
                self.skipped += 1
                continue
            images.append(decoded.pixels)
        return images

    def take(self, count: int) -> list[np.ndarray]:
        """The next ``count`` decoded images of this process's share."""
        images: list[np.ndarray] = []
        while len(images) < count:
            examples = [self._next_example() for _ in range(count - len(images))]
            images += self._decoded(examples)
        return images

    def batch(self, count: int) -> ImageData:
        """The next ``count`` images, ready to be augmented by ``ImageData.batch``."""
        return images_batch(self.take(count), self.config, self.description)

    def reference_images(self, count: int, seed: int = 0) -> torch.Tensor:
        """Up to ``count`` images of the whole stream (every process's share), shuffled with ``seed``: uint8 centre
        crops for validation metrics; read once per (count, seed), apart from the training stream's position."""
        key = (count, seed)
        if key not in self._references:
            examples = iter(self.base.shuffle(seed=seed, buffer_size=int(self.config.shuffle_buffer_size)))
            images: list[np.ndarray] = []
            while len(images) < count:
                pending = [example for _, example in zip(range(count - len(images)), examples)]
                if not pending:
                    break  # the stream holds fewer images
                images += self._decoded(pending)
            self._references[key] = images_batch(images[:count], self.config, self.description).center_crops()
        return self._references[key]
