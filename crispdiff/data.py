"""Image sources, decoding, preprocessing, the on-disk uint8 cache and on-the-fly augmentation.

Why this shape: small diffusion models train for many epochs over small images, so decoding PNGs every epoch would
dominate the step time and a ``DataLoader`` with workers would make the random stream depend on the worker count.
Instead every image is decoded exactly once (PIL), turned into RGB uint8 with a fixed recipe (transparency composited
onto ``--background``, 16-bit scaled, short side resized to ``--resolution``) and appended to a flat file on disk.
Later runs memory-map that file, so a second run decodes nothing and a dataset of a few hundred thousand images does
not need to fit in RAM. Batches are assembled from the memory map on the fly; every random draw (crop, flip, jitter,
blur) comes from the caller's ``torch.Generator`` so a resumed run sees exactly the batches it would have seen.

Sources, in order of precedence: ``--train_data_dir`` (a folder, recursive, optional ``metadata.jsonl`` as in
datasets' imagefolder), ``--dataset_name`` (a Hub id, a ``save_to_disk`` folder or any folder ``datasets`` can load),
else the embedded Noto Emoji subset shipped in ``crispdiff/assets``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageColor, ImageOps

from crispdiff.errors import UserError
from crispdiff.io import write_text_atomic
from crispdiff.pipelines.pipeline_crispdiff import gaussian_blur  # the same blur the pipeline sharpens with

__all__ = [
    "DataError",
    "ImageData",
    "IMAGE_EXTENSIONS",
    "cache_root",
    "embedded_dataset_dir",
    "load_images",
]

#: Bump when the decoding recipe or the cache layout changes, so old caches are never reused.
CACHE_FORMAT = 1

#: File extensions picked up from ``--train_data_dir`` (lower-case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

# Random numbers drawn per image in ``ImageData.batch``; fixed so the generator advances by the same amount whatever
# augmentations are switched on (turning on blur does not change which images get flipped).
_DRAWS_PER_IMAGE = 7
_MAX_SKIPPED_NAMES = 20
#: In a cache folder: every skipped file, one ``name (reason)`` a line. Beside a run: the same list, for the user.
SKIPPED_FILE = "skipped.txt"
SKIPPED_LOG_NAME = "skipped_images.txt"
_DECODE_CHUNK = 256


class DataError(UserError, ValueError):
    """A problem with the user's data or data flags; the message names the file and the flag to change."""


def embedded_dataset_dir() -> Path:
    """The folder of the Noto Emoji subset shipped inside the package (used when no data flag is given)."""
    return Path(__file__).resolve().parent / "assets" / "noto-emoji-64"


