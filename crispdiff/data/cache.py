"""The on-disk uint8 cache: every image decoded once into chunk files that are memory-mapped, plus the skipped-file
list.

Layout of one cache folder ``<cache_dir>/images/<key>/``:

- ``chunks/NNNNNN.bin``: the pixels of source items ``N * chunk_size`` .. ``(N + 1) * chunk_size - 1`` that decoded,
  back to back, and ``chunks/NNNNNN.json``, its record (each stored image's source position, size and blake2b
  digest, the skipped files, the chunk file's size and modification time). Each is written atomically, the record
  after its chunk file: a chunk with a record is done, so a build that was killed resumes at the chunks without one;
- ``index.npy`` (chunk, offset, height, width of every stored image), ``kept.npy`` (its source position),
  ``digests.npy``, ``skipped.txt``, and last ``header.json``: the manifest, written by the main process once every
  chunk is done. A folder without a valid manifest is not finished.

Under ``accelerate launch`` every process decodes its share of the chunks (rank r takes chunks r, r + N, ...) and
the main process writes the manifest after a barrier (:mod:`crispdiff.core.shared_build`).

Verification costs no pass over the data at start-up: a load checks the manifest against each chunk file's size and
modification time (one ``stat`` per chunk); each image's digest is checked the first time this process reads it
(:class:`crispdiff.core.checksums.FirstReadCheck`). A chunk whose file changed (size or time) is checked in full at
load and decoded again when damaged; a damaged image found while training stops the run with an error naming its
chunk, which is removed so that the next run decodes it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from crispdiff.core.checksums import DIGEST_SIZE, FirstReadCheck, digests_array, file_checksum, item_digest
from crispdiff.core.cores import available_cores
from crispdiff.core.errors import DataError
from crispdiff.core.io import write_atomic, write_json_atomic, write_text_atomic
from crispdiff.core.shared_build import BuildPlan
from crispdiff.data.decode import DecodeRecipe, decode_image
from crispdiff.data.sources import ImageSource

#: Bump when the decoding recipe or the cache layout changes, so old caches are never reused.
CACHE_FORMAT = 3  # 2: the header holds a checksum of pixels.bin; 3: chunk files, per-image digests
#: Source items per chunk file: the unit of a resumed build and of the processes' shares.
IMAGE_CHUNK_SIZE = 1024
_MAX_SKIPPED_NAMES = 20
#: In a cache folder: every skipped file, one ``name (reason)`` a line. Beside a run: the same list, for the user.
SKIPPED_FILE = "skipped.txt"
SKIPPED_LOG_NAME = "skipped_images.txt"
HEADER_FILE = "header.json"
CHUNKS_DIR = "chunks"
_ARRAYS = ("index.npy", "kept.npy", "digests.npy")
#: Chunk files kept memory-mapped at once (each map holds a file descriptor; the least recently used is closed).
_OPEN_CHUNKS = 256


# ----------------------------------------------------------------------------------------------------------------------
# Names and chunks
# ----------------------------------------------------------------------------------------------------------------------


def image_cache_key(source: ImageSource, recipe: DecodeRecipe, chunk_size: int = IMAGE_CHUNK_SIZE) -> str:
    payload = json.dumps(
        {"format": CACHE_FORMAT, "source": source.identity, "chunk_size": chunk_size, **recipe.as_key()},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def num_chunks(count: int, chunk_size: int) -> int:
    return max(1, -(-count // chunk_size))


def chunk_bounds(chunk: int, chunk_size: int, count: int) -> tuple[int, int]:
    start = chunk * chunk_size
    return start, min(count, start + chunk_size)


def chunk_file(folder: Path, chunk: int) -> Path:
    return folder / CHUNKS_DIR / f"{chunk:06d}.bin"


def record_file(folder: Path, chunk: int) -> Path:
    return folder / CHUNKS_DIR / f"{chunk:06d}.json"


# ----------------------------------------------------------------------------------------------------------------------
# Decoding chunks (every process its share)
# ----------------------------------------------------------------------------------------------------------------------


def _decode_chunk(
    source: ImageSource, recipe: DecodeRecipe, folder: Path, chunk: int, chunk_size: int, pool: Any, progress: Any
) -> None:
    """Decode one chunk of the source into its chunk file, then write its record (atomically, in that order)."""
    start, end = chunk_bounds(chunk, chunk_size, len(source))
    items, names = source.fetch(start, end), source.names[start:end]
    images: list[list[int]] = []
    digests: list[str] = []
    skipped: list[str] = []
    upscaled = 0

    def write(handle: IO[bytes]) -> None:
        nonlocal upscaled
        decoded_items = pool.map(lambda pair: decode_image(pair[0], pair[1], recipe), zip(items, names))
        for position, decoded in zip(range(start, end), decoded_items):
            progress.update(1)
            if decoded.pixels is None:
                skipped.append(f"{source.names[position]} ({decoded.skipped_because})")
                continue
            height, width = decoded.pixels.shape[:2]
            block = decoded.pixels.tobytes()
            handle.write(block)
            digests.append(item_digest(block).hex())
            images.append([position, height, width])
            upscaled += int(decoded.upscaled)

    path = write_atomic(chunk_file(folder, chunk), write, binary=True)
    stat = path.stat()
    record = {
        "first": start,
        "count": end - start,
        "images": images,
        "digests": digests,
        "skipped": skipped,
        "upscaled": upscaled,
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }
    write_json_atomic(record_file(folder, chunk), record, indent=None)


def decode_chunks(
    source: ImageSource,
    recipe: DecodeRecipe,
    folder: Path,
    chunks: Sequence[int],
    chunk_size: int,
    show_progress: bool,
) -> None:
    """Decode ``chunks`` (this process's share) on a few threads: PIL releases the GIL while decoding."""
    from tqdm.auto import tqdm

    total = sum(end - start for start, end in (chunk_bounds(c, chunk_size, len(source)) for c in chunks))
    workers = max(1, min(8, available_cores()))
    (folder / CHUNKS_DIR).mkdir(parents=True, exist_ok=True)
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=total, desc="decoding images", unit="img", disable=not show_progress or not total) as bar,
    ):
        for chunk in chunks:
            _decode_chunk(source, recipe, folder, chunk, chunk_size, pool, bar)


