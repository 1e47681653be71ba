"""What does verifying the image cache's checksum cost at start-up?

    nice -n 10 python benchmarks/bench_cache_checksum.py --no_record    # ~1.5 min on 2 cores, ~2 GB of temp disk

Every ``load_images`` call on a cache hit reads the whole ``pixels.bin`` once to compare its blake2b with the header
(``crispdiff.data.cache.read_image_cache``): a power cut can leave a file of the right size full of zeros. Measured
here:

- the default data (the embedded Noto emoji, as the latent and the pixel trainer cache them), through the real
  ``load_images`` on a cache hit, and its ``read_image_cache`` alone;
- a 10,000-image cache at 64, 128 and 256 px (real layout, random pixels: the checksum does not care what they show).

Each is timed warm (the file in the page cache, as on a second run soon after the first) and cold (the file's pages
dropped with ``posix_fadvise(DONTNEED)``, as after a reboot; only that file's, so other work is not disturbed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import append_results, markdown_table

from crispdiff.data.cache import CACHE_FORMAT, pixels_checksum, read_image_cache


def drop_from_page_cache(path: Path) -> None:
    """Evict one file's clean pages, so the next read comes from the disk (Linux; a no-op elsewhere)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def best_of(fn, repeats: int, before=None) -> float:
    """The fastest of ``repeats`` calls, in seconds (``before`` runs untimed ahead of each)."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def synthetic_cache(root: Path, count: int, size: int) -> tuple[Path, str]:
    """A cache folder of ``count`` random ``size`` px images in the real layout; returns it and its key."""
    folder, key = root / f"synthetic-{count}-{size}", f"bench-{count}-{size}"
    folder.mkdir(parents=True)
    image_bytes = size * size * 3
    rng = np.random.default_rng(0)
    digest = hashlib.blake2b(digest_size=16)
    with (folder / "pixels.bin").open("wb") as handle:
        for start in range(0, count, 500):
            block = rng.integers(0, 256, (min(500, count - start) * image_bytes,), dtype=np.uint8).tobytes()
            handle.write(block)
            digest.update(block)
    index = np.stack([np.arange(count) * image_bytes, np.full(count, size), np.full(count, size)], axis=1)
    np.save(folder / "index.npy", index.astype(np.int64))
    np.save(folder / "kept.npy", np.arange(count, dtype=np.int64))
    header = {
        "format": CACHE_FORMAT,
        "key": key,
        "num_images": count,
        "pixels_bytes": count * image_bytes,
        "pixels_blake2b": digest.hexdigest(),
    }
    (folder / "header.json").write_text(json.dumps(header))
    return folder, key


def measure(folder: Path, key: str, repeats: int) -> dict[str, float]:
    pixels = folder / "pixels.bin"
    assert read_image_cache(folder, key) is not None, f"{folder} does not validate"
    return {
        "mb": pixels.stat().st_size / 1e6,
        "warm": best_of(lambda: read_image_cache(folder, key), repeats),
        "cold": best_of(lambda: read_image_cache(folder, key), repeats, before=lambda: drop_from_page_cache(pixels)),
        "checksum_warm": best_of(lambda: pixels_checksum(pixels), repeats),
    }


def default_data_rows(root: Path, repeats: int) -> list[list[object]]:
    """The embedded emoji as each default trainer caches them, through load_images on a cache hit."""
    from crispdiff.core.config import TrainConfig
    from crispdiff.core.flags import parse_config
    from crispdiff.data.loading import load_images
    from crispdiff.latent.trainer import LatentTrainConfig

    rows = []
    for name, config_cls, for_latents in (("latent", LatentTrainConfig, True), ("pixel", TrainConfig, False)):
        # the cache is what is timed, not the class labels read beside it
        config = parse_config(config_cls, ["--cache_dir", str(root / name)]).with_values(class_column="none")
        data = load_images(config, for_latents=for_latents, show_progress=False)  # builds the cache
        folder = data.cache_path
        key = folder.name
        reload = lambda config=config, crops=for_latents: load_images(config, for_latents=crops, show_progress=False)  # noqa: E731
        load = best_of(reload, repeats)
        found = measure(folder, key, repeats)
        rows.append(
            [f"default data, {name} trainer ({len(data)} x {data.resolution} px)", f"{found['mb']:.1f}",
             1000 * found["warm"], 1000 * found["cold"], 1000 * found["checksum_warm"], 1000 * load]
        )  # fmt: skip
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=10_000, help="images in the synthetic caches")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="image sizes of the synthetic caches")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measure (the fastest is reported)")
    p.add_argument("--no_record", action="store_true", help="print only; do not append to RESULTS.md")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cache-checksum-") as tmp:
        root = Path(tmp)
        rows = default_data_rows(root, args.repeats)
        for size in args.sizes:
            folder, key = synthetic_cache(root, args.count, size)
            found = measure(folder, key, args.repeats)
            rows.append(
                [f"{args.count} x {size} px (synthetic)", f"{found['mb']:.0f}", 1000 * found["warm"],
                 1000 * found["cold"], 1000 * found["checksum_warm"], "-"]
            )  # fmt: skip
            (folder / "pixels.bin").unlink()  # free the disk before the next size
    header = ["cache", "pixels MB", "verify warm ms", "verify cold ms", "checksum alone warm ms", "load_images hit ms"]
    notes = (
        "verify = `read_image_cache` (header, index and sizes, then the blake2b of pixels.bin), the fastest of "
        f"{args.repeats}; cold = the pixel file's pages dropped first (posix_fadvise DONTNEED)."
    )
    append_results("Image-cache checksum at start-up (bench_cache_checksum.py)", markdown_table(header, rows), notes,
                   record=not args.no_record)  # fmt: skip


if __name__ == "__main__":
    main()