def cache_root(config: Any = None) -> Path:
    """Where crispdiff caches go: ``--cache_dir``, else ``$CRISPDIFF_CACHE``, else ``~/.cache/crispdiff``."""
    configured = getattr(config, "cache_dir", None) if config is not None else None
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("CRISPDIFF_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "crispdiff"


# ----------------------------------------------------------------------------------------------------------------------
# Decoding one image
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Recipe:
    """Everything that determines the stored pixels of one image; part of the cache key."""

    resolution: int
    interpolation: str
    background: tuple[int, int, int]
    center: bool  # store only the centre square (True) or the whole short-side-resized image (False)
    min_image_size: int

    def as_key(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "interpolation": self.interpolation,
            "background": list(self.background),
            "crop": "center" if self.center else "full",
            "min_image_size": self.min_image_size,
        }


def _parse_background(text: str) -> tuple[int, int, int]:
    """Turn ``--background`` (a CSS colour name or #hex) into RGB, with an error that names the flag."""
    try:
        rgb = ImageColor.getrgb(text)
    except ValueError as err:
        raise DataError(f"--background {text!r} is not a colour name or #rrggbb hex value") from err
    return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


def _composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Alpha-composite straight (non-premultiplied) RGBA onto an opaque colour, rounding to nearest.

    Why not ``convert("RGB")``: PIL simply drops alpha, which keeps the arbitrary colour stored under fully
    transparent pixels (often black or garbage) and makes emoji edges dark.
    """
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:4].astype(np.uint32)
    bg = np.asarray(background, dtype=np.uint32)
    mixed = rgb * alpha + bg * (255 - alpha)
    return ((mixed + 127) // 255).astype(np.uint8)


def _high_bit_depth_to_rgb(img: Image.Image) -> np.ndarray:
    """Scale 16-bit (``I;16*``, ``I``) and float (``F``) grayscale to 8 bits instead of clipping at 255.

    PIL's own ``convert("RGB")`` clips those modes, turning most 16-bit scans pure white.
    """
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        scale = 255.0 if values.size and float(np.nanmax(values)) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    gray = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def _to_rgb_array(img: Image.Image, background: tuple[int, int, int]) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8, compositing transparency (alpha, palette or colour-key) onto ``background``."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_bit_depth_to_rgb(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        return _composite(np.asarray(img.convert("RGBA")), background)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def _resize_short_side(rgb: np.ndarray, recipe: _Recipe) -> np.ndarray:
    """Resize so the shorter side equals ``resolution``; optionally keep only the centre square."""
    height, width = rgb.shape[:2]
    res = recipe.resolution
    if min(height, width) != res:
        scale = res / min(height, width)
        new_w = res if width <= height else max(res, round(width * scale))
        new_h = res if height <= width else max(res, round(height * scale))
        img = Image.fromarray(rgb).resize((new_w, new_h), _INTERPOLATIONS[recipe.interpolation])
        rgb = np.asarray(img)
        height, width = new_h, new_w
    if recipe.center:
        top, left = (height - res) // 2, (width - res) // 2
        rgb = rgb[top : top + res, left : left + res]
    return np.ascontiguousarray(rgb)


@dataclass
class _Decoded:
    """The result of decoding one item: pixels, or ``None`` with the reason it was skipped."""

    pixels: np.ndarray | None
    upscaled: bool = False
    skipped_because: str | None = None  # "unreadable" or "WxH, under --min_image_size N"


def _open(item: Any) -> Image.Image:
    """Open a path, raw bytes, a ``datasets`` Image dict or a PIL image."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            return _open(item["bytes"])
        if item.get("path"):
            return Image.open(item["path"])
        raise OSError("empty image entry")
    if isinstance(item, (bytes, bytearray, memoryview)):
        import io

        return Image.open(io.BytesIO(bytes(item)))
    return Image.open(item)


def _decode(item: Any, name: str, recipe: _Recipe) -> _Decoded:
    """Decode one image with the recipe; unreadable and too-small files come back without pixels and with a reason.

    Why skip small images instead of upscaling them: a 12-pixel thumbnail upscaled to 64 px would teach the model
    blur, the one thing this project exists to avoid. Why skip rather than stop: one stray icon in a folder of
    thousands should not end a run; the skipped files are named in a warning and listed in a log file.
    """
    try:
        with _open(item) as img:
            img.load()
            width, height = img.size
            if min(width, height) < recipe.min_image_size:
                return _Decoded(
                    None, skipped_because=f"{width}x{height}, under --min_image_size {recipe.min_image_size}"
                )
            if img.getexif().get(0x0112, 1) != 1:  # camera rotation tag: photos should be upright
                img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb_array(img, recipe.background)
    except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError, EOFError):
        return _Decoded(None, skipped_because="unreadable")
    upscaled = min(rgb.shape[:2]) < recipe.resolution
    return _Decoded(_resize_short_side(rgb, recipe), upscaled)


# ----------------------------------------------------------------------------------------------------------------------
# Sources: each yields a stable identity (for the cache key), decodable items, names and metadata rows
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """A list of images before decoding: enough to build the cache key without reading any pixels."""

    description: str
    identity: str  # changes whenever the images change (file stats or dataset fingerprint)
    names: list[str]  # human-readable name per item, for warnings and errors
    metadata: list[dict[str, Any]] | None
    captions: list[str] | None
    fetch: Callable[[int, int], list[Any]]  # items[start:end] as things `_open` accepts

    def __len__(self) -> int:
        return len(self.names)


def _read_metadata_file(folder: Path) -> list[dict[str, Any]] | None:
    """Rows of ``metadata.jsonl`` (or ``metadata.csv``) at the folder root, as in datasets' imagefolder."""
    jsonl, csv_path = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.exists():
        rows = []
        with jsonl.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{jsonl}:{line_no} is not valid JSON ({err.msg}) (--train_data_dir)") from err
        return rows
    if csv_path.exists():
        with csv_path.open(encoding="utf-8", newline="") as handle:
            return list(csv.DictReader(handle))
    return None