def read_record(folder: Path, chunk: int, chunk_size: int, count: int) -> dict[str, Any] | None:
    """A chunk's record when it belongs to this chunk and its chunk file has the recorded size; else None."""
    try:
        record = json.loads(record_file(folder, chunk).read_text())
        start, end = chunk_bounds(chunk, chunk_size, count)
        if record["first"] != start or record["count"] != end - start:
            return None
        sizes = [height * width * 3 for _, height, width in record["images"]]
        if len(record["digests"]) != len(sizes) or sum(sizes) != record["bytes"]:
            return None
        if chunk_file(folder, chunk).stat().st_size != record["bytes"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


def chunk_is_intact(folder: Path, chunk: int, record: dict[str, Any]) -> bool:
    """Whether every image of the chunk file matches its recorded digest (reads the whole chunk)."""
    pixels = np.fromfile(chunk_file(folder, chunk), dtype=np.uint8)
    offset = 0
    for (_, height, width), digest in zip(record["images"], record["digests"]):
        size = height * width * 3
        if item_digest(pixels[offset : offset + size]).hex() != digest:
            return False
        offset += size
    return True


# ----------------------------------------------------------------------------------------------------------------------
# The manifest (the main process, once every chunk is done) and reading it (every process, every load)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class CacheContents:
    """What a finished cache folder holds, as its manifest says, and how its chunk files compare."""

    folder: Path
    index: np.ndarray  # int64 [N, 4]: chunk, byte offset in it, height, width of each stored image
    kept: np.ndarray  # int64 [N]: position of each stored image in the source list
    digests: np.ndarray  # uint8 [N, DIGEST_SIZE]: each stored image's blake2b
    header: dict[str, Any] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)  # chunk files absent or of another size than recorded
    changed: list[int] = field(default_factory=list)  # chunk files of the recorded size but modified since

    @property
    def whole(self) -> bool:
        """Every chunk file as the manifest recorded it (their images are still checked on first read)."""
        return not self.missing and not self.changed


