"""Image sources, decoding, preprocessing, the on-disk uint8 cache and on-the-fly augmentation.

Why this shape: small diffusion models train for many epochs over small images, so decoding PNGs every epoch would
dominate the step time and a ``DataLoader`` with workers would make the random stream depend on the worker count.
Instead every image is decoded exactly once (PIL), turned into RGB uint8 with a fixed recipe (transparency composited
onto ``--background``, 16-bit scaled, short side resized to ``--resolution``) and appended to chunk files on disk.
Later runs memory-map them, so a second run decodes nothing and a dataset of a few hundred thousand images does not
need to fit in RAM. The processes of an ``accelerate launch`` decode a share of the chunks each, a killed build
resumes at the chunks not yet written, and each image is checked against its digest when first read, so start-up
does not grow with the dataset. Batches are assembled from the memory maps on the fly; every random draw (crop, flip,
jitter, blur) comes from the caller's ``torch.Generator`` so a resumed run sees exactly the batches it would have seen.

Sources, in order of precedence: ``--dataset_name`` (a Hub id, a ``save_to_disk`` folder or any folder ``datasets``
can load; with ``--train_data_dir`` too, that folder inside it, as in diffusers' scripts), ``--train_data_dir`` (a
folder, recursive, optional ``metadata.jsonl`` as in datasets' imagefolder), else the embedded Noto Emoji subset
shipped in ``crispdiff/assets``.

One module per concern, this one being the entry point (``load_images``) that re-exports their public names:
:mod:`crispdiff.data.decode` (one image -> uint8 with the ``DecodeRecipe``), :mod:`crispdiff.data.sources` (folder /
``datasets`` / embedded: ``resolve_source``), :mod:`crispdiff.data.cache` (the chunked, memory-mapped cache and the
skipped-file list: ``plan_image_cache``, ``decode_chunks``, ``record_image_cache``, ``ChunkedPixels``),
:mod:`crispdiff.data.batches` (``ImageData``: crops, augmentation, device residency), :mod:`crispdiff.data.auto_classes`
(``--class_column auto``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from crispdiff.core.config import AUTO_CLASS_COLUMN, PIXEL_AUGMENTATIONS
from crispdiff.core.errors import DataError
from crispdiff.core.shared_build import Processes, build_in_parts, build_lock
from crispdiff.data.auto_classes import cluster_images
from crispdiff.data.batches import ImageData, to_device, uint8_to_unit
from crispdiff.data.cache import (
    IMAGE_CHUNK_SIZE,
    SKIPPED_FILE,
    SKIPPED_LOG_NAME,
    ChunkedPixels,
    decode_chunks,
    image_cache_key,
    plan_image_cache,
    read_image_cache,
    record_image_cache,
    skipped_entries,
    warn_about_skipped,
    write_skipped_log,
)
from crispdiff.data.decode import INTERPOLATIONS, DecodeRecipe, decode_image, original_size, parse_background
from crispdiff.data.sources import (
    IMAGE_EXTENSIONS,
    cache_root,
    embedded_dataset_dir,
    is_saved_dataset,
    list_image_files,
    metadata_class_column,
    resolve_source,
)

__all__ = [
    "DataError",
    "ImageData",
    "IMAGE_EXTENSIONS",
    "SKIPPED_LOG_NAME",
    "cache_root",
    "embedded_dataset_dir",
    "is_saved_dataset",
    "load_images",
    "load_images_of_size",
    "original_sizes",
    "to_device",
    "uint8_to_unit",
    "write_skipped_log",
]

# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------


def _check_config(config: Any) -> None:
    if int(config.resolution) < 1:
        raise DataError(f"--resolution must be positive, got {config.resolution}")
    if config.interpolation not in INTERPOLATIONS:
        raise DataError(f"--interpolation {config.interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
    for name in PIXEL_AUGMENTATIONS:
        if not 0.0 <= float(getattr(config, name)) <= 1.0:
            raise DataError(f"--{name} must be within [0, 1], got {getattr(config, name)}")
    if float(config.blur_sigma) < 0:
        raise DataError(f"--blur_sigma must be >= 0, got {config.blur_sigma}")


def _skipped_log(entries: list[str], cache_folder: Path, config: Any) -> Path | None:
    """Where every skipped file is listed: ``OUTPUT_DIR/skipped_images.txt`` for a run, else the cache's own list."""
    if not entries:
        return None
    output_dir = getattr(config, "output_dir", None)
    if output_dir:
        return write_skipped_log(entries, output_dir)
    return cache_folder / SKIPPED_FILE if (cache_folder / SKIPPED_FILE).is_file() else None