def _list_image_files(folder: Path) -> list[Path]:
    """All image files below ``folder`` (recursive), sorted for a stable order across machines."""
    files = []
    for path in folder.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if path.suffix.lower() in IMAGE_EXTENSIONS and not hidden and path.is_file():
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _check_caption_column(column: str | None, available: Sequence[str], where: str) -> None:
    if column is not None and column not in available:
        raise DataError(
            f"--caption_column {column!r} is not a column of {where}; available columns: {sorted(available)}"
        )


def _folder_source(folder: Path, config: Any, flag: str, description: str | None = None) -> _Source:
    """A folder of images (recursive) with an optional imagefolder-style metadata file."""
    if not folder.exists():
        raise DataError(f"{flag} {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{flag} {folder} is not a folder")
    files = _list_image_files(folder)
    if not files:
        raise DataError(
            f"no images found in {folder} ({flag}); looked recursively for files ending in "
            f"{', '.join(IMAGE_EXTENSIONS)}"
        )
    if config.max_train_samples is not None:
        files = files[: max(0, int(config.max_train_samples))]
    names = [p.relative_to(folder).as_posix() for p in files]
    rows = _read_metadata_file(folder)
    metadata = captions = None
    if rows is not None:
        if rows and "file_name" not in rows[0]:
            raise DataError(f"the metadata file in {folder} has no 'file_name' column ({flag})")
        by_name = {str(row.get("file_name")): row for row in rows}
        columns = list(rows[0].keys()) if rows else ["file_name"]
        metadata = [dict(by_name.get(name, {"file_name": name})) for name in names]
        _check_caption_column(config.caption_column, columns, f"the metadata file in {folder}")
        if config.caption_column is not None:
            captions = [str(row.get(config.caption_column) or "") for row in metadata]
    elif config.caption_column is not None:
        raise DataError(
            f"--caption_column {config.caption_column!r} was given but {folder} has no metadata.jsonl / metadata.csv"
        )
    digest = hashlib.sha256()
    for path, name in zip(files, names):
        stat = path.stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    for meta in (folder / "metadata.jsonl", folder / "metadata.csv"):
        if meta.exists():
            stat = meta.stat()
            digest.update(f"{meta.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return _Source(
        description=description or f"folder {folder} ({len(files)} image files)",
        identity=f"folder:{folder.resolve()}:{digest.hexdigest()}",
        names=names,
        metadata=metadata,
        captions=captions,
        fetch=lambda start, end: list(files[start:end]),
    )


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` was written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (path / "state.json").exists() or (path / "dataset_dict.json").exists()


def _open_hf_dataset(config: Any) -> Any:
    """Load ``--dataset_name`` with the ``datasets`` library as a single ``train`` split."""
    import datasets

    name = config.dataset_name
    local = Path(name).expanduser()
    try:
        if local.exists() and is_saved_dataset(local):
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if "train" in loaded:
                    return loaded["train"]
                if len(loaded) == 1:
                    return next(iter(loaded.values()))
                raise DataError(f"--dataset_name {name} has splits {list(loaded)} but no 'train' split")
            return loaded
        cache = str(cache_root(config) / "datasets") if getattr(config, "cache_dir", None) else None
        return datasets.load_dataset(
            str(local) if local.exists() else name, config.dataset_config_name, split="train", cache_dir=cache
        )
    except DataError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFoundError)
        raise DataError(f"could not load --dataset_name {name!r}: {type(err).__name__}: {err}") from err


def _dataset_source(config: Any) -> _Source:
    """A ``datasets`` dataset; images are fetched undecoded so that bad files are skipped rather than crashing."""
    import datasets

    ds = _open_hf_dataset(config)
    columns = list(ds.column_names)
    if config.image_column not in columns:
        raise DataError(
            f"--image_column {config.image_column!r} is not a column of --dataset_name {config.dataset_name}; "
            f"available columns: {columns}"
        )
    _check_caption_column(config.caption_column, columns, f"--dataset_name {config.dataset_name}")
    if config.max_train_samples is not None:
        ds = ds.select(range(min(len(ds), max(0, int(config.max_train_samples)))))
    if len(ds) == 0:
        raise DataError(f"--dataset_name {config.dataset_name} has no rows in its train split")
    if isinstance(ds.features[config.image_column], datasets.Image):
        ds = ds.cast_column(config.image_column, datasets.Image(decode=False))
    other = [c for c in columns if c != config.image_column]
    metadata = ds.select_columns(other).to_list() if other else None
    captions = [str(row[config.caption_column] or "") for row in metadata] if config.caption_column else None
    image_column = config.image_column
    return _Source(
        description=f"dataset {config.dataset_name} ({len(ds)} rows)",
        identity=f"dataset:{config.dataset_name}:{config.dataset_config_name}:{ds._fingerprint}:{len(ds)}",
        names=[f"{config.dataset_name}[{i}]" for i in range(len(ds))],
        metadata=metadata,
        captions=captions,
        fetch=lambda start, end: list(ds[start:end][image_column]),
    )


def _resolve_source(config: Any) -> _Source:
    """Pick the source from the flags: folder, then ``datasets``, then the embedded default."""
    if config.train_data_dir:
        return _folder_source(Path(config.train_data_dir).expanduser(), config, "--train_data_dir")
    if config.dataset_name:
        return _dataset_source(config)
    folder = embedded_dataset_dir()
    source = _folder_source(folder, config, "the embedded dataset folder", description="")
    source.description = f"embedded Noto Emoji subset ({len(source)} images, Apache-2.0, {folder})"
    return source


# ----------------------------------------------------------------------------------------------------------------------
# The on-disk cache
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _CacheContents:
    """What a finished cache folder holds, besides the pixel file."""

    index: np.ndarray  # int64 [N, 3]: byte offset, height, width of each stored image
    kept: np.ndarray  # int64 [N]: position of each stored image in the source list
    header: dict[str, Any] = field(default_factory=dict)


def _cache_key(source: _Source, recipe: _Recipe) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, "source": source.identity, **recipe.as_key()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _read_cache(folder: Path, key: str) -> _CacheContents | None:
    """Load and validate a cache folder; ``None`` when absent, stale or damaged (sizes must all agree)."""
    try:
        header = json.loads((folder / "header.json").read_text())
        if header.get("format") != CACHE_FORMAT or header.get("key") != key:
            return None
        index = np.load(folder / "index.npy", allow_pickle=False)
        kept = np.load(folder / "kept.npy", allow_pickle=False)
        count, total = int(header["num_images"]), int(header["pixels_bytes"])
        if index.shape != (count, 3) or kept.shape != (count,) or count == 0:
            return None
        sizes = index[:, 1] * index[:, 2] * 3
        expected_offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        if not np.array_equal(index[:, 0], expected_offsets) or int(sizes.sum()) != total:
            return None
        if (folder / "pixels.bin").stat().st_size != total:
            return None
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
    return _CacheContents(index=index, kept=kept, header=header)


def _decoded_stream(source: _Source, recipe: _Recipe, show_progress: bool) -> Iterator[tuple[int, _Decoded]]:
    """Decode the source in order, a chunk at a time, on a few threads (PIL releases the GIL while decoding)."""
    from tqdm.auto import tqdm

    workers = max(1, min(8, os.cpu_count() or 1))
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(source), desc="decoding images", unit="img", disable=not show_progress) as bar,
    ):
        for start in range(0, len(source), _DECODE_CHUNK):
            end = min(len(source), start + _DECODE_CHUNK)
            items = source.fetch(start, end)
            names = source.names[start:end]
            for offset, decoded in enumerate(
                pool.map(lambda pair: _decode(pair[0], pair[1], recipe), zip(items, names))
            ):
                yield start + offset, decoded
                bar.update(1)


def _build_cache(source: _Source, recipe: _Recipe, folder: Path, key: str, show_progress: bool) -> None:
    """Decode everything once into a temporary folder, then move it into place atomically.

    Pixels are appended to the file as they are decoded, so memory use does not grow with the dataset.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        index: list[tuple[int, int, int]] = []
        kept: list[int] = []
        skipped: list[str] = []
        upscaled = 0
        offset = 0
        with (tmp / "pixels.bin").open("wb") as handle:
            for position, decoded in _decoded_stream(source, recipe, show_progress):
                if decoded.pixels is None:
                    skipped.append(f"{source.names[position]} ({decoded.skipped_because})")
                    continue
                height, width = decoded.pixels.shape[:2]
                handle.write(decoded.pixels.tobytes())
                index.append((offset, height, width))
                kept.append(position)
                offset += height * width * 3
                upscaled += int(decoded.upscaled)
        if not kept:
            raise DataError(
                f"none of the {len(source)} images of {source.description} can be used "
                f"({_skip_summary(skipped, recipe)}; first: {', '.join(skipped[:5])})"
            )
        np.save(tmp / "index.npy", np.asarray(index, dtype=np.int64).reshape(-1, 3))
        np.save(tmp / "kept.npy", np.asarray(kept, dtype=np.int64))
        header = {
            "format": CACHE_FORMAT,
            "key": key,
            "num_images": len(kept),
            "pixels_bytes": offset,
            "num_skipped": len(skipped),
            "num_too_small": sum(_is_too_small(entry) for entry in skipped),
            "skipped": skipped[:_MAX_SKIPPED_NAMES],
            "num_upscaled": upscaled,
            "source": source.description,
            **recipe.as_key(),
        }
        (tmp / SKIPPED_FILE).write_text("".join(f"{entry}\n" for entry in skipped), encoding="utf-8")
        (tmp / "header.json").write_text(json.dumps(header, indent=1))
        if _read_cache(folder, key) is not None:  # another process (e.g. a second GPU rank) finished first
            return
        if folder.exists():
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:
            if _read_cache(folder, key) is None:  # not a concurrent writer's finished copy: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _is_too_small(entry: str) -> bool:
    return "--min_image_size" in entry


def _skip_summary(skipped: Sequence[str], recipe: _Recipe) -> str:
    """``"2 unreadable, 1 under --min_image_size 16"`` for a list of skipped-file entries."""
    too_small = sum(_is_too_small(entry) for entry in skipped)
    return f"{len(skipped) - too_small} unreadable, {too_small} under --min_image_size {recipe.min_image_size}"


def skipped_entries(folder: Path, header: dict[str, Any]) -> list[str]:
    """Every skipped file of a cache as ``"name (reason)"`` (caches written before the list existed: the first 20)."""
    try:
        return (folder / SKIPPED_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return [str(name) for name in header.get("skipped", [])]


def write_skipped_log(entries: Sequence[str], output_dir: str | os.PathLike) -> Path:
    """The full list of skipped files, one ``name (reason)`` a line, in ``OUTPUT_DIR/skipped_images.txt``."""
    return write_text_atomic(Path(output_dir) / SKIPPED_LOG_NAME, "".join(f"{entry}\n" for entry in entries))


def _warn_about(header: dict[str, Any], source: _Source, recipe: _Recipe, log_path: Path | None) -> None:
    """One warning for skipped files and one for upscaled images, on every load (also from the cache)."""
    skipped = int(header.get("num_skipped", 0))
    if skipped:
        names = ", ".join(header.get("skipped", [])[:5])
        more = " ..." if skipped > 5 else ""
        too_small = int(header.get("num_too_small", 0))
        where = f"; the full list is in {log_path}" if log_path is not None else ""
        warnings.warn(
            f"skipped {skipped} image(s) of {source.description} ({skipped - too_small} unreadable or truncated, "
            f"{too_small} under --min_image_size {recipe.min_image_size}): {names}{more}{where}",
            UserWarning,
            stacklevel=3,
        )
    upscaled = int(header.get("num_upscaled", 0))
    if upscaled:
        warnings.warn(
            f"{upscaled} image(s) of {source.description} are smaller than --resolution {recipe.resolution} and were "
            f"upscaled (expect softer samples); raise --min_image_size to reject them",
            UserWarning,
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------------------------------------
# The dataset object
# ----------------------------------------------------------------------------------------------------------------------


class ImageData:
    """Decoded, resized uint8 images on disk (memory-mapped) plus their metadata, ready to be batched.

    Attributes: ``num_images``, ``resolution``, ``captions`` (or ``None``), ``metadata`` (rows aligned with the
    images, or ``None``), ``source`` (human description), ``num_skipped`` (unreadable or too-small files),
    ``skipped_names`` (every one, as ``"name (reason)"``), ``cache_path`` and
    ``cache_hit`` (whether this load decoded nothing).
    """

    def __init__(
        self,
        pixels: np.ndarray,
        index: np.ndarray,
        *,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        color_jitter: float,
        blur_prob: float,
        blur_sigma: float,
        captions: list[str] | None,
        metadata: list[dict[str, Any]] | None,
        source: str,
        num_skipped: int,
        skipped_names: list[str],
        cache_path: Path,
        cache_hit: bool,
    ) -> None:
        self._pixels = pixels
        self._index = index
        self._resident: torch.Tensor | None = None  # all images on a device, see keep_on_device
        self.num_images = int(index.shape[0])
        self.resolution = int(resolution)
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)
        self.color_jitter = float(color_jitter)
        self.blur_prob = float(blur_prob)
        self.blur_sigma = float(blur_sigma)
        self.captions = captions
        self.metadata = metadata
        self.source = source
        self.num_skipped = int(num_skipped)
        self.skipped_names = skipped_names
        self.cache_path = cache_path
        self.cache_hit = cache_hit

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return f"ImageData({self.num_images} images at {self.resolution}px from {self.source})"

    def stored_image(self, i: int) -> np.ndarray:
        """The stored HxWx3 uint8 image ``i`` (short side == resolution), a read-only view of the memory map."""
        offset, height, width = (int(v) for v in self._index[i])
        return self._pixels[offset : offset + height * width * 3].reshape(height, width, 3)

    def _crop(self, i: int, u_top: float, u_left: float, center: bool) -> np.ndarray:
        """An RxR crop of image ``i``: centred, or placed by two uniform numbers in [0, 1)."""
        image = self.stored_image(i)
        height, width = image.shape[:2]
        res = self.resolution
        if center:
            top, left = (height - res) // 2, (width - res) // 2
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

    def keep_on_device(self, device: torch.device | str, max_bytes: int | None = None) -> bool:
        """Copy all stored images to ``device`` as one uint8 tensor, so batches never leave it; True if done.

        Only when every stored image has the same size (always with ``--center_crop``; common for icon and emoji
        sets) and the pixels fit in ``max_bytes`` (default: a quarter of the GPU's free memory; 1,000 emoji at
        64 px are 12 MB). Otherwise batches keep coming from the memory map through pinned memory.
        """
        device = torch.device(device)
        sizes = self._index[:, 1:]
        if self.num_images == 0 or not (sizes == sizes[0]).all():
            return False
        height, width = (int(v) for v in sizes[0])
        total = self.num_images * height * width * 3
        if max_bytes is None:
            max_bytes = torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else 0
        if total > max_bytes:
            return False
        pixels = np.ascontiguousarray(self._pixels[:total]).reshape(self.num_images, height, width, 3)
        self._resident = torch.from_numpy(pixels).to(device)
        return True

    @property
    def resident_device(self) -> torch.device | None:
        """Where ``keep_on_device`` put the images, or None (batches come from the memory map)."""
        return None if self._resident is None else self._resident.device

    def _crop_offsets(self, ids: list[int], u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top and left corner of each RxR crop: centred, or placed by two uniform numbers in [0, 1) per image."""
        heights, widths = self._index[ids, 1], self._index[ids, 2]
        res = self.resolution
        if self.center_crop:
            return (heights - res) // 2, (widths - res) // 2
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

        Exactly ``7 * B`` uniform numbers are drawn from ``generator`` per call whatever the options, so the data
        stream of a resumed run (generator state restored from a checkpoint) is identical bit for bit. Nothing here
        waits for the device: crops are gathered on it (``keep_on_device``) or copied from pinned memory without
        blocking, and the blur is applied with a mask rather than by asking the device which images drew it.
        """
        ids = _as_index_list(indices)
        draws = torch.rand(len(ids), _DRAWS_PER_IMAGE, generator=generator, device=generator.device).cpu().double()
        x = uint8_to_unit(self._crops_uint8(ids, draws.numpy(), device).permute(0, 3, 1, 2))
        draws = to_device(draws.float(), x.device)
        if self.random_flip:
            flip = (draws[:, 2] < 0.5).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(3), x)
        if self.color_jitter > 0:
            x = _color_jitter(x, draws[:, 3:6], self.color_jitter)
        if self.blur_prob > 0 and self.blur_sigma > 0:
            chosen = (draws[:, 6] < self.blur_prob).view(-1, 1, 1, 1)
            x = torch.where(chosen, gaussian_blur(x, self.blur_sigma), x)
        return x.mul_(2.0).sub_(1.0).contiguous()


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


def _color_jitter(x: torch.Tensor, uniforms: torch.Tensor, strength: float) -> torch.Tensor:
    """Brightness, contrast and saturation each scaled by a factor in [1 - s, 1 + s] (uniforms in [0, 1))."""
    factors = (1.0 + strength * (2.0 * uniforms - 1.0)).view(-1, 3, 1, 1, 1)
    brightness, contrast, saturation = factors[:, 0], factors[:, 1], factors[:, 2]
    x = (x * brightness).clamp_(0.0, 1.0)
    mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp_(0.0, 1.0)
    gray = _luma(x)
    return ((x - gray) * saturation + gray).clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------


def _check_config(config: Any) -> None:
    if int(config.resolution) < 1:
        raise DataError(f"--resolution must be positive, got {config.resolution}")
    if config.interpolation not in _INTERPOLATIONS:
        raise DataError(f"--interpolation {config.interpolation!r} is not one of {sorted(_INTERPOLATIONS)}")
    if not 0.0 <= float(config.color_jitter) <= 1.0:
        raise DataError(f"--color_jitter must be within [0, 1], got {config.color_jitter}")
    if not 0.0 <= float(config.blur_prob) <= 1.0:
        raise DataError(f"--blur_prob must be within [0, 1], got {config.blur_prob}")
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


def load_images(config: Any, *, for_latents: bool = False, show_progress: bool = True) -> ImageData:
    """Load the images named by the data flags of ``config`` (a ``DataConfig`` or anything with its attributes).

    The first call decodes and caches; later calls with the same files and preprocessing memory-map the cache.
    ``for_latents=True`` stores centre crops only, whatever ``--center_crop`` says: a latent cache encodes each image
    once, so there is no later random crop to keep the full image for.
    """
    _check_config(config)
    recipe = _Recipe(
        resolution=int(config.resolution),
        interpolation=str(config.interpolation),
        background=_parse_background(config.background),
        center=bool(config.center_crop) or for_latents,
        min_image_size=int(config.min_image_size),
    )
    source = _resolve_source(config)
    key = _cache_key(source, recipe)
    folder = cache_root(config) / "images" / key
    contents = _read_cache(folder, key)
    cache_hit = contents is not None
    if contents is None:
        if (folder / "header.json").exists():
            warnings.warn(f"image cache {folder} is damaged or stale; rebuilding it", UserWarning, stacklevel=2)
        _build_cache(source, recipe, folder, key, show_progress)
        contents = _read_cache(folder, key)
        if contents is None:
            raise RuntimeError(f"the image cache just written to {folder} does not validate; is the disk full?")
    skipped = skipped_entries(folder, contents.header)
    _warn_about(contents.header, source, recipe, _skipped_log(skipped, folder, config))
    kept = contents.kept.tolist()
    pixels = np.memmap(folder / "pixels.bin", dtype=np.uint8, mode="r")
    return ImageData(
        pixels,
        contents.index,
        resolution=recipe.resolution,
        center_crop=recipe.center,
        random_flip=bool(config.random_flip),
        color_jitter=float(config.color_jitter),
        blur_prob=float(config.blur_prob),
        blur_sigma=float(config.blur_sigma),
        captions=[source.captions[i] for i in kept] if source.captions is not None else None,
        metadata=[source.metadata[i] for i in kept] if source.metadata is not None else None,
        source=source.description,
        num_skipped=int(contents.header.get("num_skipped", 0)),
        skipped_names=skipped,
        cache_path=folder,
        cache_hit=cache_hit,
    )