def _arrays_checksum(folder: Path) -> str:
    """One blake2b over the manifest's arrays (small: 40 bytes an image), so a damaged index is never used."""
    joined = "".join(file_checksum(str(folder / name)) for name in _ARRAYS)
    return hashlib.blake2b(joined.encode(), digest_size=16).hexdigest()


def _save_array(path: Path, array: np.ndarray) -> None:
    write_atomic(path, lambda handle: np.save(handle, array, allow_pickle=False), binary=True)


def record_image_cache(source: ImageSource, recipe: DecodeRecipe, folder: Path, key: str, chunk_size: int) -> None:
    """Write the manifest from the chunk records (main process, after every chunk is done); the header goes last."""
    count = len(source)
    records = [read_record(folder, chunk, chunk_size, count) for chunk in range(num_chunks(count, chunk_size))]
    lost = [chunk for chunk, record in enumerate(records) if record is None]
    if lost:
        raise RuntimeError(f"image cache {folder}: chunk(s) {lost[:5]} missing after decoding; is the disk full?")
    rows, kept, digests, skipped, upscaled = [], [], [], [], 0
    for chunk, record in enumerate(records):
        offset = 0
        for position, height, width in record["images"]:
            rows.append((chunk, offset, height, width))
            kept.append(position)
            offset += height * width * 3
        digests += record["digests"]
        skipped += record["skipped"]
        upscaled += int(record["upscaled"])
    if not kept:
        raise DataError(
            f"none of the {count} images of {source.description} can be used "
            f"({_skip_summary(skipped, recipe)}; first: {', '.join(skipped[:5])})"
        )
    _save_array(folder / "index.npy", np.asarray(rows, dtype=np.int64).reshape(-1, 4))
    _save_array(folder / "kept.npy", np.asarray(kept, dtype=np.int64))
    _save_array(folder / "digests.npy", digests_array(digests))
    write_text_atomic(folder / SKIPPED_FILE, "".join(f"{entry}\n" for entry in skipped))
    header = {
        "format": CACHE_FORMAT,
        "key": key,
        "num_images": len(kept),
        "chunk_size": chunk_size,
        "chunks": [[record["bytes"], record["mtime_ns"]] for record in records],
        "arrays_blake2b": _arrays_checksum(folder),
        "num_skipped": len(skipped),
        "num_too_small": sum(_is_too_small(entry) for entry in skipped),
        "skipped": skipped[:_MAX_SKIPPED_NAMES],
        "num_upscaled": upscaled,
        "source": source.description,
        **recipe.as_key(),
    }
    write_json_atomic(folder / HEADER_FILE, header, indent=1)


def _offsets_agree(index: np.ndarray, chunk_bytes: np.ndarray) -> bool:
    """Images lie back to back in their chunk, in chunk order, and fill each chunk exactly."""
    chunks, offsets, sizes = index[:, 0], index[:, 1], index[:, 2] * index[:, 3] * 3
    if (chunks < 0).any() or (chunks >= len(chunk_bytes)).any() or (np.diff(chunks) < 0).any():
        return False
    totals = np.bincount(chunks, weights=sizes, minlength=len(chunk_bytes)).astype(np.int64)
    bases = np.cumsum(totals) - totals
    expected = np.cumsum(sizes) - sizes - bases[chunks]
    return bool(np.array_equal(totals, chunk_bytes) and np.array_equal(offsets, expected))


def read_image_cache(folder: Path, key: str) -> CacheContents | None:
    """The manifest of a cache folder and how its chunk files compare (one ``stat`` each); ``None`` when it has no
    valid manifest (absent, stale, unfinished or damaged). No pixel is read."""
    try:
        header = json.loads((folder / HEADER_FILE).read_text())
        if header.get("format") != CACHE_FORMAT or header.get("key") != key:
            return None
        if _arrays_checksum(folder) != header["arrays_blake2b"]:
            return None
        index = np.load(folder / "index.npy", allow_pickle=False)
        kept = np.load(folder / "kept.npy", allow_pickle=False)
        digests = np.load(folder / "digests.npy", allow_pickle=False)
        count = int(header["num_images"])
        if count == 0 or index.shape != (count, 4) or kept.shape != (count,) or digests.shape != (count, DIGEST_SIZE):
            return None
        recorded = np.asarray(header["chunks"], dtype=np.int64).reshape(-1, 2)
        if not _offsets_agree(index, recorded[:, 0]):
            return None
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
    contents = CacheContents(folder=folder, index=index, kept=kept, digests=digests, header=header)
    for chunk, (size, mtime_ns) in enumerate(recorded.tolist()):
        try:
            stat = chunk_file(folder, chunk).stat()
        except OSError:
            contents.missing.append(chunk)
            continue
        if stat.st_size != size:
            contents.missing.append(chunk)
        elif stat.st_mtime_ns != mtime_ns:
            contents.changed.append(chunk)
    return contents


