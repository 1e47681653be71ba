"""The on-disk uint8 cache: every image decoded once into one memory-mappable file, plus the skipped-file list."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crispdiff.core.cores import available_cores
from crispdiff.core.errors import DataError
from crispdiff.core.io import finalise_tree, fsync_path, write_text_atomic
from crispdiff.data.decode import DecodedImage, DecodeRecipe, decode_image
from crispdiff.data.sources import ImageSource

#: Bump when the decoding recipe or the cache layout changes, so old caches are never reused.
CACHE_FORMAT = 2  # 2: the header holds a checksum of pixels.bin
_MAX_SKIPPED_NAMES = 20
#: In a cache folder: every skipped file, one ``name (reason)`` a line. Beside a run: the same list, for the user.
SKIPPED_FILE = "skipped.txt"
SKIPPED_LOG_NAME = "skipped_images.txt"
_DECODE_CHUNK = 256


# ----------------------------------------------------------------------------------------------------------------------
# The on-disk cache
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class CacheContents:
    """What a finished cache folder holds, besides the pixel file."""

    index: np.ndarray  # int64 [N, 3]: byte offset, height, width of each stored image
    kept: np.ndarray  # int64 [N]: position of each stored image in the source list
    header: dict[str, Any] = field(default_factory=dict)


def image_cache_key(source: ImageSource, recipe: DecodeRecipe) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, "source": source.identity, **recipe.as_key()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def pixels_checksum(path: Path, chunk: int = 1 << 24) -> str:
    """blake2b of the pixel file, read in 16 MiB chunks (one pass over the file, at disk speed)."""
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_image_cache(folder: Path, key: str) -> CacheContents | None:
    """Load and validate a cache folder; ``None`` when absent, stale or damaged.

    Sizes must all agree and the pixels must match their checksum: a power cut can leave a file of the right size
    full of zeros, which a size check would take for images.
    """
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
        if pixels_checksum(folder / "pixels.bin") != header["pixels_blake2b"]:
            return None
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
    return CacheContents(index=index, kept=kept, header=header)


def _decoded_stream(
    source: ImageSource, recipe: DecodeRecipe, show_progress: bool
) -> Iterator[tuple[int, DecodedImage]]:
    """Decode the source in order, a chunk at a time, on a few threads (PIL releases the GIL while decoding)."""
    from tqdm.auto import tqdm

    workers = max(1, min(8, available_cores()))
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(source), desc="decoding images", unit="img", disable=not show_progress) as bar,
    ):
        for start in range(0, len(source), _DECODE_CHUNK):
            end = min(len(source), start + _DECODE_CHUNK)
            items = source.fetch(start, end)
            names = source.names[start:end]
            for offset, decoded in enumerate(
                pool.map(lambda pair: decode_image(pair[0], pair[1], recipe), zip(items, names))
            ):
                yield start + offset, decoded
                bar.update(1)


def build_image_cache(source: ImageSource, recipe: DecodeRecipe, folder: Path, key: str, show_progress: bool) -> None:
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
        checksum = hashlib.blake2b(digest_size=16)
        with (tmp / "pixels.bin").open("wb") as handle:
            for position, decoded in _decoded_stream(source, recipe, show_progress):
                if decoded.pixels is None:
                    skipped.append(f"{source.names[position]} ({decoded.skipped_because})")
                    continue
                height, width = decoded.pixels.shape[:2]
                handle.write(block := decoded.pixels.tobytes())
                checksum.update(block)
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
            "pixels_blake2b": checksum.hexdigest(),
            "num_skipped": len(skipped),
            "num_too_small": sum(_is_too_small(entry) for entry in skipped),
            "skipped": skipped[:_MAX_SKIPPED_NAMES],
            "num_upscaled": upscaled,
            "source": source.description,
            **recipe.as_key(),
        }
        (tmp / SKIPPED_FILE).write_text("".join(f"{entry}\n" for entry in skipped), encoding="utf-8")
        (tmp / "header.json").write_text(json.dumps(header, indent=1))
        if read_image_cache(folder, key) is not None:  # another process (e.g. a second GPU rank) finished first
            return
        finalise_tree(tmp)  # fsynced before the rename: after a power cut the folder holds data, not zeros
        if folder.exists():
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
            fsync_path(folder.parent)
        except OSError:
            if read_image_cache(folder, key) is None:  # not a concurrent writer's finished copy: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _is_too_small(entry: str) -> bool:
    return "--min_image_size" in entry


def _skip_summary(skipped: Sequence[str], recipe: DecodeRecipe) -> str:
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


def warn_about_skipped(
    header: dict[str, Any], source: ImageSource, recipe: DecodeRecipe, log_path: Path | None
) -> None:
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