def _class_values(source: Any, column: str | None) -> list[str] | None:
    """Each source item's class (``str`` of the ``--class_column`` value), checked before anything is decoded.

    An image without a value is an error naming the file: silently training it as "no class" would teach the null
    class from a few arbitrary images.
    """
    if column is None:
        return None
    if source.metadata is None:  # the sources already refuse this; kept as a guard for new sources
        raise DataError(f"--class_column {column!r} was given but {source.description} has no metadata")
    values = []
    for name, row in zip(source.names, source.metadata):
        value = row.get(column)
        text = "" if value is None else str(value).strip()
        if not text:
            raise DataError(
                f"--class_column {column!r}: image {name} has no value in that column "
                "(give every image a class, or drop it from the data)"
            )
        values.append(text)
    return values


def _class_labels(values: list[str] | None, kept: list[int], column: str | None) -> tuple[Any, Any]:
    """``(class_names, class_ids)`` of the kept images: names sorted as strings, ids 0..N-1 (N is the null class)."""
    if values is None:
        return None, None
    kept_values = [values[i] for i in kept]
    names = sorted(set(kept_values))
    if len(names) < 2:
        raise DataError(
            f"--class_column {column!r} has a single class ({names[0]!r}) in this data; a class-conditional model "
            "needs at least two (drop --class_column to train unconditionally)"
        )
    position = {name: i for i, name in enumerate(names)}
    return names, np.array([position[v] for v in kept_values], dtype=np.int64)


def load_images(
    config: Any,
    *,
    for_latents: bool = False,
    show_progress: bool = True,
    processes: Processes | None = None,
    chunk_size: int = IMAGE_CHUNK_SIZE,
) -> ImageData:
    """Load the images named by the data flags of ``config`` (a ``DataConfig`` or anything with its attributes).

    The first call decodes and caches; later calls with the same files and preprocessing memory-map the cache.
    ``processes``: the run's ``Accelerator`` (or ``PartialState``); every one of its processes must call this, and
    they decode the missing chunks of ``chunk_size`` images between them (else this process decodes them all; a
    second run that starts meanwhile waits for the cache's lock, then reuses it).
    ``--class_column`` adds class names and ids, read from the metadata on every load (not part of the cache key);
    ``--class_column auto`` makes them from the pixels instead (``crispdiff.data.auto_classes``: seeded by ``--seed``,
    the count from ``--num_auto_classes``).
    ``for_latents=True`` with ``--center_crop`` stores centre crops only: a latent cache encodes each image once, so
    there is no later crop to keep the full image for. Without it the images keep their short-side-resized shape, and
    the latent cache encodes several crop positions of each (``--random_crop_positions``).
    """
    _check_config(config)
    recipe = DecodeRecipe(
        resolution=int(config.resolution),
        interpolation=str(config.interpolation),
        background=parse_background(config.background),
        center=bool(config.center_crop),
        min_image_size=int(config.min_image_size),
    )
    source = resolve_source(config)
    class_column = metadata_class_column(config)
    class_values = _class_values(source, class_column)
    key = image_cache_key(source, recipe, chunk_size)
    folder = cache_root(config) / "images" / key
    with build_lock(processes, folder.parent / f"{key}.lock"):  # another run decoding it: wait, then reuse it
        plan = build_in_parts(
            processes,
            plan=lambda: plan_image_cache(source, folder, key, chunk_size),
            build=lambda _, chunks: decode_chunks(source, recipe, folder, chunks, chunk_size, show_progress),
            record=lambda _: record_image_cache(source, recipe, folder, key, chunk_size),
        )
    contents = read_image_cache(folder, key)
    if contents is None or not contents.whole:
        raise RuntimeError(f"the image cache just written to {folder} does not validate; is the disk full?")
    skipped = skipped_entries(folder, contents.header)
    warn_about_skipped(contents.header, source, recipe, _skipped_log(skipped, folder, config))
    kept = contents.kept.tolist()
    class_names, class_ids = _class_labels(class_values, kept, class_column)
    data = ImageData(
        ChunkedPixels(contents),
        resolution=recipe.resolution,
        center_crop=recipe.center,
        random_flip=bool(config.random_flip),
        color_jitter=float(config.color_jitter),
        blur_prob=float(config.blur_prob),
        blur_sigma=float(config.blur_sigma),
        color_remap_prob=float(config.color_remap_prob),
        captions=[source.captions[i] for i in kept] if source.captions is not None else None,
        metadata=[source.metadata[i] for i in kept] if source.metadata is not None else None,
        source=source.description,
        num_skipped=int(contents.header.get("num_skipped", 0)),
        skipped_names=skipped,
        cache_path=folder,
        cache_hit=not plan.record,
        class_names=class_names,
        class_ids=class_ids,
        source_rows=contents.kept,
    )
    if getattr(config, "class_column", None) == AUTO_CLASS_COLUMN:
        num_classes, seed = getattr(config, "num_auto_classes", None), int(getattr(config, "seed", 0))
        data.set_classes(*cluster_images(data.center_crops, len(data), num_classes, seed))
        if data.class_names is None:
            warnings.warn(
                f"--class_column auto: {len(data)} image(s) are too few to cluster into classes; training "
                "unconditionally (--num_auto_classes N asks for N clusters anyway)",
                UserWarning,
                stacklevel=2,
            )
    return data


