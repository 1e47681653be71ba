"""The latent cache, one concept past 500 lines (its key, build, checksums and repair guard one file format): every
training image encoded ONCE by the VAE, stored on disk, reused across runs and processes.

Why cache posterior parameters instead of encoding every step: the VAE encoder costs as much as (or more than) a
small UNet's forward pass, and it never changes while the diffusion model trains. Storing the posterior's mean and
log-variance (not a single sample) keeps what training through the encoder would have seen: every epoch draws a
fresh ``z = mean + std * eps`` (see ``crispdiff.latent.space.LatentSpace``). With ``--random_flip`` the horizontally
flipped image is encoded too — a convolutional encoder is not flip-equivariant, so flipping the latent would not be
the latent of the flipped image.

Layout of one cache folder ``<latent cache dir>/<key>/``:

- ``mean.npy`` and ``logvar.npy``: ``[N, V, C, h, w]`` arrays (V = 2 with flips, else 1) in float16 or float32,
  written through a memory map and read back as one, so datasets larger than RAM work;
- ``chunks/NNNNNN.json``: one record per chunk of ``chunk_size`` images, written once its rows are flushed, holding
  each image's digest. A build that was interrupted RESUMES at the chunks without a record, after checking the
  recorded ones (a damaged chunk is re-encoded rather than used);
- ``digests.npy`` and ``header.json``: the key, the spec it hashes, the shape, ``complete``, and the two arrays'
  sizes and modification times. A file whose shape, dtype or size is wrong makes the whole folder rebuild.

A load reads no latent: it compares the arrays' sizes and times with the header (arrays modified since are checked
chunk by chunk and repaired), and each image's latents are checked against their digest the first time this process
reads them (``LatentCache.posterior``); a mismatch there removes the chunk's record, so the next run re-encodes it,
and stops the run with an error saying so.

The key hashes the data identity (the image cache's key from ``crispdiff.data.loading``, which covers the files and the
preprocessing recipe), the preprocessing flags, the VAE's weights fingerprint, the storage dtype and the flip
setting: changing any of them selects a different folder, so a stale cache is never read.

Concurrency: under ``accelerate launch`` every process encodes its share of the chunks (rank r takes chunks r, r + N,
...) and the main process records the header after a barrier (:mod:`crispdiff.core.shared_build`); the main process
holds an exclusive file lock (``<key>.lock``) meanwhile, so two runs that start together encode once.

Storage dtype: float16 by default. Rounding to float16 moves a latent by at most 2**-11 of its magnitude: far less
than the posterior noise every training sample carries anyway, below the smallest noise level of the schedule, and
invisible after decoding — while it halves disk, page cache and read bandwidth. ``--latent_cache_dtype
float32`` keeps the encoder's exact output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crispdiff.core.checksums import DIGEST_SIZE, FirstReadCheck, digests_array, file_checksum, item_digest
from crispdiff.core.errors import DataError
from crispdiff.core.images import uint8_to_model
from crispdiff.core.io import write_atomic, write_json_atomic
from crispdiff.core.shared_build import BuildPlan, Processes, build_in_parts, build_lock
from crispdiff.latent.vae import AnyVAE, encode_posterior, latent_channels, vae_downsample_factor, weights_fingerprint

__all__ = [
    "CACHE_FORMAT",
    "DTYPES",
    "LatentCache",
    "LatentCacheSpec",
    "data_identity",
    "load_or_build_latent_cache",
    "make_cache_spec",
]

#: Bump when the layout or the encoding recipe changes, so old caches are never read.
CACHE_FORMAT = 2  # 2: one record per chunk, per-image digests checked on first read
CHUNKS_DIR = "chunks"

#: Storage dtypes offered by ``--latent_cache_dtype``.
DTYPES = {"float16": np.float16, "float32": np.float32}

_ARRAYS = ("mean", "logvar")


class LatentCacheError(RuntimeError):
    """The cache could not be built (non-finite latents, an unwritable folder ...); the message says what to change."""


@dataclass(frozen=True)
class LatentCacheSpec:
    """Everything that determines the cached numbers; its hash is the cache folder's name."""

    data_identity: str
    num_images: int
    resolution: int
    preprocessing: dict[str, Any]
    random_flip: bool
    vae_fingerprint: str
    vae_class: str
    latent_shape: tuple[int, int, int]  # C, h, w
    dtype: str
    crop_positions: int = 1  # random crops: crops at this many positions of each image (1: the centre crop)

    @property
    def num_flips(self) -> int:
        return 2 if self.random_flip else 1

    @property
    def num_variants(self) -> int:
        """Latents per image: crop positions x flips, variant ``crop * num_flips + flipped``."""
        return self.crop_positions * self.num_flips

    def crop_position(self, crop: int) -> float:
        """Where crop ``crop`` lies in each image's slack, 0 .. 1 (the centre, 0.5, for a single crop)."""
        return 0.5 if self.crop_positions == 1 else crop / (self.crop_positions - 1)

    @property
    def array_shape(self) -> tuple[int, ...]:
        return (self.num_images, self.num_variants, *self.latent_shape)

    def as_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["latent_shape"] = list(self.latent_shape)
        if self.crop_positions == 1:
            del payload["crop_positions"]  # centre-crop caches keep the key they had before random crops existed
        return payload

    def key(self) -> str:
        payload = json.dumps({"format": CACHE_FORMAT, **self.as_json()}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]


