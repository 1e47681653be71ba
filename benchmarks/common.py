"""Shared by every benchmark: where the data is, what machine this is, and appending rows to RESULTS.md."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "RESULTS.md"


def shared_dir() -> Path:
    return Path(os.environ.get("CRISPDIFF_SHARED", REPO_ROOT.parent / "shared"))


def emoji_dir() -> Path:
    """The full Noto emoji set from ../shared, else crispdiff's embedded subset."""
    full = shared_dir() / "data" / "noto-emoji-64" / "train"
    if (full / "metadata.jsonl").exists():
        return full
    from crispdiff.data.loading import embedded_dataset_dir

    return embedded_dataset_dir()


def machine() -> str:
    """'NVIDIA H100 80GB HBM3' or 'CPU x86_64, 2 threads' — the card or cores the numbers came from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"CPU {platform.machine()}, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call of `fn` over `repeats` calls (device work included)."""
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize()
    return (time.perf_counter() - start) / repeats


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def append_results(title: str, table: str, notes: str = "", *, record: bool = True) -> None:
    """Append a dated section (machine, exact command, table) to benchmarks/RESULTS.md; with ``record=False``
    (a benchmark's ``--no_record``) only print it."""
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]])
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"\n## {title}\n\n- date: {stamp}\n- machine: {machine()}\n- command: `{command}`\n\n{table}\n"
    if notes:
        section += f"\n{notes}\n"
    if not record:
        print(section)
        return
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nEach section is appended by the benchmark script that produced it.\n"
        )
    with RESULTS.open("a") as handle:
        handle.write(section)
    print(section)