def original_sizes(config: Any, data: ImageData) -> np.ndarray:
    """int64 ``[N, 2]``: each loaded image's ``(height, width)`` before it was resized (EXIF rotation applied), read
    from the source's file headers (``config``: the data flags ``data`` was loaded with). The image cache keeps only
    resized pixels; SDXL is conditioned on the size a picture really had."""
    if data.source_rows is None:
        raise ValueError("these images were not loaded by load_images; their original sizes are unknown")
    source = resolve_source(config)
    rows = data.source_rows.tolist()
    sizes = np.empty((len(rows), 2), dtype=np.int64)
    chunk = 256
    for first in range(0, len(rows), chunk):
        wanted = rows[first : first + chunk]
        items = source.fetch(wanted[0], wanted[-1] + 1)  # rows ascend: one contiguous fetch per chunk
        for j, row in enumerate(wanted, start=first):
            try:
                sizes[j] = original_size(items[row - wanted[0]])
            except (OSError, ValueError) as err:
                raise DataError(f"{source.names[row]} changed since it was cached ({type(err).__name__})") from err
    return sizes


def images_at_size(config: Any, data: ImageData, size: int, indices: list[int]) -> Any:
    """``data``'s images at ``indices`` decoded anew at ``size`` px, uint8 centre crops [N, 3, size, size], from the
    files at least that large; None when under half of them are.

    For measuring output larger than the training resolution (the SR step's) against the data itself: the cache
    holds the images at the training resolution only, and an upscale of those would be no reference for detail.
    ``config``: the data flags ``data`` was loaded with.
    """
    import torch

    if data.source_rows is None:  # streamed data: no rows to fetch again
        return None
    source = resolve_source(config)
    recipe = DecodeRecipe(
        resolution=size,
        interpolation=str(config.interpolation),
        background=parse_background(config.background),
        center=True,
        min_image_size=size,
    )
    rows = data.source_rows[indices].tolist()
    crops = []
    for row in rows:
        decoded = decode_image(source.fetch(row, row + 1)[0], source.names[row], recipe)
        if decoded.pixels is not None:
            crops.append(torch.tensor(decoded.pixels).permute(2, 0, 1))
    if 2 * len(crops) < len(rows):
        return None
    return torch.stack(crops)


def load_images_of_size(folder: str | Path, size: int, background: str, flag: str) -> Any:
    """Every image below ``folder`` as uint8 [N, 3, size, size], decoded by the data pipeline's recipe (transparency
    composited onto ``background``); never resized. Images of another size, unreadable files, a missing or empty
    folder: a ``DataError`` naming ``flag`` and the file.

    For images that must be exactly what a model will be given (an SR model's low-resolution inputs), where a
    silent resize would hide a mistake.
    """
    import torch
    from PIL import Image

    root = Path(folder)
    files = list_image_files(root) if root.is_dir() else []
    if not files:
        raise DataError(f"{flag} {folder}: no images there ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    recipe = DecodeRecipe(size, "lanczos", parse_background(background), center=True, min_image_size=1)
    images = []
    for path in files:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{flag} {folder}: cannot read {path.name} ({err})") from err
        if (width, height) != (size, size):
            raise DataError(
                f"{flag} {folder}: {path.name} is {width}x{height} px; these images must be {size}x{size} "
                "(--resolution / --scale, the SR model's input size)"
            )
        decoded = decode_image(path, path.name, recipe)
        if decoded.pixels is None:
            raise DataError(f"{flag} {folder}: cannot read {path.name} ({decoded.skipped_because})")
        images.append(decoded.pixels)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