def data_identity(data: Any) -> str:
    """A string that changes whenever the stored images change.

    ``crispdiff.data.loading.ImageData`` keeps its decode cache in a folder named by a key over the source files (names,
    sizes, modification times) and the decoding recipe — exactly the identity we need, for free. Anything else with
    ``center_crops()`` is hashed by its pixels, chunk by chunk so memory stays flat.
    """
    cache_path = getattr(data, "cache_path", None)
    if cache_path is not None:
        return f"image-cache:{Path(cache_path).name}:{len(data)}"
    digest = hashlib.sha256()
    for start in range(0, len(data), 1024):
        crops = data.center_crops(range(start, min(len(data), start + 1024)))
        digest.update(crops.contiguous().numpy().tobytes())
    return f"pixels:{digest.hexdigest()}:{len(data)}"


def make_cache_spec(
    data: Any,
    vae: AnyVAE,
    *,
    preprocessing: dict[str, Any],
    random_flip: bool,
    dtype: str = "float16",
    crop_positions: int = 1,
) -> LatentCacheSpec:
    """The spec of the cache for this data, preprocessing, VAE and storage dtype (checks the shapes fit)."""
    if crop_positions < 1:
        raise ValueError(f"--random_crop_positions must be >= 1, got {crop_positions}")
    if dtype not in DTYPES:
        raise ValueError(f"--latent_cache_dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    resolution = int(data.resolution)
    factor = vae_downsample_factor(vae)
    if resolution % factor:
        raise ValueError(
            f"--resolution {resolution} is not divisible by the VAE's downsampling factor {factor}; "
            f"pick a multiple of {factor} (or another --pretrained_vae_name_or_path)"
        )
    side = resolution // factor
    return LatentCacheSpec(
        data_identity=data_identity(data),
        num_images=len(data),
        resolution=resolution,
        preprocessing=dict(preprocessing),
        random_flip=bool(random_flip),
        vae_fingerprint=weights_fingerprint(vae),
        vae_class=type(vae).__name__,
        latent_shape=(latent_channels(vae), side, side),
        dtype=dtype,
        crop_positions=int(crop_positions),
    )


class LatentCache:
    """A finished, verified cache: memory-mapped ``mean`` / ``logvar`` arrays of shape ``[N, V, C, h, w]``.

    ``encoded_images`` is how many images this load had to encode (0 when the cache was reused as is).
    """

    def __init__(
        self,
        folder: Path,
        spec: LatentCacheSpec,
        mean: np.ndarray,
        logvar: np.ndarray,
        encoded: int,
        digests: np.ndarray,
        chunk_size: int,
    ):
        self.folder = folder
        self.spec = spec
        self.key = spec.key()
        self.mean = mean
        self.logvar = logvar
        self.encoded_images = encoded
        self.chunk_size = chunk_size
        self._check = FirstReadCheck(digests)
        self._resident: tuple[torch.Tensor, torch.Tensor] | None = None  # see keep_on_device

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    @property
    def num_variants(self) -> int:
        return int(self.mean.shape[1])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.mean.shape[2:])  # type: ignore[return-value]

    def keep_on_device(self, device: torch.device | str, max_bytes: int | None = None) -> bool:
        """Copy ``mean`` / ``logvar`` (in their storage dtype) to ``device`` when they fit; True if done.

        ``max_bytes`` defaults to a quarter of the GPU's free memory (1,000 emoji latents in float16: 4 MB).
        ``posterior`` then gathers on the device and returns device tensors.
        """
        device = torch.device(device)
        total = int(self.mean.nbytes) + int(self.logvar.nbytes)
        if max_bytes is None:
            max_bytes = torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else 0
        if total > max_bytes:
            return False
        self.check_rows(range(len(self)))  # all of them are read now: each checked on this first read
        self._resident = tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (self.mean, self.logvar))
        return True

    @property
    def resident_device(self) -> torch.device | None:
        """Where ``keep_on_device`` put the latents, or None (they are read from the memory map)."""
        return None if self._resident is None else self._resident[0].device

    def posterior(self, indices: torch.Tensor, variants: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(mean, logvar)`` of ``[B, C, h, w]`` for image ``indices[i]`` in variant ``variants[i]``.

        On the CPU from the memory map, or on the device of ``keep_on_device`` (the same values either way).
        """
        if self._resident is not None:
            on = self._resident[0].device
            rows, cols = indices.reshape(-1).to(on), variants.reshape(-1).to(on)
            return tuple(a[rows, cols].float() for a in self._resident)  # type: ignore[return-value]
        rows = indices.reshape(-1).cpu().numpy().astype(np.int64)
        cols = variants.reshape(-1).cpu().numpy().astype(np.int64)
        self.check_rows(rows.tolist())
        mean = torch.from_numpy(np.asarray(self.mean[rows, cols], dtype=np.float32))
        logvar = torch.from_numpy(np.asarray(self.logvar[rows, cols], dtype=np.float32))
        return mean, logvar

    def check_rows(self, rows: Any) -> None:
        """Check each image's latents against its digest the first time this process reads them; a damaged one
        removes its chunk's record (the next run re-encodes that chunk) and stops with an error saying so."""
        check = self._check
        for row in rows:
            if not check.checked[row] and not check.matches(row, self.mean[row], self.logvar[row]):
                chunk = row // self.chunk_size
                record = self.folder / CHUNKS_DIR / f"{chunk:06d}.json"
                record.unlink(missing_ok=True)
                raise DataError(
                    f"latent cache {self.folder} is damaged: the latents of image {row} (chunk {record.name}) no "
                    "longer match their checksum (a disk error, or the file was edited). Run again and that chunk is "
                    "encoded again (--resume_from_checkpoint latest continues a training run)"
                )

    def __repr__(self) -> str:
        return f"LatentCache({len(self)} images x {self.num_variants} variant(s) of {self.latent_shape}, {self.folder})"


# ----------------------------------------------------------------------------------------------------------------------
# On-disk state
# ----------------------------------------------------------------------------------------------------------------------


def _num_chunks(num_images: int, chunk_size: int) -> int:
    return max(1, -(-num_images // chunk_size))


def _chunk_bounds(chunk: int, chunk_size: int, num_images: int) -> tuple[int, int]:
    start = chunk * chunk_size
    return start, min(num_images, start + chunk_size)


def _record_file(folder: Path, chunk: int) -> Path:
    return folder / CHUNKS_DIR / f"{chunk:06d}.json"


def _row_digest(arrays: dict[str, np.ndarray], row: int) -> bytes:
    """The digest of one image's latents: its ``mean`` and ``logvar`` rows, every variant."""
    return item_digest(*(arrays[name][row] for name in _ARRAYS))


def _open_array(path: Path, spec: LatentCacheSpec, mode: str) -> np.ndarray | None:
    """Memory-map an existing ``.npy``; ``None`` when it is missing, truncated or of the wrong shape / dtype."""
    try:
        # always validate read-only first: numpy's "r+" silently EXTENDS a truncated file with zeros
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if tuple(array.shape) != spec.array_shape or array.dtype != np.dtype(DTYPES[spec.dtype]):
            return None
        if mode != "r":
            del array
            array = np.load(path, mmap_mode=mode, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return array


def _open_arrays(folder: Path, spec: LatentCacheSpec, mode: str) -> dict[str, np.ndarray] | None:
    arrays = {name: _open_array(folder / f"{name}.npy", spec, mode) for name in _ARRAYS}
    return None if any(array is None for array in arrays.values()) else arrays  # type: ignore[return-value]


def _file_stats(folder: Path) -> dict[str, list[int]]:
    """Size and modification time of the two arrays: what a load compares instead of reading them."""
    stats = {}
    for name in _ARRAYS:
        info = (folder / f"{name}.npy").stat()
        stats[name] = [info.st_size, info.st_mtime_ns]
    return stats


def _read_header(folder: Path, spec: LatentCacheSpec, chunk_size: int) -> dict[str, Any] | None:
    """The header when it describes this spec and chunking (finished or not); else None."""
    try:
        header = json.loads((folder / "header.json").read_text())
    except (OSError, ValueError):
        return None
    if (
        header.get("format") != CACHE_FORMAT
        or header.get("key") != spec.key()
        or header.get("chunk_size") != chunk_size
        or list(header.get("shape", [])) != list(spec.array_shape)
    ):
        return None
    return header


@dataclass
class _Found:
    """A finished cache folder as a load finds it (nothing but headers read, and one ``stat`` per file)."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray]
    digests: np.ndarray
    files_changed: bool  # the arrays' size or time differ from the header's: check every chunk
    missing_records: list[int]  # chunks whose record is gone (found damaged while training): encode again

    @property
    def whole(self) -> bool:
        return not self.files_changed and not self.missing_records


def _read_finished(folder: Path, spec: LatentCacheSpec, chunk_size: int) -> _Found | None:
    """The finished cache in ``folder`` and how it compares; None when there is none (or its index is damaged)."""
    header = _read_header(folder, spec, chunk_size)
    if header is None or not header.get("complete"):
        return None
    arrays = _open_arrays(folder, spec, "r")
    if arrays is None:
        return None
    try:
        if file_checksum(str(folder / "digests.npy")) != header["digests_blake2b"]:
            return None
        digests = np.load(folder / "digests.npy", allow_pickle=False)
        if digests.shape != (spec.num_images, DIGEST_SIZE):
            return None
        present = {path.name for path in (folder / CHUNKS_DIR).iterdir()}
    except (OSError, ValueError, KeyError):
        return None
    chunks = range(_num_chunks(spec.num_images, chunk_size))
    missing = [chunk for chunk in chunks if _record_file(folder, chunk).name not in present]
    return _Found(header, arrays, digests, _file_stats(folder) != header.get("files"), missing)


def _good_chunks(folder: Path, spec: LatentCacheSpec, chunk_size: int, arrays: dict[str, np.ndarray], check: bool):
    """``(good, bad)``: chunks whose record is present (and, with ``check``, whose rows all match it), and those
    whose record no longer matches the rows (their records are removed)."""
    good, bad = [], []
    for chunk in range(_num_chunks(spec.num_images, chunk_size)):
        try:
            digests = json.loads(_record_file(folder, chunk).read_text())["digests"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        start, end = _chunk_bounds(chunk, chunk_size, spec.num_images)
        intact = len(digests) == end - start and (
            not check or all(_row_digest(arrays, row).hex() == digests[row - start] for row in range(start, end))
        )
        if intact:
            good.append(chunk)
        else:
            bad.append(chunk)
            _record_file(folder, chunk).unlink(missing_ok=True)
    return good, bad


# ----------------------------------------------------------------------------------------------------------------------
# Building: the main process plans, every process encodes its share, the main process records
# ----------------------------------------------------------------------------------------------------------------------


def _encode_images(
    vae: AnyVAE, data: Any, start: int, end: int, spec: LatentCacheSpec, batch_size: int, progress: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Encode images ``start:end`` (and their mirror images with flips) in batches; returns ``[n, V, C, h, w]``."""
    means, logvars = [], []
    for batch_start in range(start, end, batch_size):
        batch_end = min(end, batch_start + batch_size)
        variants = []
        for crop in range(spec.crop_positions):
            rows = range(batch_start, batch_end)
            if spec.crop_positions == 1:
                pixels = data.center_crops(rows)
            else:
                pixels = data.crops_at(spec.crop_position(crop), rows)
            images = uint8_to_model(pixels)
            variants += [images, images.flip(3)] if spec.random_flip else [images]
        mean_v, logvar_v = zip(*(encode_posterior(vae, v) for v in variants))
        mean, logvar = torch.stack(mean_v, dim=1).cpu(), torch.stack(logvar_v, dim=1).cpu()
        if tuple(mean.shape[2:]) != spec.latent_shape:
            raise LatentCacheError(
                f"the VAE encoded {spec.resolution}px images to latents of shape {tuple(mean.shape[2:])}, not the "
                f"expected {spec.latent_shape}; is --pretrained_vae_name_or_path a standard AutoencoderKL / Tiny?"
            )
        means.append(mean.numpy())
        logvars.append(logvar.numpy())
        progress.update(batch_end - batch_start)
    return np.concatenate(means), np.concatenate(logvars)


def _to_storage(values: np.ndarray, dtype: str, what: str) -> np.ndarray:
    """Cast to the storage dtype, refusing non-finite values (an unstable VAE, or float16 overflow)."""
    stored = values.astype(DTYPES[dtype])
    if not np.isfinite(stored).all():
        hint = " (they overflow float16: pass --latent_cache_dtype float32)" if np.isfinite(values).all() else ""
        raise LatentCacheError(
            f"the VAE produced non-finite latent {what} values{hint}; check --pretrained_vae_name_or_path"
        )
    return stored


def _header(spec: LatentCacheSpec, chunk_size: int) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "key": spec.key(),
        "spec": spec.as_json(),
        "shape": list(spec.array_shape),
        "dtype": spec.dtype,
        "chunk_size": chunk_size,
        "complete": False,
    }


def _fresh_folder(folder: Path, spec: LatentCacheSpec) -> None:
    """Wipe ``folder`` and allocate new (sparse, zero) arrays."""
    if folder.exists():
        shutil.rmtree(folder)
    (folder / CHUNKS_DIR).mkdir(parents=True)
    for name in _ARRAYS:
        array = np.lib.format.open_memmap(
            folder / f"{name}.npy", mode="w+", dtype=DTYPES[spec.dtype], shape=spec.array_shape
        )
        array.flush()
        del array


def _plan(folder: Path, spec: LatentCacheSpec, chunk_size: int) -> BuildPlan:
    """What this load must do (main process, under the lock): nothing for a whole cache, else the chunks to encode.

    Records are trusted as they are when only some are missing; when the arrays changed since the header recorded
    them, or a build was interrupted, every recorded chunk is checked first and re-encoded if damaged.
    """
    found = _read_finished(folder, spec, chunk_size)
    if found is not None and found.whole:
        return BuildPlan()
    header = _read_header(folder, spec, chunk_size)
    arrays = _open_arrays(folder, spec, "r") if header is not None else None
    if arrays is None:
        if folder.exists():
            warnings.warn(f"latent cache {folder} is unreadable or stale; rebuilding it", UserWarning, stacklevel=4)
        _fresh_folder(folder, spec)
        todo = list(range(_num_chunks(spec.num_images, chunk_size)))
    else:
        check = found is None or found.files_changed
        good, bad = _good_chunks(folder, spec, chunk_size, arrays, check)
        del arrays  # the read-only maps go before the processes reopen the files to write
        if bad:
            warnings.warn(
                f"latent cache {folder}: {len(bad)} chunk(s) fail their checksum (corrupted file?); re-encoding them",
                UserWarning,
                stacklevel=4,
            )
        todo = [c for c in range(_num_chunks(spec.num_images, chunk_size)) if c not in set(good)]
    write_json_atomic(folder / "header.json", _header(spec, chunk_size), indent=1, sort_keys=True)
    return BuildPlan(todo=todo, record=True)


def _encode_chunks(
    folder: Path,
    spec: LatentCacheSpec,
    vae: AnyVAE,
    data: Any,
    chunks: list[int],
    *,
    chunk_size: int,
    batch_size: int,
    show_progress: bool,
) -> None:
    """Encode ``chunks`` (this process's share) into the shared arrays; each chunk's record follows its flushed rows."""
    from tqdm.auto import tqdm

    arrays = _open_arrays(folder, spec, "r+")
    if arrays is None:
        raise LatentCacheError(f"the latent cache arrays in {folder} vanished while building; is the disk full?")
    total = sum(end - start for start, end in (_chunk_bounds(c, chunk_size, spec.num_images) for c in chunks))
    was_training = vae.training
    vae.eval()
    try:
        with tqdm(total=total, desc="encoding latents", unit="img", disable=not show_progress or not total) as bar:
            for chunk in chunks:
                start, end = _chunk_bounds(chunk, chunk_size, spec.num_images)
                mean, logvar = _encode_images(vae, data, start, end, spec, batch_size, bar)
                arrays["mean"][start:end] = _to_storage(mean, spec.dtype, "mean")
                arrays["logvar"][start:end] = _to_storage(logvar, spec.dtype, "log-variance")
                for array in arrays.values():
                    array.flush()  # the bytes are on disk before the record vouches for them
                digests = [_row_digest(arrays, row).hex() for row in range(start, end)]
                write_json_atomic(_record_file(folder, chunk), {"digests": digests})
    finally:
        vae.train(was_training)


def _record(folder: Path, spec: LatentCacheSpec, chunk_size: int) -> None:
    """The main process, once every chunk is encoded: the digests of all images, then the finished header."""
    digests = []
    for chunk in range(_num_chunks(spec.num_images, chunk_size)):
        try:
            digests += json.loads(_record_file(folder, chunk).read_text())["digests"]
        except (OSError, ValueError, KeyError) as error:
            raise LatentCacheError(f"latent cache {folder}: chunk {chunk} has no record after encoding") from error
    write_atomic(folder / "digests.npy", lambda h: np.save(h, digests_array(digests), allow_pickle=False), binary=True)
    header = dict(
        _header(spec, chunk_size),
        complete=True,
        files=_file_stats(folder),
        digests_blake2b=file_checksum(str(folder / "digests.npy")),
    )
    write_json_atomic(folder / "header.json", header, indent=1, sort_keys=True)


def load_or_build_latent_cache(
    data: Any,
    vae: AnyVAE,
    cache_dir: str | os.PathLike,
    *,
    preprocessing: dict[str, Any],
    random_flip: bool,
    dtype: str = "float16",
    batch_size: int = 32,
    chunk_size: int = 256,
    show_progress: bool = True,
    crop_positions: int = 1,
    processes: Processes | None = None,
) -> LatentCache:
    """The latent cache of ``data`` under ``vae``: reused when it exists, resumed, repaired or built.

    ``data`` needs ``resolution``, ``__len__`` and ``center_crops(indices) -> uint8 [n, 3, R, R]`` (a
    ``crispdiff.data.loading.ImageData`` loaded with ``for_latents=True``). ``preprocessing`` is the recipe that
    produced its pixels (resolution, interpolation, background ...); it is part of the key. ``chunk_size`` images are
    committed at a time: the resume granularity and the unit of the processes' shares. Encoding runs in
    ``batch_size`` batches on the VAE's device. ``crop_positions`` > 1 (random crops): ``data.crops_at`` that many
    evenly spaced positions, each encoded. ``processes``: the run's ``Accelerator``; every one of its processes must
    call this, and they encode the missing chunks between them.
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("the latent cache needs batch_size >= 1 and chunk_size >= 1 (--vae_batch_size)")
    spec = make_cache_spec(
        data, vae, preprocessing=preprocessing, random_flip=random_flip, dtype=dtype, crop_positions=crop_positions
    )
    root = Path(cache_dir).expanduser()
    folder = root / spec.key()
    with build_lock(processes, root / f"{spec.key()}.lock"):
        plan = build_in_parts(
            processes,
            plan=lambda: _plan(folder, spec, chunk_size),
            build=lambda _, chunks: _encode_chunks(
                folder, spec, vae, data, chunks, chunk_size=chunk_size, batch_size=batch_size,
                show_progress=show_progress,
            ),  # fmt: skip
            record=lambda _: _record(folder, spec, chunk_size),
        )
    found = _read_finished(folder, spec, chunk_size)
    if found is None or not found.whole:
        raise LatentCacheError(f"the latent cache just written to {folder} does not verify; disk full?")
    encoded = sum(end - start for start, end in (_chunk_bounds(c, chunk_size, spec.num_images) for c in plan.todo))
    return LatentCache(folder, spec, found.arrays["mean"], found.arrays["logvar"], encoded, found.digests, chunk_size)
