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
- ``header.json``: the key, the spec it hashes, the shape, and one SHA-256 per chunk of ``chunk_size`` images, plus
  ``complete``. The header is rewritten atomically after every chunk, so an interrupted encode RESUMES at the first
  chunk that has no checksum yet, and a chunk whose bytes no longer match its checksum is re-encoded rather than
  used. A file whose shape, dtype or size is wrong makes the whole folder rebuild.

The key hashes the data identity (the image cache's key from ``crispdiff.data.loading``, which covers the files and the
preprocessing recipe), the preprocessing flags, the VAE's weights fingerprint, the storage dtype and the flip
setting: changing any of them selects a different folder, so a stale cache is never read.

Concurrency: the encoding runs under an exclusive file lock (``<key>.lock``), so two runs that start together
encode once; under ``accelerate launch`` the caller also wraps the build in ``main_process_first()`` so only rank 0
encodes and the other ranks find a finished cache.

Storage dtype: float16 by default. Rounding to float16 moves a latent by at most 2**-11 of its magnitude: far less
than the posterior noise every training sample carries anyway, below the smallest noise level of the schedule, and
invisible after decoding — while it halves disk, page cache and read bandwidth. ``--latent_cache_dtype
float32`` keeps the encoder's exact output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crispdiff.core.images import uint8_to_model
from crispdiff.core.io import write_json_atomic
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
CACHE_FORMAT = 1

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

    def __init__(self, folder: Path, spec: LatentCacheSpec, mean: np.ndarray, logvar: np.ndarray, encoded: int):
        self.folder = folder
        self.spec = spec
        self.key = spec.key()
        self.mean = mean
        self.logvar = logvar
        self.encoded_images = encoded
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
        mean = torch.from_numpy(np.asarray(self.mean[rows, cols], dtype=np.float32))
        logvar = torch.from_numpy(np.asarray(self.logvar[rows, cols], dtype=np.float32))
        return mean, logvar

    def __repr__(self) -> str:
        return f"LatentCache({len(self)} images x {self.num_variants} variant(s) of {self.latent_shape}, {self.folder})"


# ----------------------------------------------------------------------------------------------------------------------
# On-disk state
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _State:
    """What a cache folder holds right now: its header, its arrays and which chunks verify."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray]
    good: dict[int, str]  # chunk index -> checksum, for chunks whose bytes match the header
    bad: list[int]  # chunks recorded in the header whose bytes no longer match


def _num_chunks(num_images: int, chunk_size: int) -> int:
    return max(1, -(-num_images // chunk_size))


def _chunk_bounds(chunk: int, chunk_size: int, num_images: int) -> tuple[int, int]:
    start = chunk * chunk_size
    return start, min(num_images, start + chunk_size)


def _chunk_checksum(arrays: dict[str, np.ndarray], start: int, end: int) -> str:
    """SHA-256 over the chunk's bytes of every array (rows of ``[N, ...]`` arrays are contiguous)."""
    digest = hashlib.sha256()
    for name in _ARRAYS:
        digest.update(np.ascontiguousarray(arrays[name][start:end]).view(np.uint8).reshape(-1).data)
    return digest.hexdigest()


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


def _inspect(folder: Path, spec: LatentCacheSpec, chunk_size: int, mode: str = "r") -> _State | None:
    """Read and verify a cache folder; ``None`` when it cannot be repaired chunk by chunk (must be rebuilt)."""
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
    arrays = {}
    for name in _ARRAYS:
        array = _open_array(folder / f"{name}.npy", spec, mode)
        if array is None:
            return None
        arrays[name] = array
    good: dict[int, str] = {}
    bad: list[int] = []
    for chunk_text, checksum in dict(header.get("chunks", {})).items():
        chunk = int(chunk_text)
        start, end = _chunk_bounds(chunk, chunk_size, spec.num_images)
        if start >= end:
            return None
        if _chunk_checksum(arrays, start, end) == checksum:
            good[chunk] = checksum
        else:
            bad.append(chunk)
    return _State(header=header, arrays=arrays, good=good, bad=sorted(bad))


def _is_complete(state: _State | None, spec: LatentCacheSpec, chunk_size: int) -> bool:
    return (
        state is not None
        and bool(state.header.get("complete"))
        and not state.bad
        and len(state.good) == _num_chunks(spec.num_images, chunk_size)
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX ``flock``) so concurrent runs encode a cache once; a no-op elsewhere."""
    try:
        import fcntl
    except ImportError:  # Windows: rely on main_process_first() alone
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------------------------
# Encoding
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


def _fresh_state(folder: Path, spec: LatentCacheSpec, chunk_size: int) -> _State:
    """Wipe ``folder`` and allocate new (sparse, zero) arrays and an empty header."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    arrays = {
        name: np.lib.format.open_memmap(
            folder / f"{name}.npy", mode="w+", dtype=DTYPES[spec.dtype], shape=spec.array_shape
        )
        for name in _ARRAYS
    }
    header = {
        "format": CACHE_FORMAT,
        "key": spec.key(),
        "spec": spec.as_json(),
        "shape": list(spec.array_shape),
        "dtype": spec.dtype,
        "chunk_size": chunk_size,
        "chunks": {},
        "complete": False,
    }
    write_json_atomic(folder / "header.json", header, indent=1, sort_keys=True)
    return _State(header=header, arrays=arrays, good={}, bad=[])


