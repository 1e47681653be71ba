"""What do a large dataset's image cache build and each rank's start-up cost?

    nice -n 10 python benchmarks/bench_large_cache.py --no_record                      # 100,000 images, 2 rounds
    nice -n 10 python benchmarks/bench_large_cache.py --num_images 5000 --no_record    # a quick look

The images are augmented copies of the 1,000 emoji embedded in crispdiff (a random crop of 48-64 px resized back to
64, a horizontal flip half the time, brightness / contrast / saturation each x0.8-1.2), written once as RGBA PNGs to
a temporary folder (not timed), so the build decodes real files through ``load_images``, as a user's
``--train_data_dir`` would. Per round, each in its own process(es), on a fresh cache:

- build: ``load_images`` decoding the whole folder, in 1 process and in 2 (``accelerate launch``, gloo, each rank
  decoding its share of the chunks, the main one recording the manifest); the time inside the processes (their
  start-up, the same for both, is left out), and each process's peak resident memory;
- start-up per rank: 2 processes loading the finished cache together (``load_images`` on a cache hit: the source
  folder listed and stat'ed for the cache key, the manifest read, one ``stat`` per chunk file), i.e. after this
  change; and before it: the same load with the folder listed by pathlib as before, plus a blake2b pass over every
  pixel byte, which format 2 of the cache made on every load and every rank (warm: the pixels in the page cache, as
  right after a build; cold: their pages dropped first, as after a reboot);
- what the per-image checks cost instead, spread over the first epoch: reading every image once (each checked
  against its digest) against reading them all again (already checked).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import REPO_ROOT, append_results, markdown_table

SCRIPT = Path(__file__).resolve()
ACCELERATE_CONFIG = REPO_ROOT / "accelerate_configs" / "cpu_2proc.yaml"


# ----------------------------------------------------------------------------------------------------------------------
# The synthetic dataset (written once, not timed)
# ----------------------------------------------------------------------------------------------------------------------

_EMOJI: list = []


def _load_emoji() -> None:
    from PIL import Image

    from crispdiff.data.loading import embedded_dataset_dir

    _EMOJI.extend(Image.open(path).convert("RGBA") for path in sorted(embedded_dataset_dir().glob("*.png")))


def _write_augmented(job: tuple[Path, int, int]) -> int:
    """Augmented copies ``start`` .. ``end - 1`` of the emoji (copy i of emoji i % 1000), seeded by their index."""
    import numpy as np
    from PIL import Image, ImageEnhance

    folder, start, end = job
    if not _EMOJI:
        _load_emoji()
    for i in range(start, end):
        rng = np.random.default_rng(i)
        emoji = _EMOJI[i % len(_EMOJI)]
        size = int(rng.integers(48, 65))
        left, top = (int(v) for v in rng.integers(0, 64 - size + 1, 2))
        image = emoji.crop((left, top, left + size, top + size)).resize((64, 64), Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        rgb, alpha = image.convert("RGB"), image.getchannel("A")
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            rgb = enhance(rgb).enhance(float(rng.uniform(0.8, 1.2)))
        rgb.putalpha(alpha)
        target = folder / f"{i // 1000:04d}" / f"{i:07d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        rgb.save(target)
    return end - start


def write_dataset(folder: Path, count: int, workers: int) -> float:
    """Write ``count`` augmented emoji PNGs below ``folder``; returns the seconds it took."""
    start = time.perf_counter()
    jobs = [(folder, s, min(count, s + 1000)) for s in range(0, count, 1000)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        written = sum(pool.map(_write_augmented, jobs))
    assert written == count
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------------
# Workers: run as 1 process, or as 2 under accelerate launch
# ----------------------------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def drop_from_page_cache(path: Path) -> None:
    """Evict one file's clean pages, so the next read comes from the disk (Linux; a no-op elsewhere)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def whole_cache_blake2b(folder: Path) -> str:
    """One blake2b over every pixel byte, read in 16 MiB pieces: what format 2 checked at every load."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted((folder / "chunks").glob("*.bin")):
        with path.open("rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def pathlib_listing(folder: Path) -> int:
    """The folder listing loads made before this change (pathlib's rglob, a stat per file for the cache key), kept
    here to measure what the scandir walk saves; returns the files found."""
    from crispdiff.data.sources import IMAGE_EXTENSIONS

    files = []
    for path in folder.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if path.suffix.lower() in IMAGE_EXTENSIONS and not hidden and path.is_file():
            files.append(path)
    files = sorted(files, key=lambda p: p.relative_to(folder).as_posix())
    names = [p.relative_to(folder).as_posix() for p in files]
    digest = hashlib.sha256()
    for path, name in zip(files, names):
        stat = path.stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return len(files)


def worker(args: argparse.Namespace) -> None:
    """``build``: decode the folder into a fresh cache; ``load``: start-up on the finished cache, this change's and
    the one before it. Writes this rank's measures as JSON."""
    from accelerate import PartialState

    from crispdiff.core.config import DataConfig
    from crispdiff.data.loading import load_images

    state = PartialState(cpu=True)
    config = DataConfig(train_data_dir=args.images, cache_dir=args.cache, resolution=args.resolution)
    state.wait_for_everyone()  # the ranks start together
    result: dict[str, float] = {}
    start = time.perf_counter()
    data = load_images(config, show_progress=False, processes=state)
    result["load_s"] = time.perf_counter() - start
    result["images"] = len(data)
    if args.worker == "load":
        from crispdiff.data.sources import scan_image_files

        assert data.cache_hit, "the load worker needs a finished cache"
        start = time.perf_counter()
        scan_image_files(Path(args.images))
        result["listing_s"] = time.perf_counter() - start
        start = time.perf_counter()
        pathlib_listing(Path(args.images))
        result["pathlib_listing_s"] = time.perf_counter() - start
        start = time.perf_counter()
        whole_cache_blake2b(data.cache_path)
        result["hash_warm_s"] = time.perf_counter() - start
        state.wait_for_everyone()
        if state.is_main_process:
            for path in (data.cache_path / "chunks").glob("*.bin"):
                drop_from_page_cache(path)
        state.wait_for_everyone()
        start = time.perf_counter()
        whole_cache_blake2b(data.cache_path)
        result["hash_cold_s"] = time.perf_counter() - start
        state.wait_for_everyone()
        for key in ("first_read_s", "second_read_s"):
            start = time.perf_counter()
            for i in range(len(data)):
                data.stored_image(i)
            result[key] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_rss_mb()
    Path(args.out, f"{args.worker}-rank{state.process_index}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(kind: str, processes: int, images: Path, cache: Path, out: Path, resolution: int) -> list[dict]:
    """The worker as 1 plain process or 2 under ``accelerate launch``; each rank's measures."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{kind}-rank*.json"):
        old.unlink()
    flags = ["--worker", kind, "--images", str(images), "--cache", str(cache), "--out", str(out),
             "--resolution", str(resolution)]  # fmt: skip
    if processes == 1:
        command = [sys.executable, str(SCRIPT), *flags]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
                   "--main_process_port", str(_free_port()), str(SCRIPT), *flags]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads(path.read_text()) for path in sorted(out.glob(f"{kind}-rank*.json"))]


# ----------------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------------


def load_average() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def span(values: list[float], digits: int = 2) -> str:
    """``"low-high"`` over the rounds (one value when they agree to the digits shown)."""
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low}-{high}"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_images", type=int, default=100_000, help="augmented emoji in the synthetic dataset")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every measure (the table gives their range)")
    p.add_argument("--resolution", type=int, default=64, help="--resolution of the cache")
    p.add_argument("--work_dir", default=None, help="where the PNGs and caches go (default: a temporary folder)")
    p.add_argument("--no_record", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--worker", choices=["build", "load"], help=argparse.SUPPRESS)
    p.add_argument("--images", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    loads = [load_average()]
    with tempfile.TemporaryDirectory(prefix="bench-large-cache-", dir=args.work_dir) as tmp:
        root = Path(tmp)
        images = root / "images"
        written_s = write_dataset(images, args.num_images, workers=min(2, os.cpu_count() or 1))
        print(f"wrote {args.num_images} PNGs in {written_s:.0f} s", flush=True)
        measures: dict[str, list[float]] = {}

        def keep(name: str, value: float) -> None:
            measures.setdefault(name, []).append(value)

        for round_index in range(args.rounds):
            for processes in (1, 2):
                cache = root / f"cache-{processes}"
                shutil.rmtree(cache, ignore_errors=True)
                ranks = run_worker("build", processes, images, cache, root / "out", args.resolution)
                keep(f"build_s_{processes}", max(rank["load_s"] for rank in ranks))
                keep(f"build_rss_{processes}", max(rank["peak_rss_mb"] for rank in ranks))
                print(f"round {round_index}: build with {processes} process(es): {ranks}", flush=True)
            shutil.rmtree(root / "cache-1", ignore_errors=True)
            ranks = run_worker("load", 2, images, root / "cache-2", root / "out", args.resolution)
            print(f"round {round_index}: start-up of 2 ranks: {ranks}", flush=True)
            for rank in ranks:
                keep("after_s", rank["load_s"])
                keep("listing_s", rank["listing_s"])
                before = rank["load_s"] - rank["listing_s"] + rank["pathlib_listing_s"]
                keep("before_warm_s", before + rank["hash_warm_s"])
                keep("before_cold_s", before + rank["hash_cold_s"])
                keep("first_read_s", rank["first_read_s"])
                keep("second_read_s", rank["second_read_s"])
                keep("load_rss", rank["peak_rss_mb"])
            shutil.rmtree(root / "cache-2", ignore_errors=True)
            loads.append(load_average())
        count = ranks[0]["images"]
    m = measures
    rows = [
        ["build, 1 process (s)", span(m["build_s_1"], 1)],
        ["build, 2 processes (s)", span(m["build_s_2"], 1)],
        ["build, peak RSS per process, 1 / 2 processes (MB)",
         f"{span(m['build_rss_1'], 0)} / {span(m['build_rss_2'], 0)}"],
        ["start-up per rank (2 ranks), now: load_images on a cache hit (s)", span(m["after_s"])],
        ["of which listing the image folder for the cache key (s)", span(m["listing_s"])],
        ["start-up per rank before: pathlib listing + whole-cache blake2b, warm (s)", span(m["before_warm_s"])],
        ["the same, cold (s)", span(m["before_cold_s"])],
        ["first read of every image, each checked on this read, per rank (s)", span(m["first_read_s"])],
        ["second read of every image (already checked), per rank (s)", span(m["second_read_s"])],
        ["peak RSS per rank after reading every image twice (mapped cache pages count) (MB)", span(m["load_rss"], 0)],
    ]  # fmt: skip
    table = markdown_table(["measure", f"{count:,} images at {args.resolution} px"], rows)
    notes = (
        f"{args.num_images:,} augmented copies of the embedded emoji (random 48-64 px crop resized to 64, flip, "
        f"brightness / contrast / saturation x0.8-1.2) as RGBA PNGs in a temporary folder (written in "
        f"{written_s:.0f} s, not timed); {args.rounds} round(s), each range min-max over rounds (and ranks). Times "
        "inside the processes (interpreter and torch start-up left out). 2 processes = `accelerate launch` with "
        "accelerate_configs/cpu_2proc.yaml (gloo). 'before' is today's load with the folder listed as loads listed it "
        "before this change (pathlib's rglob, measured in the same process) plus the blake2b pass over every pixel "
        "byte that the cache's format 2 made at every load on every rank (the function it used, over the same bytes). "
        f"Machine load average (1 / 5 / 15 min) at the start and after each round: {'; '.join(loads)} "
        f"({os.cpu_count()} CPU cores seen)."
    )
    append_results(
        "Large image cache: build in parts, start-up per rank (bench_large_cache.py)",
        table,
        notes,
        record=not args.no_record,
    )


if __name__ == "__main__":
    main()