def plan_image_cache(source: ImageSource, folder: Path, key: str, chunk_size: int) -> BuildPlan:
    """What this load must do (the main process decides): nothing for a whole cache; else the chunks to decode.

    A chunk counts as done when its record and chunk file agree; one modified since its record (a copy, an edit, a
    power cut that zeroed it) is checked in full here and decoded again only if an image no longer matches.
    """
    found = read_image_cache(folder, key)
    if found is not None and found.whole:
        return BuildPlan()
    count = len(source)
    todo, checked = [], []
    for chunk in range(num_chunks(count, chunk_size)):
        record = read_record(folder, chunk, chunk_size, count)
        if record is None:
            todo.append(chunk)
        elif chunk_file(folder, chunk).stat().st_mtime_ns != record["mtime_ns"]:
            if chunk_is_intact(folder, chunk, record):
                checked.append((chunk, record))
            else:
                todo.append(chunk)
    for chunk, record in checked:  # intact after all: record the file's new time, so the next load trusts it
        mtime_ns = chunk_file(folder, chunk).stat().st_mtime_ns
        write_json_atomic(record_file(folder, chunk), dict(record, mtime_ns=mtime_ns), indent=None)
    if (folder / HEADER_FILE).exists():
        chunks = num_chunks(count, chunk_size)
        what = f"decoding {len(todo)} damaged or missing chunk(s) of {chunks} again" if todo else "recording it again"
        warnings.warn(f"image cache {folder} is damaged or stale; {what}", UserWarning, stacklevel=3)
    return BuildPlan(todo=todo, record=True)


# ----------------------------------------------------------------------------------------------------------------------
# Reading pixels: chunk files memory-mapped, each image checked on first read
# ----------------------------------------------------------------------------------------------------------------------


class ChunkedPixels:
    """The stored images of a cache folder: ``image(i)`` is a read-only HxWx3 view of its chunk file's memory map.

    An image's digest is checked the first time this process reads it; a mismatch removes the chunk (so the next
    run decodes it again) and stops with an error naming it, rather than train on wrong pixels.
    """

    def __init__(self, contents: CacheContents):
        self.folder = contents.folder
        self._index = contents.index
        self.sizes = contents.index[:, 2:4]
        self._check = FirstReadCheck(contents.digests)
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()

    def __len__(self) -> int:
        return len(self._index)

    def _map(self, chunk: int) -> np.memmap:
        """The chunk file's memory map, opened on first use; the least recently used beyond _OPEN_CHUNKS closes."""
        found = self._maps.get(chunk)
        if found is None:
            found = np.memmap(chunk_file(self.folder, chunk), dtype=np.uint8, mode="r")
            self._maps[chunk] = found
            if len(self._maps) > _OPEN_CHUNKS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(chunk)
        return found

    def image(self, i: int) -> np.ndarray:
        chunk, offset, height, width = (int(v) for v in self._index[i])
        flat = self._map(chunk)[offset : offset + height * width * 3]
        if not self._check.matches(i, flat):
            self._damaged(chunk, i)
        return flat.reshape(height, width, 3)

    def _damaged(self, chunk: int, i: int) -> None:
        path = chunk_file(self.folder, chunk)
        self._maps.pop(chunk, None)
        path.unlink(missing_ok=True)
        record_file(self.folder, chunk).unlink(missing_ok=True)
        raise DataError(
            f"image cache chunk {path} is damaged: stored image {i} no longer matches its checksum (a disk error, or "
            "the file was edited). The chunk was removed: run again and only its images are decoded again "
            "(--resume_from_checkpoint latest continues a training run)"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Skipped files
# ----------------------------------------------------------------------------------------------------------------------


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