def _encode_missing(
    folder: Path,
    spec: LatentCacheSpec,
    vae: AnyVAE,
    data: Any,
    *,
    chunk_size: int,
    batch_size: int,
    show_progress: bool,
) -> int:
    """Encode every chunk that has no valid checksum yet (all of them for a new cache); returns images encoded."""
    from tqdm.auto import tqdm

    state = _inspect(folder, spec, chunk_size, mode="r+")
    if state is None:
        if folder.exists():
            warnings.warn(f"latent cache {folder} is unreadable or stale; rebuilding it", UserWarning, stacklevel=3)
        state = _fresh_state(folder, spec, chunk_size)
    elif state.bad:
        warnings.warn(
            f"latent cache {folder}: {len(state.bad)} chunk(s) fail their checksum (corrupted file?); re-encoding them",
            UserWarning,
            stacklevel=3,
        )
    chunks = _num_chunks(spec.num_images, chunk_size)
    todo = [c for c in range(chunks) if c not in state.good]
    done_images = spec.num_images - sum(
        end - start for start, end in (_chunk_bounds(c, chunk_size, spec.num_images) for c in todo)
    )
    header = dict(state.header, chunks={str(c): h for c, h in sorted(state.good.items())}, complete=False)
    write_json_atomic(folder / "header.json", header, indent=1, sort_keys=True)
    was_training = vae.training
    vae.eval()
    encoded = 0
    try:
        with tqdm(
            total=spec.num_images,
            initial=done_images,
            desc="encoding latents" + (" (resumed)" if done_images else ""),
            unit="img",
            disable=not show_progress,
        ) as progress:
            for chunk in todo:
                start, end = _chunk_bounds(chunk, chunk_size, spec.num_images)
                mean, logvar = _encode_images(vae, data, start, end, spec, batch_size, progress)
                state.arrays["mean"][start:end] = _to_storage(mean, spec.dtype, "mean")
                state.arrays["logvar"][start:end] = _to_storage(logvar, spec.dtype, "log-variance")
                for array in state.arrays.values():
                    array.flush()  # the bytes are on disk before the header vouches for them
                header["chunks"][str(chunk)] = _chunk_checksum(state.arrays, start, end)
                write_json_atomic(folder / "header.json", header, indent=1, sort_keys=True)
                encoded += end - start
    finally:
        vae.train(was_training)
    header["complete"] = True
    write_json_atomic(folder / "header.json", header, indent=1, sort_keys=True)
    return encoded


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
) -> LatentCache:
    """The verified latent cache of ``data`` under ``vae``: reused when it exists, resumed, repaired or built.

    ``data`` needs ``resolution``, ``__len__`` and ``center_crops(indices) -> uint8 [n, 3, R, R]`` (a
    ``crispdiff.data.loading.ImageData`` loaded with ``for_latents=True``). ``preprocessing`` is the recipe that
    produced its pixels (resolution, interpolation, background ...); it is part of the key. ``chunk_size`` images are
    committed at a time: the resume granularity. Encoding runs in ``batch_size`` batches on the VAE's device.
    ``crop_positions`` > 1 (random crops): ``data.crops_at`` that many evenly spaced positions, each encoded.
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("the latent cache needs batch_size >= 1 and chunk_size >= 1 (--vae_batch_size)")
    spec = make_cache_spec(
        data, vae, preprocessing=preprocessing, random_flip=random_flip, dtype=dtype, crop_positions=crop_positions
    )
    root = Path(cache_dir).expanduser()
    folder = root / spec.key()
    encoded = 0
    state = _inspect(folder, spec, chunk_size)
    if not _is_complete(state, spec, chunk_size):
        with _file_lock(root / f"{spec.key()}.lock"):
            state = _inspect(folder, spec, chunk_size)  # another process may have finished it meanwhile
            if not _is_complete(state, spec, chunk_size):
                del state  # release the read-only maps before the writer reopens (or deletes) the files
                encoded = _encode_missing(
                    folder,
                    spec,
                    vae,
                    data,
                    chunk_size=chunk_size,
                    batch_size=batch_size,
                    show_progress=show_progress,
                )
                state = _inspect(folder, spec, chunk_size)
                if not _is_complete(state, spec, chunk_size):
                    raise LatentCacheError(f"the latent cache just written to {folder} does not verify; disk full?")
    assert state is not None
    return LatentCache(folder, spec, state.arrays["mean"], state.arrays["logvar"], encoded)
